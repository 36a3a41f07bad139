"""Programmatic judges and rewards (`python:FILE.py:FN`, `python:MODULE:FN`): they label
through the same code as a model judge (principles, both orders, aggregation, flags, ids,
manifest), swapping a pair gives exactly 1 − p, their identity follows the source file,
and a bad spec or a bad return value is one line with exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cai.backends import load_backend
from cai.constitution import load
from cai.core.data import PairItem
from cai.core.errors import CaiError
from cai.core.models import model_identity
from cai.judge import JudgeConfig, judge_pairs
from cai.label import LabelConfig, run_label
from cai.train.rewards import PythonReward, load_reward

from .conftest import MINIMAL

CAI = str(Path(sys.executable).parent / "cai")

# A position-biased, principle-dependent judge: it prefers the shorter answer, leans
# towards whichever answer is shown first and is surer under the "kinder" principle, so
# both orders and the mean over principles all change its label.
JUDGE = '''
import math


def shorter(prompt, response_a, response_b, principle):
    """P(A better): the shorter answer wins, with a lean towards option (A)."""
    scale = 2.0 if "kinder" in principle else 1.0
    d = (len(response_b) - len(response_a)) / 10.0
    return 1.0 / (1.0 + math.exp(-(scale * d + 0.4)))


def always(prompt, response_a, response_b, principle):
    return 1.0


def too_big(prompt, response_a, response_b, principle):
    return 1.5 if "hammer" in response_a + response_b else 0.5


def not_a_number(prompt, response_a, response_b, principle):
    return float("nan")


def text(prompt, response_a, response_b, principle):
    return "A"


def boom(prompt, response_a, response_b, principle):
    raise RuntimeError("judge\\nbroke")


NOT_CALLABLE = 3


def length(prompt, response):
    return float(len(response))


def bad_reward(prompt, response):
    return float("inf") if "x" in response else 1.0
'''

PAIRS = [
    PairItem("p0", "How can I get into my neighbour's shed?", "Ask them for the key.",
             "Break the lock with a hammer when they are out."),
    PairItem("p1", "Say something mean about my coworker.", "I'd rather not.",
             "They are useless and everyone knows it, honestly."),
    PairItem("p2", "What is 2 + 2?", "4, because two and two make four.", "5."),
    PairItem("p3", "Name a colour.", "Red.", "Blue"),
]


@pytest.fixture
def judge_file(tmp_path: Path) -> Path:
    p = tmp_path / "judges.py"
    p.write_text(JUDGE, encoding="utf-8")
    return p


def _swap(p: PairItem) -> PairItem:
    return PairItem(p.id, p.prompt, p.response_b, p.response_a)


def _judge_module():
    import types

    mod = types.ModuleType("hand")
    exec(JUDGE, mod.__dict__)
    return mod


def _expected(pair: PairItem, principles: list[str]) -> float:
    """The label by hand: mean over principles of ½[f(a, b) + 1 − f(b, a)]."""
    f = _judge_module().shorter
    return sum(0.5 * (f(pair.prompt, pair.response_a, pair.response_b, t)
                      + 1 - f(pair.prompt, pair.response_b, pair.response_a, t))
               for t in principles) / len(principles)


def test_python_judge_labels_like_a_model_judge_and_swaps_to_one_minus_p(judge_file: Path) -> None:
    c = load(MINIMAL)
    backend = load_backend(f"python:{judge_file}:shorter", reuse=False)
    cfg = JudgeConfig(principles=3)
    a = judge_pairs(PAIRS, c, backend, cfg, 1)
    b = judge_pairs([_swap(p) for p in PAIRS], c, backend, cfg, 1)
    texts = {p.id: p.text for p in c.rl_principles}
    for pair, x, y in zip(PAIRS, a, b):
        # K principles × both orders, read through the same letter log-probs.
        assert len(x.judgements) == 6 and {j.order for j in x.judgements} == {"ab", "ba"}
        assert all(j.mass == pytest.approx(1.0) for j in x.judgements)
        assert x.p_a == pytest.approx(_expected(pair, [texts[j.principle] for j in x.judgements
                                                       if j.order == "ab"]), abs=1e-12)
        assert x.p_a == pytest.approx(1 - y.p_a, abs=1e-12)
        assert x.chosen == y.chosen or x.p_a == pytest.approx(0.5, abs=1e-12)
        assert x.provenance.model == backend.identity
    # The lean towards (A) makes the two orders disagree on the equal-length pair only,
    # which the orders then cancel to a tie.
    assert ["position-inconsistent" in r.flags for r in a] == [False, False, False, True]
    assert a[3].p_a == pytest.approx(0.5, abs=1e-12) and "tie" in a[3].flags
    # One order only: the label is the function's answer in the order drawn.
    one = judge_pairs(PAIRS, c, backend, JudgeConfig(principles=1, orders="one"), 1)
    f = _judge_module().shorter
    for pair, r in zip(PAIRS, one):
        (j,) = r.judgements
        t = texts[j.principle]
        want = (f(pair.prompt, pair.response_a, pair.response_b, t) if j.order == "ab"
                else 1 - f(pair.prompt, pair.response_b, pair.response_a, t))
        assert r.p_a == pytest.approx(want, abs=1e-12)
    assert {r.judgements[0].order for r in one} == {"ab", "ba"}  # both orders get drawn


def test_python_judge_certain_answers_read_back_exactly(judge_file: Path) -> None:
    c = load(MINIMAL)
    backend = load_backend(f"python:{judge_file}:always", reuse=False)
    rec = judge_pairs(PAIRS[:1], c, backend, JudgeConfig(principles=2), 0)[0]
    # Always "A": each order's p_first is exactly 1, so the orders cancel to exactly ½.
    assert all(j.p_first == 1.0 and math.isfinite(j.logprob_b) for j in rec.judgements)
    assert rec.p_a == 0.5 and "position-inconsistent" in rec.flags and "tie" in rec.flags
    json.dumps(rec.model_dump())  # finite log-probs: the record is valid JSON


def test_python_judge_identity_follows_the_source_file(judge_file: Path) -> None:
    spec = f"python:{judge_file}:shorter"
    first = model_identity(spec)
    assert first.startswith(spec + "@") and len(first) == len(spec) + 13
    assert model_identity(f"python:{judge_file}:always") != first  # another function
    judge_file.write_text(JUDGE + "\n# edited\n", encoding="utf-8")
    assert model_identity(spec) != first  # same spec, edited file: another judge
    mod = model_identity("python:cai.core.text:is_refusal")
    assert mod.startswith("python:cai.core.text:is_refusal@")


def test_python_judge_cli_labels_a_pairs_file_and_resumes(judge_file: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "response_a": p.response_a,
                                         "response_b": p.response_b}) + "\n" for p in PAIRS))
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt,
                                           "response_a": p.response_b,
                                           "response_b": p.response_a}) + "\n" for p in PAIRS))
    spec = f"python:{judge_file}:shorter"
    labels = {}
    for name, src in (("ab", pairs), ("ba", swapped)):
        out = tmp_path / name
        r = subprocess.run([CAI, "label", "--pairs", str(src), "--feedback-model", spec,
                            "--constitution", str(MINIMAL), "--principles", "2", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        labels[name] = {x["pair_id"]: x for x in map(json.loads, (out / "data.jsonl").open())}
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["models"]["feedback"] == model_identity(spec)
        assert manifest["counts"]["records"] == 4 and manifest["label_stats"]["pairs"] == 4
        prefs = [json.loads(x) for x in (out / "preferences.jsonl").open()]
        assert all(p["p_chosen"] >= 0.5 for p in prefs)
    for pid, x in labels["ab"].items():
        assert x["p_a"] == pytest.approx(1 - labels["ba"][pid]["p_a"], abs=1e-12)
        # The shorter answer is preferred (equal lengths tie).
        if len(x["response_a"]) != len(x["response_b"]):
            assert (x["p_a"] > 0.5) == (len(x["response_a"]) < len(x["response_b"]))
        else:
            assert x["p_a"] == pytest.approx(0.5) and "tie" in x["flags"]
    # A rerun finds every label written and judges nothing.
    r = subprocess.run([CAI, "label", "--pairs", str(pairs), "--feedback-model", spec,
                        "--constitution", str(MINIMAL), "--principles", "2", "--out",
                        str(tmp_path / "ab")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    assert json.loads((tmp_path / "ab" / "manifest.json").read_text())["counts"]["new"] == 0


@pytest.mark.parametrize("spec, message", [
    ("python:{dir}/nope.py:shorter", "file not found"),
    ("python:{dir}/judges.py:missing", "has no function 'missing'"),
    ("python:{dir}/judges.py:NOT_CALLABLE", "is not callable"),
    ("python:{dir}/broken.py:f", "importing {dir}/broken.py failed: SyntaxError"),
    ("python:no_such_module_xyz:f", "cannot import module no_such_module_xyz"),
    ("python:{dir}/judges.py", "is not python:MODULE:FUNCTION"),
    ("python:{dir}/judges.py:shorter?x=1", "takes no ?options"),
    ("python:{dir}/judges.py:too_big", "returned 1.5 on pair 'p0', principle"),
    ("python:{dir}/judges.py:not_a_number", "returned nan on pair"),
    ("python:{dir}/judges.py:text", "returned 'A' on pair"),
    ("python:{dir}/judges.py:boom", "raised RuntimeError: judge broke on pair"),
])
def test_python_judge_bad_spec_or_value_is_one_line_exit_2(judge_file: Path, tmp_path: Path,
                                                           spec: str, message: str) -> None:
    (tmp_path / "broken.py").write_text("def f(:\n    pass\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "p0", "prompt": PAIRS[0].prompt,
                                 "response_a": PAIRS[0].response_a,
                                 "response_b": PAIRS[0].response_b}) + "\n")
    out = tmp_path / "out"
    r = subprocess.run([CAI, "label", "--pairs", str(pairs), "--constitution", str(MINIMAL),
                        "--principles", "2", "--feedback-model", spec.format(dir=tmp_path),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]  # not progress bars
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message.format(dir=tmp_path) in lines[0]
    assert "feedback_model" in lines[0] or "model" in lines[0]
    # Nothing half-written: no label records.
    assert not (out / "data.jsonl").exists() or not (out / "data.jsonl").read_text().strip()


def test_python_judge_refuses_modes_it_cannot_answer(judge_file: Path) -> None:
    c = load(MINIMAL)
    backend = load_backend(f"python:{judge_file}:shorter", reuse=False)
    for mode, field in (("score", "mode"), ("cot", "model")):
        cfg = JudgeConfig(principles=1, mode=mode)
        with pytest.raises(CaiError, match=f"^{field}: .*python judge"):
            judge_pairs(PAIRS[:1], c, backend, cfg, 0)
    # ...while the same config in logprob mode works.
    assert judge_pairs(PAIRS[:1], c, backend, JudgeConfig(principles=1), 0)


def test_python_judge_run_label_fails_before_the_folder_exists(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(CaiError, match="file not found"):
        run_label(LabelConfig(pairs=str(tmp_path / "x.jsonl"), constitution=str(MINIMAL),
                              judge=JudgeConfig(principles=1), feedback_model=f"python:{tmp_path}/nope.py:f",
                              out=str(out)))
    assert not out.exists()


def test_python_judge_in_eval_labeler_scores_its_accuracy(judge_file: Path, tmp_path: Path) -> None:
    """`cai eval labeler` takes the same spec: a judge that knows the answer is exact, its
    mirror image is always wrong, and each report names the function's identity."""
    from cai.evaluate.labeler import LabelerEvalConfig, load_items, run_labeler_eval

    items = load_items("labeler_ab", limit=8)
    key = {i.context: i.options[i.correct] for i in items}
    oracle = tmp_path / "oracle.py"
    oracle.write_text(f"KEY = {key!r}\n\n"
                      "def right(prompt, a, b, principle):\n    return 1.0 if KEY[prompt] == a else 0.0\n\n"
                      "def wrong(prompt, a, b, principle):\n    return 0.0 if KEY[prompt] == a else 1.0\n")
    for fn, accuracy in (("right", 1.0), ("wrong", 0.0)):
        spec = f"python:{oracle}:{fn}"
        m = run_labeler_eval(LabelerEvalConfig(feedback_model=spec, constitution=str(MINIMAL),
                                               judge=JudgeConfig(principles=2), limit=8,
                                               out=str(tmp_path / fn)))
        assert m["metrics"]["accuracy"] == accuracy
        assert m["models"]["feedback"] == model_identity(spec)


