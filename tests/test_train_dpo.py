"""`cai train dpo`: the implied preference σ(βΔ) settles at soft targets, log-probs are the
model's, the stage folder is traceable and a model spec, and configs are checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cai.core.errors import CaiError
from cai.train.dpo import (
    DPOTrainConfig,
    _soft_dpo_trainer_cls,
    completion_logps,
    dpo_rows,
    fused_completion_logps,
    run_dpo,
    train_dpo,
)
from tests.test_train_pm import STAMP, as_rows, fake_label_stage, pref, two_groups


def test_completion_logps_is_the_sum_over_completion_tokens(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (3, 12))
    att = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[0, 5:] = 1
    comp[1, 8:10] = 1
    comp[2, 4:7] = 1
    att[2, 7:] = 0  # right padding
    got = completion_logps(model, ids, att, comp)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
    want = [sum(lp[b, t - 1, ids[b, t]].item() for t in range(12) if comp[b, t]) for b in range(3)]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    # TRL's fused head (used on GPUs) gives the same sums.
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    with torch.no_grad():
        fused = fused_completion_logps(model, ids, att, comp)
    assert fused.tolist() == pytest.approx(want, abs=1e-4)


def test_gpu_head_path_trains_like_the_cpu_path(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused-head branch (reference via TRL, adapter switched off) matches the plain one."""
    rows = as_rows(two_groups(1))
    cfg = DPOTrainConfig(model=str(tiny_model), beta=1.0, lora=True, lora_r=4, lora_alpha=8,
                         learning_rate=2e-2, max_steps=2, batch_size=2, eval_fraction=0, max_length=48)
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(_soft_dpo_trainer_cls(), "use_fused_head", fused)
        res, deltas = train_dpo(rows, cfg, eval_rows=rows)
        runs.append(([e["loss"] for e in res.log], deltas))
    assert runs[0][1][0] != 0
    assert runs[1][0] == pytest.approx(runs[0][0], abs=1e-4)
    assert runs[1][1] == pytest.approx(runs[0][1], abs=1e-3)


def test_soft_dpo_implied_preference_settles_at_the_labels(tiny_model: Path) -> None:
    rows = as_rows(two_groups())
    cfg = DPOTrainConfig(model=str(tiny_model), beta=1.0, lora=True, lora_r=8, lora_alpha=16,
                         learning_rate=2e-2, max_steps=30, batch_size=4, eval_fraction=0, logging_steps=5,
                         max_length=64)
    res, deltas = train_dpo(rows, cfg, eval_rows=rows)
    assert res.steps == 30 and len(deltas) == len(rows)
    for r, d in zip(rows, deltas):
        implied = 1 / (1 + math.exp(-cfg.beta * d))
        assert abs(implied - r["p_chosen"]) < 0.05, (r["id"], r["p_chosen"], implied)
    assert {"loss", "implied_p", "mean_p", "learning_rate"} <= set(res.log[-1])
    assert res.log[-1]["loss"] < res.log[0]["loss"]
    # The merged policy (what is saved) against the untouched reference gives the same Δ.
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    for r, d in zip(rows[:2], deltas[:2]):
        assert merged_delta(res.model, ref, res.tokenizer, r) == pytest.approx(d, abs=1e-2)


def merged_delta(policy, ref, tok, row) -> float:
    """Δ of one pair computed from scratch: prompt tokens, then each full conversation."""
    import torch

    def ids(chat, gen=False):
        return tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)

    n = len(ids(row["prompt"], gen=True))
    out = 0.0
    for key, sign in (("chosen", 1), ("rejected", -1)):
        full = torch.tensor([ids(row["prompt"] + row[key])])
        comp = torch.zeros_like(full)
        comp[:, n:] = 1
        with torch.no_grad():
            lp = [completion_logps(m, full, torch.ones_like(full), comp).item() for m in (policy, ref)]
        out += sign * (lp[0] - lp[1])
    return out


def test_rows_without_chat_template_become_plain_text(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    row = as_rows([pref("x", "Hi", "Hello.", "Go.", 0.7)])[0]
    chat = dpo_rows([row], tok)[0]  # tokenised here (data text as ordinary tokens)
    assert tok.decode(chat["chosen_ids"]).startswith("Hello.") and chat["p_chosen"] == 0.7
    assert "<|im_start|>user\nHi<|im_end|>" in tok.decode(chat["prompt_ids"])
    tok.chat_template = None
    plain = dpo_rows([row], tok)[0]
    text = tok.decode(plain["prompt_ids"] + plain["chosen_ids"])
    assert text.endswith("Human: Hi\n\nAssistant: Hello." + tok.eos_token)  # EOS as TRL adds it
    assert "<|im_start|>" not in tok.decode(plain["prompt_ids"])


def test_run_dpo_writes_a_traceable_policy_folder(tiny_model: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import cai.train.dpo as dpo

    up = fake_label_stage(tmp_path / "label", two_groups(3))
    cfg = DPOTrainConfig(preferences=str(up), model=str(tiny_model), out=str(tmp_path / "dpo"), beta=0.5,
                         lora=False, learning_rate=1e-3, max_steps=4, batch_size=2, eval_fraction=0.34,
                         save_steps=2, max_length=64, ties="drop")
    m = run_dpo(cfg)
    out = Path(cfg.out)
    for name in ("model.safetensors", "config.json", "eval.json", "log.jsonl", "README.md",
                 "calibration.png"):
        assert (out / name).is_file(), name
    assert m["stage"] == "dpo" and m["constitution"] == STAMP
    assert m["upstream"]["preferences"]["stage"] == "label"
    assert m["models"]["reference"] == str(tiny_model)
    assert m["counts"]["eval"] == 2 and m["counts"]["steps"] == 4
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == 2 and report["beta"] == 0.5 and 0 < report["mean_implied_p"] < 1
    assert len(report["per_pair"]) == 2 and all(0 < p["p_model"] < 1 for p in report["per_pair"])
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # The saved policy is an ordinary causal LM that moved away from the reference.
    policy = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    moved = sum((a - b).abs().sum().item() for a, b in zip(policy.parameters(), ref.parameters()))
    assert moved > 0
    monkeypatch.setattr(dpo, "train_dpo", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert run_dpo(cfg) == m


def test_dpo_config_is_checked() -> None:
    for bad, field in (({"beta": 0.0}, "beta"), ({"ties": "x"}, "ties"), ({"batch_size": 0}, "batch_size"),
                       ({"tie_threshold": 0.5}, "tie_threshold")):
        with pytest.raises(CaiError) as exc:
            DPOTrainConfig(**bad)
        assert exc.value.field == field
    with pytest.raises(CaiError, match="preferences"):
        run_dpo(DPOTrainConfig())
