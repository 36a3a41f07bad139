"""Reward specs (`pm:`, `judge:`, `python:`) are split by `cai.core.reward_spec` alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cai.core.errors import CaiError
from cai.core.reward_spec import (
    RewardSpec,
    is_python_spec,
    judge_reward,
    model_of,
    parse_reward_spec,
    pm_reward,
    reward_kind,
)

CAI = Path(__file__).resolve().parents[1] / "cai"
PREFIXES = {"pm:", "judge:", "python:"}
OWNER = "core/reward_spec.py"
# Rewritten on the recipe branch of issue #35; to route through reward_spec when that lands.
PENDING: set[str] = set()


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str)}


def _prefix_literals(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and n.value in PREFIXES and id(n) not in skip]


def test_prefixes_parsed_in_one_module() -> None:
    sites = {f"{p.relative_to(CAI)}:{line}" for p in sorted(CAI.rglob("*.py"))
             if str(p.relative_to(CAI)) not in {OWNER, *PENDING} for line in _prefix_literals(p)}
    assert not sites, sorted(sites)
    assert _prefix_literals(CAI / OWNER)


@pytest.mark.parametrize(("text", "kind", "target"), [
    ("pm:runs/pm", "pm", "runs/pm"),
    ("  runs/pm  ", "pm", "runs/pm"),
    ("judge:embedded:smollm2-135m", "judge", "embedded:smollm2-135m"),
    ("python:cai.evaluate.known_answer:gold_score", "python", "cai.evaluate.known_answer:gold_score"),
    ("python:judges.py:safe", "python", "judges.py:safe"),
])
def test_parse(text: str, kind: str, target: str) -> None:
    r = parse_reward_spec(text)
    assert r == RewardSpec(kind, target, text.strip())
    assert reward_kind(text) == kind


def test_pm_path_is_expanded() -> None:
    assert parse_reward_spec("pm:~/pm").path == Path("~/pm").expanduser()
    with pytest.raises(CaiError, match="names no preference-model folder"):
        _ = parse_reward_spec("judge:embedded:x").path


@pytest.mark.parametrize(("text", "message"), [
    ("", "reward folder not found: ''"),
    ("   ", "reward folder not found: ''"),
    ("pm:", "reward folder not found: ''"),
    ("judge:", "judge: needs a model spec"),
    ("python:", "is not python:MODULE:FUNCTION"),
    ("python:mod", "is not python:MODULE:FUNCTION"),
    ("python:mod:fn?x=1", "takes no \\?options"),
])
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(CaiError, match=message) as e:
        parse_reward_spec(text, field="monitors")
    assert e.value.field == "monitors"


def test_kind_never_raises() -> None:
    assert reward_kind("") == "pm" and reward_kind("judge:") == "judge"


def test_builders_round_trip() -> None:
    assert parse_reward_spec(pm_reward(Path("a/b"))) == RewardSpec("pm", "a/b", "pm:a/b")
    assert parse_reward_spec(judge_reward("hf:m")) == RewardSpec("judge", "hf:m", "judge:hf:m")


def test_model_of() -> None:
    assert model_of("pm:runs/pm") == "runs/pm"
    assert model_of("judge:hf:m") == "hf:m"
    assert model_of("python:m:f") == "python:m:f"
    assert model_of("embedded:smollm2-135m") == "embedded:smollm2-135m"
    assert is_python_spec(" python:m:f") and not is_python_spec("pm:python")