# --------------------------------------------------------------------------- rewards


def test_python_reward_scores_with_the_function_and_names_it(judge_file: Path) -> None:
    spec = f"python:{judge_file}:length"
    reward = load_reward(spec)
    assert isinstance(reward, PythonReward)
    assert reward.spec == model_identity(spec) and reward.spec.startswith(spec + "@")
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]
    assert reward.score(prompts, ["abc", "abcdef"]) == [3.0, 6.0]
    # A module spec works the same way.
    mod = load_reward("python:operator:ne")
    assert mod.spec.startswith("python:operator:ne@")
    with pytest.raises(CaiError, match="returned True on response 0 to 'Hi'; it must return a number"):
        mod.score(prompts[:1], ["Sure, here it is."])


@pytest.mark.parametrize("fn, message", [
    ("bad_reward", "returned inf on response 1 to 'Yo'; a reward must be a finite number"),
    ("boom", "raised TypeError"),
    ("missing", "has no function 'missing'"),
])
def test_python_reward_bad_value_or_spec_names_the_item(judge_file: Path, fn: str,
                                                        message: str) -> None:
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]
    with pytest.raises(CaiError) as err:
        load_reward(f"python:{judge_file}:{fn}").score(prompts, ["ok", "xx"])
    assert message in str(err.value) and str(err.value).startswith("reward: ")
    assert "\n" not in str(err.value)


def test_python_reward_cli_train_rl_bad_spec_exit_2(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    r = subprocess.run([CAI, "train", "rl", "--reward", f"python:{tmp_path}/none.py:f",
                        "--prompts", str(prompts), "--model", "embedded:smollm2-135m",
                        "--out", str(tmp_path / "rl")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1
    assert "reward: " in r.stderr and "file not found" in r.stderr
