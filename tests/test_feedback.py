"""RLAIF labels: swap symmetry, seeded distinct principles, flags, modes, exact recomputation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cai.constitution import load
from cai.core.data import PairItem
from cai.core.errors import CaiError
from cai.judge import COT_CLAMP, JudgeConfig, judge_pairs, p_response_a
from cai.label import LabelConfig, run_label

from .conftest import HARMLESS, MINIMAL

PAIRS = [
    PairItem("p0", "How can I get into my neighbour's shed?", "Ask them for the key.",
             "Break the lock with a hammer when they are out."),
    PairItem("p1", "Say something mean about my coworker.",
             "I'd rather not insult anyone; want help raising the issue with them kindly?",
             "They are useless and everyone knows it."),
    PairItem("p2", "What is 2 + 2?", "4.", "5, obviously."),
]


SEED = 3


def _judge(**kw) -> JudgeConfig:
    return JudgeConfig(**{"principles": 4, **kw})


def _swap(p: PairItem) -> PairItem:
    return PairItem(p.id, p.prompt, p.response_b, p.response_a)


@pytest.mark.parametrize("orders", ["both", "one"])
def test_swapping_responses_gives_one_minus_p(tiny_backend, orders: str) -> None:
    c = load(HARMLESS)
    cfg = _judge(orders=orders)
    a = judge_pairs(PAIRS, c, tiny_backend, cfg, SEED)
    b = judge_pairs([_swap(p) for p in PAIRS], c, tiny_backend, cfg, SEED)
    for x, y in zip(a, b):
        assert abs(x.p_a - (1 - y.p_a)) < 1e-4
        assert {j.principle for j in x.judgements} == {j.principle for j in y.judgements}
        assert x.chosen == y.chosen or abs(x.p_a - 0.5) < 1e-4


def test_principles_distinct_seeded_and_both_orders(tiny_backend) -> None:
    c = load(HARMLESS)
    recs = judge_pairs(PAIRS, c, tiny_backend, _judge(), SEED)
    again = judge_pairs(PAIRS, c, tiny_backend, _judge(), SEED)
    other = judge_pairs(PAIRS, c, tiny_backend, _judge(), 4)
    ids = {p.id for p in c.rl_principles}
    for r, r2 in zip(recs, again):
        principles = [j.principle for j in r.judgements if j.order == "ab"]
        assert len(principles) == 4 == len(set(principles)) and set(principles) <= ids
        assert sorted(j.order for j in r.judgements) == ["ab"] * 4 + ["ba"] * 4
        assert r.model_dump(exclude={"provenance"}) == r2.model_dump(exclude={"provenance"})
    assert [sorted(j.principle for j in r.judgements) for r in recs] != \
        [sorted(j.principle for j in r.judgements) for r in other]
    # The pair's p is the mean over principles of the both-order average.
    r = recs[0]
    per = [np.mean([j.p_first if j.order == "ab" else 1 - j.p_first
                    for j in r.judgements if j.principle == pid])
           for pid in {j.principle for j in r.judgements}]
    assert abs(r.p_a - np.mean(per)) < 1e-12
    assert r.p_chosen == max(r.p_a, 1 - r.p_a)


def test_random_judge_is_flagged_low_mass(tiny_backend) -> None:
    # A random 2-layer model spreads its mass over 49k tokens: almost none on "A"/"B".
    recs = judge_pairs(PAIRS, load(HARMLESS), tiny_backend, _judge(), SEED)
    assert all("low-mass" in r.flags for r in recs)
    assert all(j.mass < 0.01 for r in recs for j in r.judgements)


def test_tie_threshold_flags(tiny_backend) -> None:
    recs = judge_pairs(PAIRS, load(HARMLESS), tiny_backend, _judge(tie_threshold=0.49), SEED)
    assert all("tie" in r.flags for r in recs if abs(r.p_a - 0.5) < 0.49)


def test_cot_mode_clamps_and_keeps_reasoning(tiny_backend) -> None:
    recs = judge_pairs(PAIRS[:2], load(MINIMAL), tiny_backend,
                       _judge(mode="cot", principles=2, cot_max_new_tokens=6), SEED)
    for r in recs:
        assert all(COT_CLAMP[0] <= j.p_first <= COT_CLAMP[1] for j in r.judgements)
        assert all(j.reasoning is not None for j in r.judgements)
        assert COT_CLAMP[0] <= r.p_a <= COT_CLAMP[1]


def test_score_mode_gives_ratings_in_range(tiny_backend) -> None:
    recs = judge_pairs(PAIRS[:2], load(MINIMAL), tiny_backend,
                       _judge(mode="score", principles=2), SEED)
    for r in recs:
        assert set(r.scores) == {"a", "b"} and all(1 <= v <= 10 for v in r.scores.values())
        assert abs(r.p_a - 1 / (1 + np.exp(r.scores["b"] - r.scores["a"]))) < 1e-9


def test_config_errors() -> None:
    with pytest.raises(CaiError, match="mode"):
        JudgeConfig(mode="vibes")
    with pytest.raises(CaiError, match="exactly one"):
        LabelConfig(pairs="x", prompts="y", policy="z")
    with pytest.raises(CaiError, match="policy"):
        LabelConfig(prompts="y")


def test_run_label_resume_and_outputs(tmp_path: Path, tiny_backend) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p.prompt, "response_a": p.response_a,
                                         "response_b": p.response_b}) + "\n" for p in PAIRS))
    cfg = LabelConfig(pairs=str(pairs), constitution=str(HARMLESS), judge=_judge(), seed=SEED,
                      out=str(tmp_path / "lab"), limit=2)
    m = run_label(cfg, tiny_backend)
    assert m["counts"] == {"records": 2, "new": 2}
    m = run_label(dataclasses.replace(cfg, limit=None), tiny_backend)
    assert m["counts"] == {"records": 3, "new": 1}
    stats = m["label_stats"]
    assert set(stats) >= {"position_inconsistency_rate", "mean_abs_p_minus_half", "low_mass_rate", "tie_rate"}
    prefs = [json.loads(x) for x in (tmp_path / "lab" / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == 3 and all({"prompt", "chosen", "rejected", "p_chosen"} <= set(p) for p in prefs)
    assert all(p["p_chosen"] >= 0.5 for p in prefs)


def test_pairs_sampled_from_a_policy(tmp_path: Path, tiny_backend, tiny_model) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Hello?"}\n{"id": "b", "prompt": "Why?"}\n')
    cfg = LabelConfig(prompts=str(prompts), policy=f"hf:{tiny_model}", responses_per_prompt=3,
                      max_new_tokens=4, constitution=str(MINIMAL), judge=_judge(principles=2),
                      out=str(tmp_path / "lab"))
    m = run_label(cfg, tiny_backend)
    assert m["counts"]["records"] == 6  # 2 prompts x C(3, 2) pairs
    assert len((tmp_path / "lab" / "responses.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_kept_prompt_recomputes_with_plain_transformers(tmp_path: Path, embedded_path: Path) -> None:
    """Anyone can recompute a label from the stored text with nothing but transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.backends import load_backend

    backend = load_backend("embedded:smollm2-135m")
    rec = judge_pairs(PAIRS[:1], load(HARMLESS), backend, _judge(principles=2, keep_prompts=True),
                      SEED)[0]
    tok = AutoTokenizer.from_pretrained(str(embedded_path))
    model = AutoModelForCausalLM.from_pretrained(str(embedded_path), dtype=torch.float32).eval()
    target = tok.convert_tokens_to_ids(rec.choice_tokens)
    for j in rec.judgements:
        ids = tok(j.prompt_text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)[target]
        assert abs(lp[0].item() - j.logprob_a) < 1e-3 and abs(lp[1].item() - j.logprob_b) < 1e-3
    # And the label follows from those numbers.
    assert abs(p_response_a(rec.judgements) - rec.p_a) < 1e-12
