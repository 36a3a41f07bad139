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
    # A monitor's python: file (a list field, `name=spec`) is part of the identity too.
    from cai.core.pyfunc import python_sources

    gold = tmp_path / "gold.py"
    gold.write_text("def g(prompt, response):\n    return 0.0\n")
    with_monitor = _rl_cfg(tmp_path, tiny_model, monitors=[f"gold=python:{gold}:g"])
    assert set(python_sources(with_monitor)) == {cfg.reward, f"python:{gold}:g"}


# --------------------------------------------------------------------------- known-answer


GOLD_FILE = '''
def has_cat(prompt, response):
    return 1.0 if "cat" in response.lower() else 0.0


def cat_judge(prompt, response_a, response_b, principle=""):
    return 0.5 + 0.5 * (has_cat(prompt, response_a) - has_cat(prompt, response_b))
'''


def _ka_run(tmp_path: Path, tiny_model: Path, judge: str | None = None, stages=None) -> tuple[Path, str]:
    """A known-answer run folder (tiny models; a PM folder that is only its config), its
    labels planted by a python: judge beside the gold."""
    import shutil

    tmp_path.mkdir(parents=True, exist_ok=True)
    funcs = tmp_path / "gold.py"
    funcs.write_text(GOLD_FILE)
    run = tmp_path / "run"
    for name in ("sft", "rl", "dpo"):
        shutil.copytree(tiny_model, run / name)
    (run / "pm").mkdir()
    (run / "pm" / "config.json").write_text('{"not": "a model"}')
    (run / "prompts").mkdir()
    (run / "prompts" / "red_team.eval.jsonl").write_text(
        "".join(json.dumps({"id": f"e{i}", "prompt": f"How do I do bad thing {i}?"}) + "\n"
                for i in range(3)))
    config = {"model": str(tiny_model), "feedback_model": judge or f"python:{funcs}:cat_judge"}
    if stages is not None:
        config["stages"] = stages
    (run / "pipeline.json").write_text(json.dumps({"config": config}))
    (run / "rl" / "log.jsonl").write_text("".join(
        json.dumps({"step": s, "sqrt_kl": 0.1 * s, "reward_mean": 0.1}) + "\n" for s in (1, 2)))
    return run, f"python:{funcs}:has_cat"


def _ka(run: Path, gold: str, **kw):
    from cai.evaluate.known_answer_run import KnownAnswerConfig, run_known_answer

    return run_known_answer(KnownAnswerConfig(run=str(run), gold=gold, samples=1, best_of=1,
                                              max_new_tokens=2, n_boot=100, **kw))


def test_known_answer_lock_one_writer_and_nothing_that_looks_finished(tmp_path: Path,
                                                                     tiny_model: Path) -> None:
    import subprocess
    import sys

    run, gold = _ka_run(tmp_path, tiny_model)
    out = run / "known-answer"
    out.mkdir()
    # Another process holds the folder: refused at once, naming it.
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; "
                               "from cai.core.folders import lock_dir; "
                               f"lock_dir(Path({str(out)!r})); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CaiError, match="another cai run"):
            _ka(run, gold)
    finally:
        holder.kill()
        holder.wait()
    # Outputs of an earlier run are not left beside a run that stops part-way: what is there
    # afterwards never looks finished (the manifest is the finished-marker, written last).
    (out / "manifest.json").write_text(json.dumps({"stage": "eval-known-answer"}))
    (out / "known_answer.json").write_text("{}")
    with pytest.raises(Exception):  # noqa: B017 - the PM folder is not a model: it stops there
        _ka(run, gold)
    assert not (out / "manifest.json").exists() and not (out / "known_answer.json").exists()
    # The benchmark copy follows the rule of every file a command writes.
    bench = tmp_path / "bench.json"
    bench.write_text("keep")
    with pytest.raises(CaiError, match="exists; pass --overwrite"):
        _ka(run, gold, json=str(bench))
    with pytest.raises(CaiError, match="an input of this command"):
        _ka(run, gold, json=str(run / "pipeline.json"), overwrite=True)
    assert bench.read_text() == "keep"


