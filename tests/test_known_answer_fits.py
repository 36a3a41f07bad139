"""The known-answer run's fits and intervals made honest (issue 29), and the CPU evidence:
PPO on a direct gold reward and on its negation moves the held-out gold both ways."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cai.core.errors import CaiError
from cai.evaluate.known_answer import (
    NOISE,
    negated_noisy_valence,
    noisy_valence,
    noisy_valence_judge,
    valence,
    valence_judge,
    valence_score,
)
from cai.evaluate.known_answer_run import (
    KnownAnswerConfig,
    examples,
    pair_accuracy,
    pair_accuracy_ci,
    rl_baseline,
    run_known_answer,
    summarise,
)
from cai.evaluate.overopt import MIN_R2, bon_sqrt_kl, fit_bon, fit_rl
from cai.train.rl import RLConfig, run_rl
from tests.test_train_rl import PROMPTS, boosted_model  # noqa: F401  (a fixture)

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

CAT = '''
def cats(prompt, response):
    return float(response.count("cat"))


def no_cats(prompt, response):
    return -cats(prompt, response)


def length(prompt, response):
    return float(len(response))
'''


@pytest.fixture
def cat_funcs(tmp_path: Path) -> Path:
    p = tmp_path / "cat_funcs.py"
    p.write_text(CAT, encoding="utf-8")
    return p


# --------------------------------------------------------------------------- the fits


def test_overopt_three_best_of_n_points_are_not_fitted() -> None:
    # n = 1, 2, 4: two parameters and R(0) = 0 pin three points exactly (R² = 1 whatever
    # the gold), so no fit is made; five points (n up to 16) are.
    rng = np.random.default_rng(0)
    d3, d5 = bon_sqrt_kl([1, 2, 4]), bon_sqrt_kl([1, 2, 4, 8, 16])
    with pytest.raises(CaiError, match="at least 5 points"):
        fit_bon(d3, rng.uniform(0, 1, 3), baseline=0.3)
    fit = fit_bon(d5, 0.3 + np.asarray(d5) * (0.5 - 0.2 * np.asarray(d5)), baseline=0.3)
    assert fit.points == 5 and fit.d == pytest.approx(d5) and fit.r2 == pytest.approx(1.0)


def test_overopt_poor_fit_or_peak_beyond_the_data_claims_no_peak() -> None:
    d = np.array(bon_sqrt_kl([1, 2, 4, 8, 16, 32]))
    # A clean curve whose maximum lies inside the data: the peak is claimed.
    inside = fit_bon(d, d * (1.0 - 0.6 * d))
    assert inside.peak_sqrt_kl == pytest.approx(1.0 / 1.2) and inside.no_peak is None
    assert inside.peak_in_range is True
    # The same form bending over only beyond the data: no peak.
    beyond = fit_bon(d, d * (1.0 - 0.1 * d))
    assert beyond.peak_sqrt_kl is None and beyond.peak_gold is None
    assert "beyond the data" in beyond.no_peak
    # Noise around a flat gold: R² low, no peak whatever the fitted β.
    gold = np.array([0.0, 0.3, -0.25, 0.28, -0.3, 0.2])
    noisy = fit_bon(d, gold)
    assert noisy.r2 < MIN_R2 and noisy.peak_sqrt_kl is None and "R²" in noisy.no_peak
    rl = fit_rl(np.linspace(0, 3, 7), [0.0, 0.4, -0.4, 0.4, -0.4, 0.4, -0.4])
    assert rl.peak_sqrt_kl is None and rl.no_peak


def test_overopt_fits_in_the_json_carry_their_points_r2_and_why_not(tmp_path: Path) -> None:
    # summarise on [prompts, k] arrays: best-of-n up to n = 16 (five points) is fitted and
    # reported with R² and its points; best-of-4 (three points) is reported as not fitted.
    rng = np.random.default_rng(3)
    prompts, k = 12, 16
    pm = rng.normal(size=(prompts, k))
    gold = (pm + rng.normal(size=(prompts, k)) > 0).astype(float)
    per = {"sl-cai": {"spec": "x", "n": k, "kl": np.zeros((prompts, k)), "examples": [],
                      "scores": {"gold": gold, "train_pm": pm}}}
    out = summarise(per, KnownAnswerConfig(samples=1, best_of=16, best_of_limit=8, n_boot=200))
    assert [r["n"] for r in out["best_of_n"]] == [1, 2, 4, 8, 16]
    assert out["best_of_n_prompts"] == 8
    # n = 1 is the mean of the first 8 prompts' answers: the baseline of the same prompts.
    assert out["best_of_n"][0]["gold"] == pytest.approx(gold[:8].mean())
    fit = out["bon_fit"]["bon"]
    assert fit["reported"] is True and fit["points"] == 5 and fit["r2"] is not None
    assert fit["baseline"] == pytest.approx(gold[:8].mean())
    small = summarise(per, KnownAnswerConfig(samples=1, best_of=4, n_boot=200))
    assert small["bon_fit"]["bon"] == {"reported": False, "points": 3,
                                       "reason": small["bon_fit"]["bon"]["reason"]}


def test_known_answer_rl_baseline_is_the_first_steps_gold_monitor() -> None:
    steps = [{"step": s, "sqrt_kl": 0.4 * (s - 1), "gold": 0.5 + 0.05 * s} for s in (3, 1, 2)]
    assert rl_baseline(steps) == pytest.approx(0.55)
    # No step before any update (a resumed or cut log): no baseline, so no fit.
    assert rl_baseline([{"step": 1, "sqrt_kl": 0.2, "gold": 0.5}]) is None
    assert rl_baseline([{"step": 2, "sqrt_kl": 0.0, "gold": 0.5}]) is None
    assert rl_baseline([]) is None


def test_known_answer_examples_pair_each_prompt_with_its_own_answer() -> None:
    class P:
        def __init__(self, i: int) -> None:
            self.prompt = f"prompt {i}"

    prompts, n = [P(i) for i in range(5)], 4
    which = [(i, j) for i in range(5) for j in range(n)]
    texts = [f"answer {i}-{j}" for i, j in which]
    gold = np.array([[10 * i + j for j in range(n)] for i in range(5)], dtype=float)
    rows = examples(prompts, which, texts, gold)
    assert [(r["prompt"], r["answer"], r["gold"]) for r in rows] == [
        ("prompt 0", "answer 0-0", 0.0), ("prompt 1", "answer 1-0", 10.0),
        ("prompt 2", "answer 2-0", 20.0)]
    # Ragged: the first prompts have more answers (best-of-n's extra SL samples).
    which = [(0, j) for j in range(4)] + [(1, 0), (2, 0)]
    rows = examples(prompts, which, [f"a{i}-{j}" for i, j in which], gold)
    assert [r["answer"] for r in rows] == ["a0-0", "a1-0", "a2-0"]


def test_known_answer_pm_gold_accuracy_interval_resamples_prompts() -> None:
    # One prompt with many pairs all right, nine with one pair each all wrong: the pooled
    # accuracy is high, but it rests on one prompt, and the interval over prompts says so.
    many = ([float(i) for i in range(10)], [float(i) for i in range(10)])  # 45 pairs, right
    groups = [many] + [([1.0, 0.0], [0.0, 1.0])] * 9
    acc = pair_accuracy_ci(groups, 2000, 0)
    assert acc["accuracy"] == pytest.approx(pair_accuracy(groups)["accuracy"])
    assert acc["accuracy"] == pytest.approx(45 / 54) and acc["pairs"] == 54
    assert acc["ci_low"] < 0.5 < acc["accuracy"] <= acc["ci_high"]
    # Ten prompts alike: a tight interval around the same pooled figure.
    even = [([float(i) for i in range(4)], [float(i) for i in range(4)])] * 10
    tight = pair_accuracy_ci(even, 500, 0)
    assert tight["ci_low"] == tight["ci_high"] == tight["accuracy"] == 1.0
    assert pair_accuracy_ci([([1.0, 2.0], [0.0, 0.0])], 200, 0)["ci_low"] is None


# --------------------------------------------------------------------------- the gold


def test_known_answer_valence_scores_every_answer_graded_with_a_noisy_twin() -> None:
    assert valence("Thank you, I am happy to help.") > valence("Thank you.") > 0
    assert valence("I hate this, it is awful.") < valence("I hate this.") < 0
    assert valence("The sky is blue.") == 0.0 and valence("warm") > 0 > valence("war")
    assert valence_score("any prompt", "kind and gentle") == valence("kind and gentle")
    answers = ["so kind and helpful", "a terrible, cruel war", "plain words", "good but sad"]
    for a in answers:
        n = noisy_valence("p", a)
        assert abs(n - valence(a)) <= NOISE and n == noisy_valence("p", a)  # fixed noise
        assert negated_noisy_valence("p", a) == -n
    noise = [noisy_valence(f"p{i}", "plain words") for i in range(50)]
    assert max(noise) - min(noise) > NOISE  # the noise is there, varying by prompt
    assert valence_judge("p", answers[0], answers[1]) == 1.0
    assert valence_judge("p", answers[2], answers[2]) == 0.5
    for a, b in [(answers[0], answers[1]), (answers[3], answers[2])]:
        assert noisy_valence_judge("p", a, b) == pytest.approx(1 - noisy_valence_judge("p", b, a))


# --------------------------------------------------------------------------- monitors


@pytest.mark.slow
def test_monitors_two_processes_average_the_whole_batch(tiny_model: Path, cat_funcs: Path,
                                                        tmp_path: Path) -> None:
    """Under `accelerate launch` with 2 processes each scores half of the batch: the logged
    monitor must be the whole batch's mean. The monitor is the reward itself, whose logged
    mean is gathered over the batch, so the two must agree."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "two"
    monitors = tmp_path / "monitors.yaml"  # a list field: given in the YAML
    monitors.write_text(f'monitors: ["same=python:{cat_funcs}:length"]\n', encoding="utf-8")
    r = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
         str(ROOT / "configs" / "accelerate" / "cpu2.yaml"), "-m", "cai.cli", "train", "rl",
         "--algo", "ppo", "--model", str(tiny_model), "--reward", f"python:{cat_funcs}:length",
         "--config", str(monitors), "--prompts", str(prompts),
         "--out", str(out), "--steps", "2", "--batch-size", "4", "--minibatch-size", "2",
         "--ppo-epochs", "1", "--max-new-tokens", "8", "--lora-r", "4", "--lora-alpha", "8",
         "--save-every", "0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for row in log:
        assert row["monitor/same"] == pytest.approx(row["reward_mean"], abs=1e-6)
    assert any(row["reward_std"] > 0 for row in log)  # the halves differ: the check has teeth


