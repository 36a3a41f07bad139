"""Every link's orientation: a sign error between a judge's p, the label's chosen/rejected,
the PM, the reward, PPO and the evaluation would pass tests that only check shapes, so each
link is driven by a known preference and by its mirror image, and must move opposite ways.

- labels → PM: a PM trained on a gold judge's labels and one trained on the mirrored labels
  (p ↔ 1 − p) rank held-out pairs in opposite orders, the first as the gold does;
- reward → PPO: a short PPO run against a python reward raises the gold score of the policy's
  own samples, one against the negated reward lowers it;
- evaluation: a policy's win rate against itself is ½ within its interval, while a policy
  the judge dislikes is rated below it, outside the interval.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from cai.backends import GenerationConfig, GenRequest, load_backend
from cai.judge import JudgeConfig
from cai.label import LabelConfig, run_label
from cai.train.pm import PMConfig, load_reward_model, pm_scores, run_pm
from cai.train.rl import RLConfig, run_rl
from tests.test_train_rl import PROMPTS, boosted_model  # noqa: F401  (a fixture)

from .conftest import MINIMAL

# The gold: a response's "care" is its count of careful adverbs minus reckless ones; the
# judge prefers the more careful response (0.9), and `mirror` is its exact opposite.
GOLD = '''
GOOD = ("gently", "safely", "kindly", "calmly")
BAD = ("violently", "cruelly", "harshly", "recklessly")


def care(text):
    words = [w.strip(".,!?").lower() for w in text.split()]
    return sum(w in GOOD for w in words) - sum(w in BAD for w in words)


def gold(prompt, response_a, response_b, principle):
    d = care(response_a) - care(response_b)
    return 0.5 if d == 0 else (0.9 if d > 0 else 0.1)


def mirror(prompt, response_a, response_b, principle):
    return 1.0 - gold(prompt, response_a, response_b, principle)


def cat_rate(prompt, response):
    """The share of a response's words that are "cat"."""
    words = [w.strip(".,!?").lower() for w in response.split()]
    return sum(w == "cat" for w in words) / max(len(words), 1)


def no_cat(prompt, response):
    return -cat_rate(prompt, response)


def likes_cats(prompt, response_a, response_b, principle):
    """More "cat" wins, with a lean towards option (A) that both orders must cancel."""
    d = cat_rate(prompt, response_a) - cat_rate(prompt, response_b)
    return max(0.0, min(1.0, 0.6 + 2 * d))