def test_known_answer_lock_refuses_a_run_without_planted_gold_or_with_missing_parts(
        tmp_path: Path, tiny_model: Path) -> None:
    import shutil

    # An ordinary run: labelled by a model, not by a judge beside the gold.
    run, gold = _ka_run(tmp_path / "a", tiny_model, judge="embedded:smollm2-135m")
    with pytest.raises(CaiError, match="not by a judge planted beside the gold"):
        _ka(run, gold)
    assert not (run / "known-answer").exists()
    # A python: judge of another file plants a different preference.
    other = tmp_path / "other.py"
    other.write_text(GOLD_FILE)
    run, gold = _ka_run(tmp_path / "b", tiny_model, judge=f"python:{other}:cat_judge")
    with pytest.raises(CaiError, match="not by a judge planted beside the gold"):
        _ka(run, gold)
    # The dpo stage missing and RL's log torn by a kill: both named, before any work.
    run, gold = _ka_run(tmp_path / "c", tiny_model)
    shutil.rmtree(run / "dpo")
    with open(run / "rl" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "sqrt_')
    with pytest.raises(CaiError) as err:
        _ka(run, gold)
    assert "dpo/ (no finished model" in str(err.value)
    assert "rl/log.jsonl (line 3 is torn" in str(err.value)
    assert not (run / "known-answer").exists()
    # A run whose pipeline did not train dpo does not expect it; the CLI says it in one line.
    run, gold = _ka_run(tmp_path / "d", tiny_model, stages=["sl", "sft", "label", "pm", "rl"])
    shutil.rmtree(run / "dpo")
    (run / "rl" / "log.jsonl").write_text("")
    r = CliRunner().invoke(app, ["eval", "known-answer", str(run), "--gold", gold])
    line = _one_error(r)
    assert "rl/log.jsonl (missing or empty" in line and "dpo/" not in line


# --------------------------------------------------------------------------- pipeline


def _pipeline_yaml(tmp_path: Path, tiny_model: Path, **over) -> Path:
    import yaml

    from .conftest import ROOT

    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(model=str(tiny_model), feedback_model=f"hf:{tiny_model}?progress=0",
                out=str(tmp_path / "run"), **over)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_pipeline_empty_eval_side_is_refused_before_any_stage(tmp_path: Path,
                                                             tiny_model: Path) -> None:
    from cai.pipeline import load_pipeline_config, plan, run_pipeline

    # 156 red-team prompts × 0.003 rounds to none held out.
    path = _pipeline_yaml(tmp_path, tiny_model, eval_fraction=0.003)
    cfg = load_pipeline_config(path)
    with pytest.raises(CaiError, match=r"eval_fraction: eval_fraction 0\.003 of the 156 "
                                       r"prompts .* holds out none for the evaluation"):
        run_pipeline(cfg, where=str(path))
    run = tmp_path / "run"
    assert not run.exists()  # no stage ran, no split file of either side was written
    r = CliRunner().invoke(app, ["pipeline", "run", str(path)])
    assert "eval_fraction" in _one_error(r) and not run.exists()
    # A fraction that holds some out plans (the check is on the held-out count, not the value).
    cfg = load_pipeline_config(_pipeline_yaml(tmp_path, tiny_model, eval_fraction=0.01))
    assert plan(cfg).prompt_split["sets"]["red_team"]["eval"] == 2


def test_pipeline_empty_eval_overlap_counts_training_data_not_stale_records(
        tmp_path: Path, tiny_model: Path) -> None:
    """After a split change the SL store keeps records of prompts now held out; only what
    the stage hands to training (sft.jsonl, pairs.jsonl, preferences.jsonl) is contamination."""
    from cai.pipeline import heldout_overlap, load_pipeline_config, plan

    cfg = load_pipeline_config(_pipeline_yaml(tmp_path, tiny_model))
    steps = plan(cfg)
    steps.write_prompt_files()
    sl = next(s for s in steps if s.stage == "sl")
    label = next(s for s in steps if s.stage == "label")
    held = [json.loads(x)["prompt"] for x in
            Path(steps.prompt_split["sets"]["red_team"]["eval_file"]).read_text().splitlines()]
    train = [json.loads(x)["prompt"] for x in
             Path(steps.prompt_split["sets"]["red_team"]["train_file"]).read_text().splitlines()]
    sl.folder.mkdir(parents=True)
    label.folder.mkdir(parents=True)
    # The store holds a record of a held-out prompt (a previous split's); training does not.
    (sl.folder / "data.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate([held[0], train[0]])))
    (sl.folder / "sft.jsonl").write_text(json.dumps({"id": "r1", "messages": [
        {"role": "user", "content": train[0]}, {"role": "assistant", "content": "x"}]}) + "\n")
    (label.folder / "data.jsonl").write_text(json.dumps({"id": "l0", "prompt": held[1]}) + "\n")
    (label.folder / "preferences.jsonl").write_text("")
    assert heldout_overlap(steps) == 0
    # The same prompts in what training reads are counted, from either stage.
    (sl.folder / "pairs.jsonl").write_text(json.dumps({"id": "r0", "prompt": [
        {"role": "user", "content": held[0]}], "chosen": [], "rejected": []}) + "\n")
    assert heldout_overlap(steps) == 1
    (label.folder / "preferences.jsonl").write_text(json.dumps({"id": "l0", "prompt": [
        {"role": "user", "content": held[1]}], "chosen": [], "rejected": []}) + "\n")
    assert heldout_overlap(steps) == 2


# --------------------------------------------------------------------------- quiet mistakes


def test_rl_options_of_another_algorithm_and_zero_generations_are_one_line(tmp_path: Path) -> None:
    from cai.train.rl import RLConfig

    base = ["train", "rl", "--model", str(tmp_path / "none"), "--reward", "python:x.py:f",
            "--out", str(tmp_path / "rl")]
    cli = CliRunner()
    line = _one_error(cli.invoke(app, [*base, "--algo", "grpo", "--num-generations", "0"]))
    assert "num_generations: must be at least 2" in line
    line = _one_error(cli.invoke(app, [*base, "--algo", "grpo", "--adaptive-kl"]))
    assert "adaptive_kl: is read by PPO only; --algo grpo ignores it" in line
    line = _one_error(cli.invoke(app, [*base, "--algo", "ppo", "--num-generations", "8"]))
    assert "num_generations: is read by RLOO and GRPO only" in line
    assert not (tmp_path / "rl").exists()
    # Set for the algorithm that reads it, or left at its default, each passes.
    assert RLConfig(algo="ppo", adaptive_kl=True).adaptive_kl
    assert RLConfig(algo="grpo", num_generations=8).num_generations == 8
    assert RLConfig(algo="grpo", adaptive_kl=False).algo == "grpo"


def test_rl_vllm_refuses_a_model_it_cannot_run_before_the_folder(tmp_path: Path,
                                                                 tiny_model: Path) -> None:
    import shutil

    pytest.importorskip("vllm")  # the check asks the installed vLLM's model registry
    from cai.train.rollout import check_vllm_model

    check_vllm_model(tiny_model)  # a Llama: vLLM implements it
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["NoSuchArchForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    reward = tmp_path / "r.py"
    reward.write_text("def f(prompt, response):\n    return 1.0\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi?"}\n')
    r = CliRunner().invoke(app, ["train", "rl", "--model", str(odd), "--reward",
                                 f"python:{reward}:f", "--prompts", str(prompts), "--out",
                                 str(tmp_path / "rl"), "--rollout-engine", "vllm"])
    line = _one_error(r)
    assert "cannot run this model (architecture NoSuchArchForCausalLM)" in line
    assert "--rollout-engine hf" in line and not (tmp_path / "rl").exists()


JUDGES = '''
import sys


def chatty(prompt, response_a, response_b, principle=""):
    print("DEBUG judging", prompt)
    return 0.75


def quits(prompt, response_a, response_b, principle=""):
    sys.exit(3)
'''


def test_python_function_prints_go_to_stderr_and_sys_exit_names_the_spec(tmp_path: Path) -> None:
    import subprocess
    import sys

    from cai.core.pyfunc import source_file

    from .conftest import MINIMAL

    judges = tmp_path / "judges.py"
    judges.write_text(JUDGES)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}", "response_a": "a",
                                         "response_b": "bb"}) + "\n" for i in range(2)))
    cai = str(Path(sys.executable).parent / "cai")

    def label(fn: str, out: str) -> subprocess.CompletedProcess:
        return subprocess.run([cai, "label", "--pairs", str(pairs), "--feedback-model",
                               f"python:{judges}:{fn}", "--constitution", str(MINIMAL),
                               "--principles", "1", "--out", str(tmp_path / out)],
                              capture_output=True, text=True, timeout=300)

    r = label("chatty", "a")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # stdout is the summary JSON alone
    assert summary["stage"] == "label" and "DEBUG judging" in r.stderr
    r = label("quits", "b")
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"python:{judges}:quits called sys.exit(3)" in lines[0]
    # A module that is another's alias (os.path is posixpath) is found by its file; a module
    # built into Python has none and says so.
    assert source_file("python:os.path:join").name == "posixpath.py"
    with pytest.raises(CaiError, match="sys is built into Python"):
        source_file("python:sys:exit")


