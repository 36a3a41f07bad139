"""The known-answer run's new pieces: the PM's train/test halves, RL monitors, and the
known_answer.json writer (`cai eval known-answer`), on the tiny random model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cai.core.errors import CaiError
from cai.evaluate.known_answer_run import (
    KnownAnswerConfig,
    best_of_n,
    bootstrap_mean,
    pair_accuracy,
    run_known_answer,
)
from cai.evaluate.overopt import fit_rl
from cai.train.monitors import parse_monitor
from cai.train.pm import PMConfig, run_pm
from cai.train.pm_halves import split_halves
from cai.train.prefs import prompt_key
from cai.train.rl import RLConfig, run_rl
from tests.test_train_rl import PROMPTS, boosted_model  # noqa: F401  (a fixture)

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

FUNCS = '''
def cat_rate(prompt, response):
    words = [w.strip(".,!?").lower() for w in response.split()]
    return sum(w == "cat" for w in words) / max(len(words), 1)


def no_cat(prompt, response):
    return -cat_rate(prompt, response)


def has_cat(prompt, response):
    return 1.0 if cat_rate(prompt, response) > 0 else 0.0


def cat_judge(prompt, response_a, response_b, principle=""):
    return 0.5 + 0.5 * (has_cat(prompt, response_a) - has_cat(prompt, response_b))
'''


@pytest.fixture
def funcs(tmp_path: Path) -> Path:
    p = tmp_path / "funcs.py"
    p.write_text(FUNCS, encoding="utf-8")
    return p


def _rows(n_prompts: int, per: int) -> list[dict]:
    return [{"id": f"p{i}-{j}", "prompt": [{"role": "user", "content": f"prompt {i}"}],
             "chosen": [{"role": "assistant", "content": f"a{j}"}],
             "rejected": [{"role": "assistant", "content": f"b{j}"}], "p_chosen": 0.8,
             "weight": 1.0, "source": "labels"} for i in range(n_prompts) for j in range(per)]


def test_known_answer_halves_split_is_disjoint_by_prompt_and_covers_all() -> None:
    rows = _rows(11, 3)
    train, test = split_halves(rows, seed=0)
    keys = [{prompt_key(r["prompt"]) for r in half} for half in (train, test)]
    assert not keys[0] & keys[1]  # no prompt teaches both PMs
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in rows)  # covers all
    assert (len(keys[0]), len(keys[1])) == (6, 5)  # half the prompts, the odd one to train
    # The split follows the prompts, not the row order; another seed gives other halves.
    again = split_halves(list(reversed(rows)), seed=0)
    assert {r["id"] for r in again[1]} == {r["id"] for r in test}
    other = split_halves(rows, seed=1)
    assert {r["id"] for r in other[1]} != {r["id"] for r in test}
    with pytest.raises(CaiError, match="at least two prompts"):
        split_halves(_rows(1, 4), seed=0)


def test_known_answer_pm_split_halves_saves_a_test_pm_the_monitor_finds(
        tiny_model: Path, tmp_path: Path) -> None:
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in _rows(8, 2)), encoding="utf-8")
    kw = dict(preferences=str(prefs), model=str(tiny_model), lora=False, max_steps=2,
              batch_size=2, eval_fraction=0.25, max_length=32)
    halves = tmp_path / "pm-halves"
    run_pm(PMConfig(out=str(halves), split="halves", **kw))
    train_eval = json.loads((halves / "eval.json").read_text())
    test_eval = json.loads((halves / "test" / "eval.json").read_text())
    # Both PMs are scored on the same held-out pairs; they trained on disjoint halves.
    assert train_eval["split"]["eval_prompt_keys"] == test_eval["split"]["eval_prompt_keys"]
    assert train_eval["split"]["train_prompts"] == 3 and test_eval["split"]["train_prompts"] == 3
    assert (halves / "test" / "model.safetensors").is_file()
    assert parse_monitor("test-pm", f"pm:{halves}") == ("test_pm", f"pm:{halves / 'test'}")
    # Unset, one PM on all six training prompts and no test folder; the monitor says why.
    whole = tmp_path / "pm-whole"
    run_pm(PMConfig(out=str(whole), **kw))
    assert json.loads((whole / "eval.json").read_text())["split"]["train_prompts"] == 6
    assert not (whole / "test").exists()
    with pytest.raises(CaiError, match="split: halves"):
        parse_monitor("test-pm", f"pm:{whole}")
    with pytest.raises(CaiError, match="must be one of"):
        PMConfig(split="thirds")


def test_known_answer_monitors_are_logged_and_do_not_change_the_update(
        boosted_model: tuple[Path, int], funcs: Path, tmp_path: Path) -> None:  # noqa: F811
    path, _ = boosted_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    kw = dict(algo="ppo", model=str(path), reward=f"python:{funcs}:cat_rate",
              prompts=str(prompts), beta=0.0, steps=3, batch_size=4, minibatch_size=2,
              ppo_epochs=1, max_new_tokens=8, learning_rate=1e-3, lora=False, save_every=0,
              seed=0)
    run_rl(RLConfig(out=str(tmp_path / "plain"), **kw))
    run_rl(RLConfig(out=str(tmp_path / "watched"),
                    monitors=[f"python:{funcs}:no_cat", f"seen=python:{funcs}:has_cat"], **kw))
    plain = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (tmp_path / "watched" / "model.safetensors").read_bytes() == plain
    logs = {k: [json.loads(x) for x in (tmp_path / k / "log.jsonl").open()]
            for k in ("plain", "watched")}
    assert len(logs["watched"]) == 3
    for p, w in zip(logs["plain"], logs["watched"]):
        assert not any(k.startswith("monitor/") for k in p)
        assert w["reward_mean"] == p["reward_mean"]
        # Scored on the very batch the reward saw: no_cat is the reward's negation.
        assert w["monitor/no_cat"] == pytest.approx(-w["reward_mean"], abs=1e-6)
        assert 0.0 <= w["monitor/seen"] <= 1.0
    assert any(w["reward_mean"] > 0 for w in logs["watched"])  # the check has teeth
    manifest = json.loads((tmp_path / "watched" / "manifest.json").read_text())
    assert set(manifest["monitors"]) == {"no_cat", "seen"}
    with pytest.raises(CaiError, match="PPO only"):
        RLConfig(algo="rloo", monitors=["python:x.py:f"], batch_size=4, num_generations=2)


def test_known_answer_statistics_by_hand() -> None:
    # PM against the gold: pairs the gold splits only; a PM tie is half right.
    acc = pair_accuracy([([3.0, 1.0, 2.0], [1.0, 0.0, 0.0]), ([1.0, 1.0], [0.0, 1.0]),
                         ([0.0, 5.0], [1.0, 1.0])])
    assert acc == {"accuracy": pytest.approx(2.5 / 3), "pairs": 3}
    # Best-of-n keeps the proxy's pick in each disjoint group of n.
    proxy = np.array([[0.0, 2.0, 1.0, 3.0]])
    gold = np.array([[1.0, 0.0, 1.0, 1.0]])
    rows = best_of_n(proxy, {"gold": gold, "train_pm": proxy})
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert [r["gold"] for r in rows] == [0.75, 0.5, 1.0]
    assert [r["train_pm"] for r in rows] == [1.5, 2.5, 3.0]
    assert rows[0]["sqrt_kl"] == 0.0 and rows[2]["kl"] == pytest.approx(np.log(4) - 0.75)
    b = bootstrap_mean(np.array([0.0, 1.0] * 50), 500, 0)
    assert b["mean"] == 0.5 and b["ci_low"] < 0.5 < b["ci_high"] and b["ci_high"] - b["ci_low"] < 0.3


def _tiny_pm(tmp: Path, tiny_model: Path) -> Path:
    """A train PM and a test PM (halves) on the tiny model, one step each, in `tmp/pm`."""
    prefs = tmp / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in _rows(8, 2)), encoding="utf-8")
    pm = tmp / "pm"
    run_pm(PMConfig(preferences=str(prefs), model=str(tiny_model), out=str(pm), split="halves",
                    lora=False, max_steps=1, batch_size=2, eval_fraction=0.25, max_length=32))
    return pm


def _fake_run(tmp_path: Path, policy: Path, pm: Path, judge: str) -> Path:
    """A run folder as the known-answer pipeline leaves it, with tiny models, labelled by
    `judge` (the planted gold)."""
    run = tmp_path / "run"
    for name in ("sft", "rl", "dpo"):
        shutil.copytree(policy, run / name)
    shutil.copytree(pm, run / "pm")
    (run / "prompts").mkdir()
    (run / "prompts" / "red_team.eval.jsonl").write_text(
        "".join(json.dumps({"id": f"e{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    (run / "pipeline.json").write_text(json.dumps({"config": {"model": str(policy),
                                                              "feedback_model": judge}}))
    (run / "rl" / "log.jsonl").write_text("".join(
        json.dumps({"step": s, "sqrt_kl": 0.3 * (s - 1), "reward_mean": 0.1 * s,
                    "monitor/test_pm": 0.05 * s, "monitor/gold": 0.2 + 0.1 * s - 0.01 * s * s})
        + "\n" for s in range(1, 7)))
    return run


def test_known_answer_writer_on_a_tiny_run(boosted_model: tuple[Path, int], tiny_model: Path,  # noqa: F811
                                           funcs: Path, tmp_path: Path) -> None:
    path, _ = boosted_model
    run = _fake_run(tmp_path, path, _tiny_pm(tmp_path, tiny_model), f"python:{funcs}:cat_judge")
    bench = tmp_path / "bench" / "known_answer.json"
    manifest = run_known_answer(KnownAnswerConfig(
        run=str(run), json=str(bench), gold=f"python:{funcs}:has_cat", samples=2, best_of=4,
        max_new_tokens=6, batch_size=8, n_boot=200))
    result = json.loads(bench.read_text())
    assert result == json.loads((run / "known-answer" / "known_answer.json").read_text())
    assert manifest["stage"] == "eval-known-answer"
    for key in ("rl_minus_sl_gold", "dpo_minus_sl_gold"):
        d = result[key]
        assert d["ci_low"] <= d["mean"] <= d["ci_high"] and d["prompts"] == len(PROMPTS)
    # rl, dpo and sl-cai are one model: no KL between them; the base is the same model too.
    assert set(result["policies"]) == {"base", "sl-cai", "rl-cai", "dpo"}
    assert all(abs(p["kl_from_sl"]) < 1e-3 for p in result["policies"].values())
    assert 0 <= result["base_rate"] <= 1 and result["wall_s"] > 0
    # Without `started`, wall_s is the stages' own times (listed per folder) plus the eval's.
    stages_s = result["machine"]["stages_s"]
    assert stages_s["pm"] > 0 and "known-answer" not in stages_s
    assert result["wall_s"] >= sum(stages_s.values()) + result["machine"]["eval_s"] - 0.2
    assert result["pm_gold_accuracy"] is None or 0 <= result["pm_gold_accuracy"] <= 1
    assert [r["n"] for r in result["best_of_n"]] == [1, 2, 4]
    assert set(result["bon_fit"]) == {"bon", "rl"} and set(result["rl_fit"]) == {"rl", "bon"}
    # Three best-of-n points are too few to fit two parameters honestly: no fit, and why.
    assert result["bon_fit"]["bon"]["reported"] is False
    assert "at least 5 points" in result["bon_fit"]["bon"]["reason"]
    # The RL fit is through the log's (sqrt KL, gold monitor) points, from the gold monitor
    # of its own first step (d = 0), not from a gold rate measured on other prompts.
    steps = [json.loads(x) for x in (run / "rl" / "log.jsonl").open()]
    want = fit_rl([e["sqrt_kl"] for e in steps], [e["monitor/gold"] for e in steps],
                  baseline=steps[0]["monitor/gold"])
    got, want_d = dict(result["rl_fit"]["rl"]), want.as_dict()
    assert got.pop("reported") is True and set(got) == set(want_d)
    for key in ("d", "gold"):  # the points used, listed
        assert got.pop(key) == pytest.approx(want_d.pop(key))
    assert got == pytest.approx(want_d)
    assert got["points"] == 6 and got["r2"] is not None
    assert [r["gold"] for r in result["rl_steps"]] == [e["monitor/gold"] for e in steps]
    assert result["provenance"]["gold"].startswith(f"python:{funcs}:has_cat@")
    assert (run / "known-answer" / "known_answer.png").stat().st_size > 10_000
    report = (run / "known-answer" / "report.md").read_text()
    assert "RL (on the PM) − SL gold" in report and "| curve, form | points |" in report


def test_known_answer_cli_bad_run_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cai.cli", "eval", "known-answer",
                           str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "red_team.eval.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists()
