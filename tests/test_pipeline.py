"""`cai pipeline run`: stages cached by config and inputs, a constitution edit reruns only what
it reaches, a kill mid-stage loses nothing and doubles nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cai.core.errors import CaiError
from cai.pipeline import load_pipeline_config, plan, run_pipeline

from .conftest import HARMLESS, ROOT

CAI = str(Path(sys.executable).parent / "cai")
TINY = ROOT / "configs" / "tiny.yaml"


def _config(tmp_path: Path, tiny_model: Path, **over) -> Path:
    data = yaml.safe_load(TINY.read_text())
    spec = f"hf:{tiny_model}?progress=0"
    data.update(model=str(tiny_model), feedback_model=spec, out=str(tmp_path / "run"), **over)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _ids(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines() if x.strip()]


def test_plan_wires_folders(tmp_path, tiny_model) -> None:
    cfg = load_pipeline_config(_config(tmp_path, tiny_model))
    steps = {s.key: s for s in plan(cfg)}
    assert list(steps) == ["sl", "sft", "label", "pm", "rl", "dpo", "eval"]
    root = tmp_path / "run"
    assert steps["sft"].config.data == str(root / "sl")
    assert steps["label"].config.policy == str(root / "sft")
    assert steps["pm"].config.preferences == str(root / "label")
    assert steps["pm"].config.pairs == str(root / "sl")
    assert steps["rl"].config.model == str(root / "sft")
    assert steps["rl"].config.reward == f"pm:{root / 'pm'}"
    assert "rl-cai=" in steps["eval"].config.models and "dpo=" in steps["eval"].config.models
    two = plan(load_pipeline_config(_config(tmp_path, tiny_model, rounds=2)))
    keys = [s.key for s in two]
    assert "round-2/label" in keys and "round-2/rl" in keys
    r2 = {s.key: s for s in two}
    assert r2["round-2/label"].config.policy == str(root / "rl")
    assert r2["round-2/rl"].config.model == str(root / "rl")
    # Each step depends on the steps whose outputs it reads (round 2's RL on round 1's).
    assert r2["round-2/rl"].deps == ["rl", "round-2/pm"]
    assert r2["round-2/pm"].deps == ["round-2/label", "sl"]
    assert r2["dpo"].config.preferences == str(root / "label")  # labels of the SL-CAI policy
    assert f"rl-cai={root / 'round-2' / 'rl'}" in r2["eval"].config.models
    assert r2["eval"].config.reward == f"pm:{root / 'round-2' / 'pm'}"
    nopm = {s.key: s for s in plan(load_pipeline_config(_config(
        tmp_path, tiny_model, stages=["sl", "sft", "label", "rl", "eval"], sl_pairs_in_pm=False)))}
    assert nopm["rl"].config.reward == f"judge:hf:{tiny_model}?progress=0"
    assert nopm["eval"].config.reward is None and nopm["eval"].config.pm_eval is None
    assert all(getattr(s.config, "pairs", None) is None for s in nopm.values())


def test_bad_pipeline_config(tmp_path, tiny_model) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [sl, fly]\n")
    with pytest.raises(CaiError, match="unknown stage 'fly'"):
        load_pipeline_config(bad)
    bad.write_text("name: x\nsl:\n  roundz: 2\n")
    with pytest.raises(CaiError, match="roundz"):
        plan(load_pipeline_config(bad))
    r = subprocess.run([CAI, "pipeline", "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "roundz" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> dict:
    """The whole tiny pipeline (every stage), run once for the tests of this module; its
    constitution is a copy the edit test may change."""
    tmp_path = tmp_path_factory.mktemp("tiny-run")
    edited = tmp_path / "harmless-edited.yaml"
    edited.write_text(HARMLESS.read_text())
    cfg_path = _config(tmp_path, tiny_model, constitution=str(edited))
    first = run_pipeline(load_pipeline_config(cfg_path))
    return {"root": tmp_path / "run", "cfg_path": cfg_path, "constitution": edited, "first": first}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_heldout_eval_prompts_never_reach_training(tiny_run, tiny_model, tmp_path) -> None:
    from cai.core.data import load_prompts

    root = tiny_run["root"]
    split = tiny_run["first"]["prompt_split"]["sets"]["red_team"]
    train_ids = {it.id for it in load_prompts(split["train_file"])}
    eval_ids = {it.id for it in load_prompts(split["eval_file"])}
    everything = {it.id for it in load_prompts("red_team")}
    assert train_ids and eval_ids and not train_ids & eval_ids and train_ids | eval_ids == everything
    assert sorted(eval_ids) == split["eval_ids"]
    # What each stage actually read, from its records and manifest.
    ev = json.loads((root / "eval" / "manifest.json").read_text())
    seen_eval = set(ev["prompt_ids"]["red_team"])
    assert seen_eval and seen_eval <= eval_ids
    assert ev["upstream"]["red_team"]["path"] == split["eval_file"]
    sl = {r["prompt_id"] for r in _jsonl(root / "sl" / "data.jsonl")}
    label = {r["prompt_id"] for r in _jsonl(root / "label" / "responses.jsonl")}
    rl_m = json.loads((root / "rl" / "manifest.json").read_text())
    assert rl_m["upstream"]["prompts"]["path"] == split["train_file"]
    rl = {it.id for it in load_prompts(rl_m["config"]["prompts"], limit=rl_m["config"]["limit"])}
    for stage, ids in (("sl", sl), ("label", label), ("rl", rl)):
        assert ids and ids <= train_ids and not ids & seen_eval, stage
    eval_texts = {r["prompt"] for r in _jsonl(root / "eval" / "responses.jsonl")}
    train_texts = ({r["prompt"] for r in _jsonl(root / "sl" / "data.jsonl")}
                   | {r["prompt"] for r in _jsonl(root / "label" / "responses.jsonl")})
    assert eval_texts and not eval_texts & train_texts
    assert tiny_run["first"]["prompt_split"]["overlap"] == 0
    assert "Eval prompts found in a training stage's records: **0**" in (root / "report.md").read_text()
    # Without the split the same config evaluates on prompts SL and RL trained on.
    unsplit = {s.key: s.config for s in plan(load_pipeline_config(
        _config(tmp_path, tiny_model, eval_fraction=0)))}
    first_eval = {it.id for it in load_prompts(unsplit["eval"].red_team, limit=2)}
    assert first_eval & {it.id for it in load_prompts(unsplit["sl"].prompts, limit=3)}


def test_heldout_pm_split_in_the_pipeline(tiny_run) -> None:
    from cai.train.prefs import load_preference_file, prompt_key

    root = tiny_run["root"]
    rows = (load_preference_file(root / "label", "labels", "preferences.jsonl")
            + load_preference_file(root / "sl", "sl-pairs", "pairs.jsonl", default_p=1.0))
    key = {r["id"]: prompt_key(r["prompt"]) for r in rows}
    # Label pairs and SL pairs share prompts, so a split by pair could cut a prompt in two.
    assert len(set(key.values())) < len(rows)
    for stage in ("pm", "dpo"):
        report = json.loads((root / stage / "eval.json").read_text())
        held = {p["id"] for p in report["per_pair"]}
        assert held and held < set(key)
        held_prompts = {key[i] for i in held}
        train_prompts = {key[i] for i in key if i not in held}
        assert not held_prompts & train_prompts, stage
        assert sorted(held_prompts) == report["split"]["eval_prompt_keys"]
        assert report["split"]["by"] == "prompt"


def test_manifests_trace_every_input_back_to_the_constitution(tiny_run, tiny_model) -> None:
    """Every input of RL, DPO and the evaluation, data and models alike, is in the manifest's
    upstream with the data hash its own stage recorded, and the constitution stamp reaches
    RL through its SFT policy and its PM (RL reads no labelled data itself)."""
    root = tiny_run["root"]
    m = {s: json.loads((root / s / "manifest.json").read_text())
         for s in ("sl", "sft", "label", "pm", "rl", "dpo", "eval")}
    stamp = m["label"]["constitution"]
    assert stamp and stamp["hash"].startswith("sha256:") and m["sl"]["constitution"] == stamp

    def check(entry: dict, stage: str, folder: str) -> None:
        assert entry["stage"] == m[folder]["stage"] == stage, (entry, stage)
        assert entry["data_sha256"] == m[folder]["data"]["sha256"] and entry["data_sha256"]
        assert entry["constitution"] == stamp

    rl = m["rl"]["upstream"]
    assert rl["model"]["path"] == str(root / "sft") and rl["reward"]["path"] == f"pm:{root / 'pm'}"
    check(rl["model"], "sft", "sft")
    check(rl["reward"], "pm", "pm")
    assert rl["prompts"]["sha256"].startswith("sha256:")  # the prompt file itself
    assert m["rl"]["constitution"] == stamp
    dpo = m["dpo"]["upstream"]
    check(dpo["model"], "sft", "sft")
    check(dpo["preferences"], "label", "label")
    check(dpo["pairs"], "sl", "sl")
    assert m["dpo"]["constitution"] == stamp
    check(m["pm"]["upstream"]["preferences"], "label", "label")
    ev = m["eval"]["upstream"]
    check(ev["models.sl-cai"], "sft", "sft")
    check(ev["models.rl-cai"], "rl", "rl")
    check(ev["models.dpo"], "dpo", "dpo")
    check(ev["reward"], "pm", "pm")
    assert ev["models.base"]["path"] == str(tiny_model) and "stage" not in ev["models.base"]
    assert ev["models.base"]["identity"] and ev["feedback_model"]["identity"]  # no manifest


def test_report_tables_come_from_the_stages_results(tiny_run) -> None:
    """The PM's per-source accuracy and the side-by-side answers in report.md are the
    numbers and texts the stages wrote (eval.json `by_source`, examples.jsonl `responses`)."""
    root = tiny_run["root"]
    md = (root / "report.md").read_text()
    by_source = json.loads((root / "pm" / "eval.json").read_text())["by_source"]
    names = {"labels": "AI labels (chosen ≻ rejected)", "sl-pairs": "SL pairs (revision ≻ initial)"}
    assert set(by_source) == set(names)
    for src, v in by_source.items():
        acc = "–" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
        assert f"| {names[src]} | {v['pairs']} | {acc} |" in md
    example = _jsonl(root / "eval" / "examples.jsonl")[0]
    assert f"**Prompt:** {' '.join(example['prompt'].split())[:60]}" in md
    for model in example["responses"]:
        assert f"| {model} | " in md


def test_constitution_edit_reruns_only_what_it_reaches(tiny_run, monkeypatch) -> None:
    from transformers import PreTrainedModel

    edited, cfg_path, tmp_path = tiny_run["constitution"], tiny_run["cfg_path"], tiny_run["root"].parent
    stages = ["sl", "sft", "label", "pm", "rl", "dpo", "eval"]
    first = tiny_run["first"]
    assert [first["steps"][s]["status"] for s in stages] == ["ran"] * 7
    # A rerun with nothing changed loads no model and rewrites no stage output: a tripwire on
    # every model load, and each file's modification time before and after (the report's
    # figures, drawn again from the logs, aside).
    def stamps() -> dict[str, int]:
        return {str(f): f.stat().st_mtime_ns for s in stages
                for f in (tmp_path / "run" / s).rglob("*") if f.is_file() and f.suffix != ".png"}

    before = stamps()
    with monkeypatch.context() as m:
        def tripwire(*a, **k):
            raise AssertionError("a cached rerun loaded a model")
        m.setattr(PreTrainedModel, "from_pretrained", classmethod(tripwire))
        again = run_pipeline(load_pipeline_config(cfg_path))
    assert [again["steps"][s]["status"] for s in stages] == ["cached"] * 7
    assert stamps() == before
    # Edit one comparison principle: label and what follows rerun, sl and sft stay cached.
    data = yaml.safe_load(edited.read_text())
    data["rl"]["principles"][0]["text"] += " Think about who could be hurt."
    data["version"] = "9.9.9"
    edited.write_text(yaml.safe_dump(data, sort_keys=False))
    third = run_pipeline(load_pipeline_config(cfg_path), until="pm")  # rl on: same story, slower
    assert {s: third["steps"][s]["status"] for s in stages[:4]} == {
        "sl": "cached", "sft": "cached", "label": "ran", "pm": "ran"}
    lab = json.loads((tmp_path / "run" / "label" / "manifest.json").read_text())
    assert lab["constitution"]["version"] == "9.9.9"
    pm = json.loads((tmp_path / "run" / "pm" / "manifest.json").read_text())
    assert pm["constitution"]["version"] == "9.9.9"  # inherited from the new labels
    assert (tmp_path / "run" / "report.md").exists()


def test_kill_mid_stage_then_rerun_has_every_record_once(tmp_path, tiny_model) -> None:
    cfg_path = _config(tmp_path, tiny_model, stages=["sl", "sft", "label"])
    data = yaml.safe_load(cfg_path.read_text())
    data["sl"].update(limit=6, chunk_size=1)
    cfg_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([CAI, "pipeline", "run", str(cfg_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    sl_data = tmp_path / "run" / "sl" / "data.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if sl_data.exists() and len(_ids(sl_data)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(_ids(sl_data))
    assert 2 <= partial < 6
    r = subprocess.run([CAI, "pipeline", "run", str(cfg_path)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    for stage, n in (("sl", 6), ("label", 3)):
        ids = _ids(tmp_path / "run" / stage / "data.jsonl")
        assert len(ids) == len(set(ids)) == n, stage
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert {k: v["status"] for k, v in state["steps"].items()} == {
        "sl": "ran", "sft": "ran", "label": "ran"}


def test_heldout_report_says_when_there_is_no_split(tmp_path) -> None:
    from cai.report import write_report

    for fraction, overlap, needle in ((0.0, 3, "include **3** that a training stage read"),
                                      (0.25, 0, "training stage's records: **0**")):
        (tmp_path / "pipeline.json").write_text(json.dumps({"config": {"name": "x"}, "prompt_split": {
            "seed": 0, "eval_fraction": fraction, "sets": {}, "overlap": overlap}}))
        assert needle in write_report(tmp_path).read_text()
