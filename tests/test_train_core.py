"""The training core every trainer shares (cai.train.common): the per-step log, the
checkpoint convention, PPO's own config, and the small defects named with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.core.errors import CaiError
from cai.train.common import (
    append_step,
    checkpoint_problem,
    last_checkpoint,
    read_steps,
    rewrite_steps,
    write_checkpoint,
)


def test_step_log_appends_reads_trims_and_drops_a_torn_last_line(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    assert read_steps(log) == []  # no file yet: no steps
    for step in (1, 2, 3):
        append_step(log, {"step": step, "loss": 1.0 / step})
    assert [e["step"] for e in read_steps(log)] == [1, 2, 3]
    assert [e["step"] for e in read_steps(log, upto=2)] == [1, 2]
    with open(log, "a", encoding="utf-8") as f:  # a kill in the middle of a write
        f.write('{"step": 4, "lo')
    assert [e["step"] for e in read_steps(log)] == [1, 2, 3]
    rewrite_steps(log, read_steps(log, upto=1))  # a resume from step 1 redoes 2 and 3
    assert log.read_text(encoding="utf-8") == '{"step": 1, "loss": 1.0}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n', encoding="utf-8")  # a whole bad line
    with pytest.raises(CaiError, match=r"log\.jsonl:2: invalid JSON"):
        read_steps(log)


def _ppo_state(folder: Path, step: int) -> None:
    folder.mkdir(parents=True)
    torch.save({"step": step}, folder / "state.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_checkpoints_are_written_whole_rotated_and_torn_ones_skipped(tmp_path: Path) -> None:
    run = tmp_path / "checkpoints"
    write_checkpoint(run, 1, lambda f: _ppo_state(f, 1))
    write_checkpoint(run, 2, lambda f: _ppo_state(f, 2))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2"]  # only the newest kept
    assert last_checkpoint(run) == str(run / "checkpoint-2")

    def dies(folder: Path) -> None:  # a save cut short: half a state, then an error
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    with pytest.raises(CaiError, match="no space left to write the checkpoint"):
        write_checkpoint(run, 3, dies)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2"]  # the old one untouched
    # One left torn by an older version (not written through the staging folder) is skipped.
    torn = run / "checkpoint-3"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"PK\x03\x04 half")
    (torn / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert checkpoint_problem(torn) == "state.pt truncated"
    assert checkpoint_problem(run / "checkpoint-2") is None
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert last_checkpoint(run) == str(run / "checkpoint-2")


def test_ppo_config_is_its_own_and_rl_builds_it() -> None:
    from cai.train.ppo_config import PPOConfig
    from cai.train.rl import RLConfig

    rl = RLConfig(algo="ppo", batch_size=4, minibatch_size=2, gamma=0.9, steps=7, lora_r=4)
    ppo = PPOConfig.from_fields(rl)
    assert type(ppo) is PPOConfig and (ppo.batch_size, ppo.minibatch_size, ppo.gamma) == (4, 2, 0.9)
    assert not hasattr(ppo, "steps") and not hasattr(ppo, "algo")
    with pytest.raises(CaiError, match=r"lam: must be in \[0, 1\]"):
        PPOConfig(lam=1.5)
    with pytest.raises(CaiError, match="minibatch_size: must be between 1 and batch_size"):
        PPOConfig(batch_size=2)
    assert PPOConfig(batch_size=2, minibatch_size=2).minibatch_size == 2


def test_ppo_module_does_not_import_rl() -> None:
    """ppo -> rl was half of an import cycle (a TYPE_CHECKING import of RLConfig)."""
    import ast

    import cai.train.ppo as ppo

    tree = ast.parse(Path(ppo.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "cai.train.rl" not in imported
    assert "cai.train.ppo_config" in imported


def test_ppo_checkpoint_of_another_model_is_one_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.train.ppo import PPOConfig, PPOTrainer

    class Zero:
        def score(self, prompts, responses):
            return [0.0] * len(responses)

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    cfg = PPOConfig(batch_size=2, minibatch_size=2, max_new_tokens=4)
    trainer = PPOTrainer(policy, reference, tok, Zero(), [[{"role": "user", "content": "hi"}]],
                         cfg, tmp_path)
    assert trainer.load_checkpoint() == 0  # nothing saved yet: start at step 0
    trainer.step = 1
    trainer.save_checkpoint()
    assert (tmp_path / "checkpoints" / "checkpoint-1" / "state.pt").is_file()
    assert trainer.load_checkpoint() == 1
    folder = tmp_path / "checkpoints" / "checkpoint-2"
    folder.mkdir()
    state = torch.load(tmp_path / "checkpoints" / "checkpoint-1" / "state.pt", weights_only=True)
    state["trainable"] = {"other.model.weight": torch.zeros(1)}
    torch.save(state, folder / "state.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    with pytest.raises(CaiError) as exc:
        trainer.load_checkpoint()
    assert exc.value.where == str(folder / "state.pt") and "another model" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_sft_names_the_bad_field(tmp_path: Path) -> None:
    from cai.train.sft import SFTConfig

    with pytest.raises(CaiError) as exc:
        SFTConfig(epochs=0)
    assert exc.value.field == "epochs"
    with pytest.raises(CaiError) as exc:
        SFTConfig(learning_rate=0)
    assert exc.value.field == "learning_rate"
    assert SFTConfig(epochs=0.5, learning_rate=1e-5).epochs == 0.5


def test_one_reliability_diagram_for_pm_dpo_and_the_labeler(tmp_path: Path) -> None:
    import cai.evaluate.labeler as labeler
    import cai.train.plots as plots

    assert labeler.expected_calibration_error is plots.expected_calibration_error
    assert not hasattr(labeler, "reliability_plot")
    ece, table = plots.expected_calibration_error([0.55, 0.95, 0.95], [1.0, 1.0, 0.0], bins=5)
    assert [b["n"] for b in table] == [1, 2] and ece == pytest.approx((0.45 + 2 * 0.45) / 3)
    png = plots.reliability_png(table, tmp_path / "r.png", title="t", xlabel="x", ylabel="y")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