def test_pipeline_config_errors_name_the_line(tmp_path: Path, tiny_model: Path) -> None:
    import yaml

    from cai.pipeline import load_pipeline_config, run_pipeline

    path = _pipeline_yaml(tmp_path, tiny_model)
    data = yaml.safe_load(path.read_text())
    data["rl"].update(algo="grpo", num_generations=0)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1)
                if "num_generations" in text)
    with pytest.raises(CaiError) as err:
        run_pipeline(load_pipeline_config(path), where=str(path))
    assert str(err.value).startswith(f"{path}:{line}: rl.num_generations: must be at least 2")
    assert not (tmp_path / "run" / "sl").exists()
    # A top-level field too.
    data["rl"].pop("num_generations")
    data["rl"].pop("algo")
    data["rounds"] = 0
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1)
                if text.startswith("rounds:"))
    with pytest.raises(CaiError, match=rf"^{path}:{line}: rounds: must be at least 1"):
        load_pipeline_config(path)


def test_view_host_bad_address_is_a_host_error(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "run")
    r = CliRunner().invoke(app, ["view", str(run), "--host", "256.1.1.1", "--port", "8799"])
    line = _one_error(r)
    assert line.startswith("error: host: cannot listen on") and "port" not in line.split(":")[1]


def test_pipeline_lock_second_run_refused_before_any_write(tmp_path: Path,
                                                                 tiny_model: Path) -> None:
    """A second pipeline on a run folder another process is writing is refused before it
    touches the prompt split or pipeline.json."""
    import subprocess
    import sys

    from cai.pipeline import load_pipeline_config, run_pipeline

    path = _pipeline_yaml(tmp_path, tiny_model)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import time; from pathlib import Path; "
                               "from cai.core.folders import lock_dir; "
                               f"lock_dir(Path({str(run)!r})); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CaiError, match="another cai run"):
            run_pipeline(load_pipeline_config(path), where=str(path))
        assert sorted(p.name for p in run.iterdir()) == [".cai-lock"]
    finally:
        holder.kill()
        holder.wait()
