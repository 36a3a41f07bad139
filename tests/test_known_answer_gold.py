"""The shipped known-answer gold (`cai.evaluate.known_answer`): the exact gold, its noisy labeller
(shrunk towards ½, a fixed share of pairs reversed, exact 1 − p on a swap), both run
through the label code by spec, and `configs/known-answer.yaml` plans with them wired."""

from __future__ import annotations

import random

import pytest

from cai.backends import load_backend
from cai.constitution import load
from cai.core.data import PairItem
from cai.evaluate.known_answer import FLIP_RATE, SHRINK, flipped, gold_judge, gold_score, noisy_judge
from cai.judge import JudgeConfig, judge_pairs

from .conftest import MINIMAL, ROOT

DECLINE = "I can't help with that, but I can point you to safer options."
COMPLY = "Sure, here is how you do it: first get the tools."


def test_known_answer_gold_prefers_the_answer_that_steers_to_safety() -> None:
    assert gold_score("p", DECLINE) == 1.0 and gold_score("p", COMPLY) == 0.0
    assert gold_score("p", "Maybe talk it over with a counsellor first.") == 1.0
    assert gold_score("p", "Hit him hard on the nose, then run.") == 0.0
    assert gold_score("p", "A SAFER way is to ask.") == 1.0  # any case, any ending
    assert gold_judge("p", DECLINE, COMPLY) == 1.0 and gold_judge("p", COMPLY, DECLINE) == 0.0
    assert gold_judge("p", DECLINE, DECLINE + " Sorry.") == 0.5
    assert gold_judge("p", COMPLY, COMPLY + " Done.") == 0.5


def _pairs(n: int) -> list[tuple[str, str, str]]:
    rng = random.Random(3)
    return [(f"request {i}", f"{DECLINE} ({rng.random():.6f})", f"{COMPLY} ({rng.random():.6f})")
            for i in range(n)]


def test_known_answer_noisy_judge_shrinks_flips_a_stated_share_and_swaps_exactly() -> None:
    pairs = _pairs(4000)
    ps = [noisy_judge(p, a, b) for p, a, b in pairs]
    assert {round(p, 12) for p in ps} == {round(0.5 + SHRINK / 2, 12), round(0.5 - SHRINK / 2, 12)}
    reversed_share = sum(p < 0.5 for p in ps) / len(ps)
    # Binomial(4000, 0.15): sd 0.0056; 4 sd either side.
    assert abs(reversed_share - FLIP_RATE) < 0.023
    for p, a, b in pairs[:200]:
        assert noisy_judge(p, b, a) == 1.0 - noisy_judge(p, a, b)
        assert flipped(p, a, b) == flipped(p, b, a)
    # Ties stay ties, flipped or not.
    assert {noisy_judge(p, a, a + "!") for p, a, _ in pairs[:200]} == {0.5}


def test_known_answer_judges_label_through_the_label_code_by_spec() -> None:
    c = load(MINIMAL)
    items = [PairItem(f"k{i}", p, a, b) for i, (p, a, b) in enumerate(_pairs(40))]
    cfg = JudgeConfig(principles=2)
    gold = judge_pairs(items, c, load_backend("python:cai.evaluate.known_answer:gold_judge",
                                              reuse=False), cfg, 0)
    noisy = judge_pairs(items, c, load_backend("python:cai.evaluate.known_answer:noisy_judge", reuse=False),
                        cfg, 0)
    assert all(r.p_a == 1.0 and r.chosen == r.response_a for r in gold)
    agree = [n.chosen == g.chosen for n, g in zip(noisy, gold)]
    assert [not a for a in agree] == [flipped(i.prompt, i.response_a, i.response_b) for i in items]
    assert all(r.p_chosen == pytest.approx(0.5 + SHRINK / 2) for r in noisy)
    assert noisy[0].provenance.model.startswith("python:cai.evaluate.known_answer:noisy_judge@")


def test_known_answer_config_plans_with_the_noisy_labeller_and_the_gold_judge() -> None:
    from cai.pipeline import load_pipeline_config, plan

    cfg = load_pipeline_config(ROOT / "configs" / "known-answer.yaml")
    steps = {s.stage: s.config for s in plan(cfg)}
    assert list(steps) == ["sl", "sft", "label", "pm", "rl", "dpo", "eval"]
    assert steps["label"].feedback_model == "python:cai.evaluate.known_answer:noisy_valence_judge"
    assert steps["eval"].judge_model == "python:cai.evaluate.known_answer:valence_judge"
    assert "gold=python:cai.evaluate.known_answer:valence_score" in steps["rl"].monitors
    assert steps["pm"].pairs is None and steps["dpo"].pairs is None  # labels only


def test_known_answer_pipeline_takes_python_judges_end_to_end(tiny_model, tmp_path) -> None:
    """The tiny run with the noisy labeller as the pipeline's feedback model and the gold as
    the evaluation's judge: each stage names the function's identity."""
    import json

    import yaml

    from cai.core.models import model_identity
    from cai.pipeline import load_pipeline_config, run_pipeline

    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(model=str(tiny_model), feedback_model="python:cai.evaluate.known_answer:noisy_judge",
                out=str(tmp_path / "run"))
    data["eval"] = {**data.get("eval", {}), "judge_model": "python:cai.evaluate.known_answer:gold_judge"}
    path = tmp_path / "ka.yaml"
    path.write_text(yaml.safe_dump(data))
    run_pipeline(load_pipeline_config(path))
    root = tmp_path / "run"
    label = json.loads((root / "label" / "manifest.json").read_text())
    assert label["models"]["feedback"] == model_identity("python:cai.evaluate.known_answer:noisy_judge")
    assert label["counts"]["records"] > 0
    report = json.loads((root / "eval" / "report.json").read_text())
    assert report["feedback_model"] == model_identity("python:cai.evaluate.known_answer:gold_judge")


def test_known_answer_pipeline_cache_key_follows_the_judge_source(tmp_path) -> None:
    """Editing a python: labeller's file reruns the label stage (its spec string is the
    same, its identity is not); an unrelated edit elsewhere does not."""
    import yaml

    from cai.pipeline import cache_key, load_pipeline_config, plan

    judge = tmp_path / "judge.py"
    judge.write_text("def f(prompt, a, b, principle):\n    return 0.5\n")
    other = tmp_path / "other.py"
    other.write_text("X = 1\n")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "k", "stages": ["label"], "out": str(tmp_path / "run"),
                                    "feedback_model": f"python:{judge}:f"}))

    def key() -> str:
        (step,) = plan(load_pipeline_config(path))
        return cache_key(step, {})

    first = key()
    other.write_text("X = 2\n")
    assert key() == first
    judge.write_text("def f(prompt, a, b, principle):\n    return 0.25\n")
    assert key() != first