'''
GOOD = ("gently", "safely", "kindly", "calmly")
BAD = ("violently", "cruelly", "harshly", "recklessly")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gold_file(tmp_path: Path) -> Path:
    p = tmp_path / "gold.py"
    p.write_text(GOLD, encoding="utf-8")
    return p


def _gold() -> dict:
    ns: dict = {}
    exec(GOLD, ns)
    return ns


def _answer(adverb: str) -> str:
    return f"I will {adverb} answer that."


def _write_pairs(path: Path, pairs: list[tuple[str, str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": f"t{i}", "prompt": p, "response_a": a,
                                        "response_b": b}) + "\n"
                            for i, (p, a, b) in enumerate(pairs)), encoding="utf-8")
    return path


def test_orientation_pm_on_gold_vs_mirrored_labels_ranks_held_out_pairs_oppositely(
        tiny_model: Path, gold_file: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    train = []
    for p in ("How do I fix a door?", "Tell me about dogs.", "What should I cook?",
              "Help me write a note.", "How do I talk to my boss?", "Plan a trip."):
        for g, b in itertools.product(GOOD, BAD):
            a, c = (_answer(g), _answer(b)) if rng.random() < 0.5 else (_answer(b), _answer(g))
            train.append((p, a, c))
    rng.shuffle(train)
    pairs = _write_pairs(tmp_path / "pairs.jsonl", train[:48])
    # Held out: prompts the PM never saw, careful/reckless pairings it was not trained on,
    # in either order.
    held = []
    for p in ("Where is the station?", "Explain rain.", "Fold a shirt."):
        for g, b in zip(GOOD, BAD[1:] + BAD[:1]):
            held.append((p, _answer(g), _answer(b)) if rng.random() < 0.5
                        else (p, _answer(b), _answer(g)))
    care = _gold()["care"]
    truth = np.sign([care(a) - care(b) for _, a, b in held])
    assert set(truth) == {-1.0, 1.0}  # both orders occur among the held-out pairs

    margins = {}
    for fn in ("gold", "mirror"):
        label = tmp_path / f"label-{fn}"
        run_label(LabelConfig(pairs=str(pairs), feedback_model=f"python:{gold_file}:{fn}",
                              constitution=str(MINIMAL), judge=JudgeConfig(principles=1),
                              out=str(label)))
        prefs = [json.loads(x) for x in (label / "preferences.jsonl").open()]
        assert len(prefs) == 48 and all(x["p_chosen"] == pytest.approx(0.9) for x in prefs)
        run_pm(PMConfig(preferences=str(label), model=str(tiny_model), out=str(tmp_path / f"pm-{fn}"),
                        lora=False, learning_rate=3e-3, max_steps=60, batch_size=8,
                        eval_fraction=0, logging_steps=20, max_length=64))
        model, tok = load_reward_model(tmp_path / f"pm-{fn}")
        chats = [[{"role": "user", "content": p}] for p, _, _ in held]
        ra = pm_scores(model, tok, chats, [a for _, a, _ in held])
        rb = pm_scores(model, tok, chats, [b for _, _, b in held])
        margins[fn] = np.array(ra) - np.array(rb)
    # The gold-trained PM ranks every held-out pair as the gold does, the mirror-trained
    # one ranks every pair the other way round.
    assert np.mean(np.sign(margins["gold"]) == truth) == 1.0
    assert np.mean(np.sign(margins["mirror"]) == -truth) == 1.0
    assert np.all(np.abs(margins["gold"]) > 0.5) and np.all(np.abs(margins["mirror"]) > 0.5)


def _gold_rate(path: Path) -> float:
    """The gold (share of "cat" words) of a policy's own samples, fixed seeds."""
    backend = load_backend(f"hf:{path}?progress=0", reuse=False)
    reqs = [GenRequest([{"role": "user", "content": p}], "", 1000 + i)
            for i, p in enumerate(PROMPTS * 4)]
    gens = backend.generate(reqs, GenerationConfig(max_new_tokens=10, temperature=1.0,
                                                   top_p=1.0, seed=0))
    rate = _gold()["cat_rate"]
    return float(np.mean([rate("", g.text) for g in gens]))


def test_orientation_rl_against_a_reward_and_its_negation_moves_gold_oppositely(
        boosted_model: tuple[Path, int], gold_file: Path, tmp_path: Path) -> None:  # noqa: F811
    path, _ = boosted_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    base = _gold_rate(path)
    assert 0.05 < base < 0.5  # room to move both ways
    gold = {}
    for fn in ("cat_rate", "no_cat"):
        out = tmp_path / fn
        manifest = run_rl(RLConfig(algo="ppo", model=str(path), reward=f"python:{gold_file}:{fn}",
                                   prompts=str(prompts), out=str(out), beta=0.0, steps=8,
                                   batch_size=8, minibatch_size=4, ppo_epochs=2,
                                   max_new_tokens=10, learning_rate=1e-3, lora=False,
                                   save_every=0, seed=0))
        assert manifest["models"]["reward"].startswith(f"python:{gold_file}:{fn}@")
        gold[fn] = _gold_rate(out)
    assert gold["cat_rate"] > base + 0.2
    assert gold["no_cat"] < base - 0.05


def test_orientation_eval_win_rate_of_a_policy_against_itself_is_half(
        boosted_model: tuple[Path, int], tiny_model: Path, gold_file: Path,  # noqa: F811
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from cai.evaluate.policies import PoliciesEvalConfig, run_policies_eval

    # The same weights under two specs: answers are sampled independently (the model's
    # identity is part of each answer's seed), so the games are fair coin flips on average.
    # Relative folders keep the identities, and so the samples, the same on every machine
    # (an absolute tmp path would draw other samples each run).
    shutil.copytree(boosted_model[0], tmp_path / "cats")
    shutil.copytree(tiny_model, tmp_path / "plain")
    monkeypatch.chdir(tmp_path)
    run_policies_eval(PoliciesEvalConfig(
        models="self=hf:cats?progress=0,again=cats,plain=hf:plain?progress=0",
        feedback_model="python:gold.py:likes_cats", constitution=str(MINIMAL),
        judge=JudgeConfig(principles=1),
        limit=16, max_new_tokens=12, n_boot=300, out="eval"))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    # A 95 % interval, so it misses ½ on about one seed in twenty: on this set-up seeds 0–9
    # gave 9 of 10 intervals holding 1000 (seed 3: 1002–1128) and win rates 0.37–0.62.
    assert report["identical_answers"] < 5
    elo = report["elo"]["overall"]
    lo, hi = elo["again"]["interval"]
    assert lo < 1000.0 < hi  # the anchor's own rating lies inside its twin's interval
    rate = report["win_rate"]["harmlessness"]["self"]["again"]
    assert abs(rate - 0.5) < 0.15
    # The interval is not just wide: a policy that seldom says "cat" loses clearly.
    assert elo["plain"]["interval"][1] < 1000.0
    assert report["win_rate"]["harmlessness"]["self"]["plain"] > 0.6
