"""Typed views of the result files stages write, for the readers (report, viewer).

The report and the viewer read a stage's results through these types, by the exact keys
the stage writes, so a renamed key is one edit here and never a silent blank table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    """A JSON file, or None when it is missing or not JSON (a stage still running)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a jsonl file, through the one jsonl reader; a torn last line (a stage
    still writing) or any other line that is no JSON object is skipped."""
    from cai.core.data import read_jsonl as read

    return read(path, lenient=True)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class SourceAccuracy:
    """Held-out accuracy on the pairs of one data source ("labels", "sl-pairs")."""

    pairs: int
    """Held-out pairs from this source."""
    accuracy: float | None
    """Share ranked as the label prefers (ties left out); None when none were decisive."""


@dataclass(frozen=True)
class PreferenceEval:
    """`eval.json` of a preference-trained folder (the PM, DPO): held-out numbers."""

    numbers: dict[str, float]
    """Every top-level number (`pairs`, `accuracy`, `mean_margin`, `ece`, ...)."""
    by_source: dict[str, SourceAccuracy] = field(default_factory=dict)
    """The PM's held-out accuracy per data source (absent for DPO)."""
    reliability: list[dict[str, Any]] = field(default_factory=list)
    """Calibration bins (confidence, agreement, n)."""

    @classmethod
    def read(cls, folder: Path) -> PreferenceEval | None:
        data = read_json(folder / "eval.json")
        if not isinstance(data, dict):
            return None
        return cls({k: v for k, v in data.items() if _number(v)},
                   {s: SourceAccuracy(v["pairs"], v["accuracy"])
                    for s, v in (data.get("by_source") or {}).items()},
                   list(data.get("reliability") or []))

    def get(self, key: str) -> float | None:
        return self.numbers.get(key)


@dataclass(frozen=True)
class Example:
    """One line of the policy evaluation's `examples.jsonl`: a prompt, every answer."""

    set: str
    """Prompt set ("red_team", "helpful", "benign")."""
    prompt_id: str
    """The prompt's id in its set."""
    prompt: str
    """The prompt text."""
    responses: dict[str, str]
    """Each model's answer, by player name."""

    @classmethod
    def read_all(cls, folder: Path) -> list[Example]:
        return [cls(r["set"], r["prompt_id"], r["prompt"], dict(r["responses"]))
                for r in read_jsonl(folder / "examples.jsonl")]


__all__ = ["read_json", "read_jsonl", "SourceAccuracy", "PreferenceEval", "Example"]
