"""`cai train sft` with LoRA on SL-CAI data: the loss falls and the folder is a model spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.backends import GenerationConfig, GenRequest
from cai.core.errors import CaiError
from cai.train.sft import SFTConfig, load_sft_rows, run_sft


def test_bad_sft_data_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "sft.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                 '{"messages": [{"role": "user", "content": "a"}]}\n')
    with pytest.raises(CaiError, match="sft.jsonl:2: messages"):
        load_sft_rows(p)


@pytest.mark.slow
def test_lora_sft_on_sl_output_loss_falls(tmp_path: Path) -> None:
    """SL data from the embedded model, then LoRA SFT of the embedded model on it."""
    from cai.backends import load_backend
    from cai.sl import SLConfig, run_sl

    root = Path(__file__).resolve().parent.parent
    run_sl(SLConfig(prompts=str(root / "prompts" / "red_team.jsonl"),
                    constitution=str(root / "constitutions" / "minimal.yaml"), out=str(tmp_path / "sl"),
                    rounds=1, limit=4, max_new_tokens=24, few_shot=0, min_words=0,
                    # 24-token revisions are usually cut off; this test is about SFT, not that flag.
                    drop_cut_off=False),
           load_backend("embedded:smollm2-135m"))
    rows = load_sft_rows(tmp_path / "sl")
    assert rows, "the SL stage produced no SFT data"
    summary = run_sft(SFTConfig(data=str(tmp_path / "sl"), out=str(tmp_path / "sft"), lora=True,
                                max_steps=12, batch_size=2, learning_rate=2e-3, max_length=256))
    log = [json.loads(x) for x in (tmp_path / "sft" / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert summary["counts"]["steps"] == 12
    # The model can be traced back to the constitution and the data that made it.
    sl_manifest = json.loads((tmp_path / "sl" / "manifest.json").read_text())
    assert summary["constitution"] == sl_manifest["constitution"]
    assert summary["upstream"]["data"]["stage"] == "sl"
    assert summary["upstream"]["data"]["data_sha256"] == sl_manifest["data"]["sha256"]
    # A rerun with the same config returns the finished run without training again.
    again = run_sft(SFTConfig(data=str(tmp_path / "sl"), out=str(tmp_path / "sft"), lora=True,
                              max_steps=12, batch_size=2, learning_rate=2e-3, max_length=256))
    assert again["written"] == summary["written"]
    # The merged folder works as a model spec.
    b = load_backend(f"hf:{tmp_path / 'sft'}", reuse=False)
    out = b.generate([GenRequest([{"role": "user", "content": "Hi"}])], GenerationConfig(max_new_tokens=4))
    assert 1 <= out[0].tokens <= 4
