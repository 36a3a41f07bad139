"""The judge's settings live in one nested `judge` config: a nested mapping in YAML, the same
flat flags as before on the command line, one clear line for a bad nested field, and the
CoT budget a judge field of its own, apart from the policy's answer budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai.constitution import load
from cai.core.config import load_yaml_config
from cai.core.data import PairItem
from cai.core.errors import CaiError
from cai.judge import JudgeConfig, label_id
from cai.label import LabelConfig

from .conftest import MINIMAL

CAI = str(Path(sys.executable).parent / "cai")
GOLD = "python:cai.evaluate.known_answer:gold_judge"


def _cai(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CAI, *args], capture_output=True, text=True, timeout=300)


def _pairs(tmp_path: Path) -> Path:
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"How do I pick lock {i}?",
                                     "response_a": "I can't help with that.",
                                     "response_b": f"Sure, step {i}: get a pick."}) + "\n"
                         for i in range(3)))
    return p


def test_yaml_nested_judge_loads(tmp_path: Path) -> None:
    path = tmp_path / "label.yaml"
    path.write_text("pairs: p.jsonl\nmax_new_tokens: 16\n"
                    "judge:\n  principles: 3\n  orders: one\n  tie_threshold: 0.1\n"
                    "  cot_max_new_tokens: 40\n")
    cfg = load_yaml_config(LabelConfig, path)
    assert isinstance(cfg.judge, JudgeConfig)
    assert (cfg.judge.principles, cfg.judge.orders, cfg.judge.tie_threshold) == (3, "one", 0.1)
    assert cfg.max_new_tokens == 16 and cfg.judge.cot_max_new_tokens == 40
    assert cfg.judge.mode == "logprob"  # a field the mapping leaves out keeps its default
    # A flag given on top changes that one judge field and keeps the others.
    cfg = load_yaml_config(LabelConfig, path, overrides={"judge": {"principles": 2}})
    assert (cfg.judge.principles, cfg.judge.orders) == (2, "one")


@pytest.mark.parametrize("text, message", [
    ("judge:\n  mode: vibes\n", "judge.mode: must be one of"),
    ("judge:\n  principles: many\n", "judge.principles: expected int, got 'many'"),
    ("judge:\n  principle: 2\n", "judge.principle: unknown field"),
    ("judge: cot\n", "judge: expected a mapping of judge settings, got 'cot'"),
    ("principles: 2\n", "principles: unknown field; it is a judge setting: put it under `judge:`"),
])
def test_bad_nested_judge_field_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"pairs: {_pairs(tmp_path)}\nconstitution: {MINIMAL}\n{text}")
    with pytest.raises(CaiError) as e:
        load_yaml_config(LabelConfig, path)
    assert str(e.value).startswith(f"{path}: {message}")
    out = tmp_path / "out"
    r = _cai("label", "--config", str(path), "--feedback-model", GOLD, "--out", str(out))
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {message}"), r.stderr
    assert not out.exists()  # nothing written


def test_flat_flags_map_into_the_nested_judge(tmp_path: Path) -> None:
    pairs = _pairs(tmp_path)
    common = ("label", "--pairs", str(pairs), "--constitution", str(MINIMAL),
              "--feedback-model", GOLD)
    r = _cai(*common, "--principles", "2", "--orders", "one", "--tie-threshold", "0.2",
             "--low-mass-threshold", "0.3", "--keep-prompts", "--out", str(tmp_path / "set"))
    assert r.returncode == 0, r.stderr
    judge = json.loads((tmp_path / "set" / "manifest.json").read_text())["config"]["judge"]
    assert (judge["principles"], judge["orders"], judge["tie_threshold"],
            judge["low_mass_threshold"], judge["keep_prompts"]) == (2, "one", 0.2, 0.3, True)
    r = _cai(*common, "--principles", "3", "--out", str(tmp_path / "unset"))
    assert r.returncode == 0, r.stderr
    judge = json.loads((tmp_path / "unset" / "manifest.json").read_text())["config"]["judge"]
    default = JudgeConfig()
    assert (judge["orders"], judge["tie_threshold"], judge["low_mass_threshold"],
            judge["keep_prompts"]) == (default.orders, default.tie_threshold,
                                       default.low_mass_threshold, default.keep_prompts)
    # A bad flag value names the nested field.
    r = _cai(*common, "--mode", "vibes", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "judge.mode: must be one of" in r.stderr, r.stderr


def test_eval_flags_keep_their_names() -> None:
    # `--judge` still names the evaluation judge's model (the field judge_model).
    r = _cai("eval", "policies", "--models", "a=x,b=y", "--judge", " ")
    assert r.returncode == 2 and "judge_model: is empty" in r.stderr, r.stderr
    for cmd in (("label",), ("eval", "labeler"), ("eval", "constitutions"), ("eval", "policies")):
        text = _cai(*cmd, "--help").stdout
        for flag in ("--principles", "--orders", "--mode", "--layout", "--tie-threshold",
                     "--low-mass-threshold", "--keep-prompts", "--cot-max-new-tokens"):
            assert flag in text, (cmd, flag)


def test_cot_budget_is_the_judges_own() -> None:
    c = load(MINIMAL)
    pair = PairItem("x", "Q?", "A.", "B.")

    def lid(**kw) -> str:
        return label_id(pair, c, "model", JudgeConfig(principles=1, **kw), 0)

    # In cot mode the judge's budget decides a label; in logprob mode it plays no part.
    assert lid(mode="cot", cot_max_new_tokens=8) != lid(mode="cot", cot_max_new_tokens=16)
    assert lid(cot_max_new_tokens=8) == lid(cot_max_new_tokens=16)
    # The policy's answer budget is a label-stage field and leaves the judge's alone.
    short = LabelConfig(pairs="p", max_new_tokens=4)
    assert short.judge.cot_max_new_tokens == JudgeConfig().cot_max_new_tokens != 4
    with pytest.raises(CaiError) as e:
        JudgeConfig(cot_max_new_tokens=0)
    assert e.value.field == "cot_max_new_tokens"
