"""Reliability, third round (issue #34): the report, the known-answer evaluation, python:
rewards and the pipeline keep the promises of the run folder — one line and exit 2 for bad
input, no output over an input, one writer per folder, outputs only when complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.core.errors import CaiError


def _run_folder(root: Path) -> Path:
    """A small run folder of the kind the report reads: a pipeline.json, an SL stage."""
    (root / "sl").mkdir(parents=True)
    (root / "sl" / "manifest.json").write_text(json.dumps(
        {"stage": "sl", "counts": {"records": 1, "rounds": 1, "kept": 1, "sft_examples": 1,
                                   "pairs": 1}}))
    (root / "sl" / "data.jsonl").write_text('{"id": "r0", "prompt": "p"}\n')
    (root / "pipeline.json").write_text(json.dumps({"config": {"name": "tiny"}, "steps": {}}))
    return root


def _one_error(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_report_out_never_over_an_input_nor_an_existing_file(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "run")
    cli = CliRunner()
    assert cli.invoke(app, ["report", str(run)]).exit_code == 0  # report.md is the run's own
    constitution = tmp_path / "my-constitution.yaml"
    constitution.write_text("name: mine\n")
    inputs = [run / "sl" / "data.jsonl", run / "pipeline.json", run / "report.md",
              run / "sl" / "manifest.json"]
    for target in inputs:  # inputs: refused with or without --overwrite, left as they were
        before = target.read_bytes()
        for extra in ([], ["--overwrite"]):
            r = cli.invoke(app, ["report", str(run), "--html", "--out", str(target), *extra])
            assert "an input of this command" in _one_error(r), (target, extra)
            assert target.read_bytes() == before
    link = tmp_path / "link.html"  # a link to an input is the input
    link.symlink_to(run / "sl" / "data.jsonl")
    r = cli.invoke(app, ["report", str(run), "--html", "--out", str(link), "--overwrite"])
    assert "an input of this command" in _one_error(r)
    # A plain existing file: refused unless --overwrite, then replaced by the report.
    before = constitution.read_bytes()
    r = cli.invoke(app, ["report", str(run), "--html", "--out", str(constitution)])
    assert "exists; pass --overwrite" in _one_error(r) and constitution.read_bytes() == before
    r = cli.invoke(app, ["report", str(run), "--html", "--out", str(constitution), "--overwrite"])
    assert r.exit_code == 0 and constitution.read_text().startswith("<!doctype html>")
    # A new file, and the default report.html (refreshed on every run), need no flag.
    new = tmp_path / "elsewhere" / "r.html"
    assert cli.invoke(app, ["report", str(run), "--html", "--out", str(new)]).exit_code == 0
    assert new.read_text().startswith("<!doctype html>")
    for _ in range(2):
        assert cli.invoke(app, ["report", str(run), "--html"]).exit_code == 0
    assert (run / "report.html").is_file()
    r = cli.invoke(app, ["report", str(run), "--html", "--out", str(run / "report.html")])
    assert r.exit_code == 0
    # --overwrite without --out has nothing to act on.
    assert "--overwrite goes with --out" in _one_error(
        cli.invoke(app, ["report", str(run), "--html", "--overwrite"]))


# --------------------------------------------------------------------------- python: rewards


def _rl_cfg(tmp_path: Path, tiny_model: Path, **kw):
    from cai.train.rl import RLConfig

    prompts = tmp_path / "rl_prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(4)))
    reward = tmp_path / "reward.py"
    if not reward.exists():
        reward.write_text("def score(prompt, response):\n    return float(len(response)) / 10\n")
    base = dict(algo="ppo", model=str(tiny_model), reward=f"python:{reward}:score",
                prompts=str(prompts), out=str(tmp_path / "rl"), steps=1, batch_size=2,
                minibatch_size=2, ppo_epochs=1, max_new_tokens=4, save_every=1, lora=False,
                learning_rate=1e-3)
    return RLConfig(**{**base, **kw})


def test_python_reward_edit_between_run_and_resume_is_refused(tmp_path: Path, tiny_model: Path,
                                                              one_thread) -> None:
    from cai.train.rl import run_rl

    cfg = _rl_cfg(tmp_path, tiny_model)
    out, reward = Path(cfg.out), tmp_path / "reward.py"
    first = run_rl(cfg)
    stamp = json.loads((out / "run_config.json").read_text())
    assert list(stamp["python_sources"]) == [cfg.reward]
    assert run_rl(cfg)["written"] == first["written"]  # unedited: the finished run as it is
    # The file edited (the spec unchanged): the finished run is not returned as if made by it,
    # and a resume is refused naming the file.
    reward.write_text("def score(prompt, response):\n    return -float(len(response))\n")
    with pytest.raises(CaiError, match=rf"another version of {reward}"):
        run_rl(cfg)
    # Killed after a checkpoint (no model, no manifest): the same rule.
    for p in [out / "manifest.json", *out.glob("*.safetensors")]:
        p.unlink()
    assert (out / "checkpoints").is_dir()
    with pytest.raises(CaiError, match=rf"another version of {reward}"):
        run_rl(_rl_cfg(tmp_path, tiny_model, steps=2))
    r = CliRunner().invoke(app, ["train", "rl", "--model", cfg.model, "--reward", cfg.reward,
                                 "--prompts", cfg.prompts, "--out", cfg.out, "--steps", "2",
                                 "--batch-size", "2", "--minibatch-size", "2", "--ppo-epochs",
                                 "1", "--max-new-tokens", "4", "--no-lora", "--learning-rate",
                                 "0.001", "--save-every", "1"])
    assert str(reward) in _one_error(r)
    # --force starts clean under the edited function, and records its hash.
    fresh = run_rl(_rl_cfg(tmp_path, tiny_model, force=True))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1] and fresh["counts"]["steps"] == 1
    assert json.loads((out / "run_config.json").read_text())["python_sources"][cfg.reward] != \
        stamp["python_sources"][cfg.reward]
    assert run_rl(cfg)["written"] == fresh["written"]  # and it is the finished run again