# --------------------------------------------------------------------------- the CPU evidence


def test_known_answer_direct_reward_and_its_negation_move_the_held_out_gold_both_ways(
        boosted_model: tuple[Path, int], cat_funcs: Path, tmp_path: Path) -> None:  # noqa: F811
    """The path `make known-answer` takes on the CPU, on the tiny model: PPO on a graded
    gold as a `python:` reward and on its negation, saved, then `cai eval known-answer`
    against SL-CAI on the run's held-out prompts with intervals over prompts. A sign error
    anywhere in the RL path fails one of the two."""
    path, _ = boosted_model
    run = tmp_path / "run"
    shutil.copytree(path, run / "sft")
    (run / "prompts").mkdir()
    lines = "".join(json.dumps({"id": f"e{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
    (run / "prompts" / "red_team.train.jsonl").write_text(lines)
    (run / "prompts" / "red_team.eval.jsonl").write_text(lines)
    # The labels' judge sits beside the gold (a planted gold); no PM, RL-on-PM or DPO stage.
    (run / "pipeline.json").write_text(json.dumps({"config": {
        "model": str(path), "stages": ["sl", "sft"],
        "feedback_model": f"python:{cat_funcs}:cats"}}))
    for folder, fn in (("rl-direct", "cats"), ("rl-direct-negated", "no_cats")):
        run_rl(RLConfig(algo="ppo", model=str(run / "sft"), reward=f"python:{cat_funcs}:{fn}",
                        prompts=str(run / "prompts" / "red_team.train.jsonl"),
                        out=str(run / folder), beta=0.02, steps=12, batch_size=8,
                        minibatch_size=4, ppo_epochs=2, max_new_tokens=10, learning_rate=5e-4,
                        lora=False, save_every=0, seed=0,
                        monitors=[f"gold=python:{cat_funcs}:cats"]))
    run_known_answer(KnownAnswerConfig(run=str(run), gold=f"python:{cat_funcs}:cats",
                                       samples=4, best_of=1, max_new_tokens=10,
                                       batch_size=16, n_boot=500, base=False))
    result = json.loads((run / "known-answer" / "known_answer.json").read_text())
    up, down = result["rl_direct_minus_sl_gold"], result["rl_direct_negated_minus_sl_gold"]
    assert up["prompts"] == down["prompts"] == len(PROMPTS)
    assert up["ci_low"] > 0, up
    assert down["ci_high"] < 0, down
    # base=False leaves the base model out (the writer test scores it with the default).
    assert set(result["policies"]) == {"sl-cai", "rl-direct", "rl-direct-negated"}
    assert result["base_rate"] is None
    assert result["policies"]["rl-direct"]["kl_from_sl"] > 0.01


def test_known_answer_gpu_config_plans_and_its_checks_read_the_targets() -> None:
    """configs/known-answer-gpu.yaml plans with the graded gold and its noisy labeller, and
    benchmarks/gpu_known_answer.py's checks pass a json that meets every target and fail
    one that misses each (the run itself needs a GPU)."""
    import importlib.util

    from cai.pipeline import load_pipeline_config, plan

    steps = {s.stage: s.config for s in plan(load_pipeline_config(
        ROOT / "configs" / "known-answer-gpu.yaml"))}
    assert steps["label"].feedback_model.endswith("known_answer:noisy_valence_judge")
    assert steps["rl"].rollout_engine == "vllm" and steps["pm"].split == "halves"
    spec = importlib.util.spec_from_file_location(
        "gpu_known_answer", ROOT / "benchmarks" / "gpu_known_answer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fit = {"reported": True, "points": 6}
    good = {"pm_gold_accuracy": 0.9, "rl_minus_sl_gold": {"ci_low": 0.1},
            "dpo_minus_sl_gold": {"ci_low": 0.05}, "rl_direct_minus_sl_gold": {"ci_low": 0.2},
            "rl_direct_negated_minus_sl_gold": {"ci_high": -0.2},
            "bon_fit": {"bon": fit, "rl": fit}, "rl_fit": {"rl": fit, "bon": fit}}
    assert all(mod.checks(good).values())
    misses = [("pm_gold_accuracy", 0.84), ("rl_minus_sl_gold", {"ci_low": -0.01}),
              ("dpo_minus_sl_gold", None), ("rl_direct_negated_minus_sl_gold", {"ci_high": 0.0}),
              ("rl_fit", {"rl": {"reported": True, "points": 4}}),
              ("bon_fit", {"bon": {"reported": False, "points": 3}})]
    for key, value in misses:
        assert not all(mod.checks({**good, key: value}).values()), key
