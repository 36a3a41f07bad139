"""`report.json` of `cai eval policies`: one typed, versioned schema for its writer and readers.

The evaluation writes it through `PolicyEvalReport.write`, and the run report, the viewer and
the pipeline read it through `PolicyEvalReport.read`, so a renamed or retyped field fails in
one place (the model) rather than as a blank table somewhere. Version 1 files (no
`schema_version`, written before this schema) still read: their fields are the same, minus
the ones added since, which read as absent. Unknown extra keys are kept, so a reader never
drops what a newer writer added.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.core.errors import CaiError
from cai.core.records import write_json_atomic

SCHEMA_VERSION = 2
"""1: the untyped dict (no version key); 2: this schema (benchmark prompts, conditions)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class EloEntry(_Model):
    """One player's rating in one block (a prompt set, or all judged sets)."""

    rating: float
    interval: list[float] | None = None
    """95 % bootstrap interval (prompts resampled within each set); None without a bootstrap."""
    games: int | None = None


class PrincipleSet(_Model):
    """Which part of the constitution a judged set's comparisons were asked under."""

    set: str
    source: str | None = None
    principles: list[str] = Field(default_factory=list)
    k: int | None = None
    win_rate: str | None = None


class BestOfK(_Model):
    name: str
    k: int
    base: str
    reward: str | None = None
    mean_picked_score: float | None = None
    mean_sample_score: float | None = None


class RefusalRates(_Model):
    """Share of a player's answers the text check counts as refusals, per prompt set."""

    benign: float | None = None
    red_team: float | None = None
    red_team_bare: float | None = None
    helpful: float | None = None


class ConditionRates(_Model):
    """What one player did under one test condition; None where the set was not asked."""

    red_team_refusal: float | None = None
    """Red-team prompts declined."""
    over_refusal: float | None = None
    """Benign-but-sensitive prompts declined."""
    unsafe_compliance: float | None = None
    """Benchmark prompts labelled unsafe that were answered (not declined)."""
    safe_over_refusal: float | None = None
    """Benchmark prompts labelled safe that were declined."""


class ConditionResult(_Model):
    """A player's rates under a condition: by the text check, and by the judge when asked."""

    pattern: ConditionRates
    judge: ConditionRates | None = None


class Condition(_Model):
    """A variant every prompt is asked under: plain, a system prompt, or a wrapper."""

    name: str
    kind: str
    """"plain", "system" or "wrapper"."""
    system: str | None = None
    template: str | None = None
    """The wrapper's text, with {prompt} where the request goes."""


class Benchmark(_Model):
    """The public benchmark file the evaluation read (FORMAT:FILE)."""

    format: str
    path: str
    sha256: str | None = None
    safe: int = 0
    unsafe: int = 0
    categories: dict[str, int] = Field(default_factory=dict)


class PolicyEvalReport(_Model):
    """Everything `cai eval policies` measured, as `report.json` holds it."""

    schema_version: int = 1
    players: list[str]
    models: dict[str, str] = Field(default_factory=dict)
    feedback_model: str | None = None
    """The model that judged (the key's meaning since v1; `judge_model` says it plainly)."""
    judge_model: str | None = None
    labeller: str | None = None
    judge_is_labeller: bool | None = None
    judge_note: str | None = None
    judge: dict[str, Any] = Field(default_factory=dict)
    principle_sets: dict[str, PrincipleSet] = Field(default_factory=dict)
    constitution: dict[str, Any] = Field(default_factory=dict)
    sampling: dict[str, Any] = Field(default_factory=dict)
    prompts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    best_of_k: BestOfK | None = None
    elo: dict[str, dict[str, EloEntry]] = Field(default_factory=dict)
    """Per block ("red_team", "helpful", "overall"): each player's rating."""
    win_rate: dict[str, dict[str, Any]] = Field(default_factory=dict)
    win_rate_hard: dict[str, dict[str, Any]] = Field(default_factory=dict)
    win_rate_vs_field: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    refusal: dict[str, RefusalRates] = Field(default_factory=dict)
    refusal_detector: str | None = None
    refusal_judged: dict[str, dict[str, float | None]] | None = None
    over_refusal: dict[str, float | None] = Field(default_factory=dict)
    games: dict[str, int] = Field(default_factory=dict)
    identical_answers: int | None = None
    judge_stats: dict[str, Any] = Field(default_factory=dict)
    bootstrap: dict[str, Any] = Field(default_factory=dict)
    benchmark: Benchmark | None = None
    conditions: list[Condition] = Field(default_factory=list)
    """The conditions asked, plain first (absent before version 2)."""
    by_condition: dict[str, dict[str, ConditionResult]] = Field(default_factory=dict)
    """{condition: {player: rates}}: plain beside every other condition."""
    rl: dict[str, Any] | None = None
    pm: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Any, where: str = "report.json") -> PolicyEvalReport:
        """A report from its JSON object, any version so far; a bad one is one CaiError."""
        if not isinstance(data, dict):
            raise CaiError("not a JSON object", where)
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise CaiError(f"schema_version {version!r} is not one this cai reads (1 to "
                           f"{SCHEMA_VERSION}); a newer cai wrote it", where, "schema_version")
        if version == 1 and not data.get("judge_model"):
            data = {**data, "judge_model": data.get("feedback_model")}
        try:
            return cls.model_validate({**data, "schema_version": version})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise CaiError(err["msg"], where, field) from None

    @classmethod
    def read(cls, path: Path) -> PolicyEvalReport | None:
        """The report in `path` (a report.json or its folder); None when there is none yet
        (a stage still running); a file that is not a report is one CaiError."""
        path = path / "report.json" if path.is_dir() else path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None  # torn by a writer still at work; the atomic writer never leaves one
        return cls.from_json(data, str(path))

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json", exclude_none=False))

    def rating(self, block: str, player: str) -> float | None:
        entry = self.elo.get(block, {}).get(player)
        return entry.rating if entry else None

    def interval(self, block: str, player: str) -> tuple[float | None, float | None]:
        entry = self.elo.get(block, {}).get(player)
        iv = (entry.interval if entry else None) or [None, None]
        return iv[0], iv[1]


__all__ = ["SCHEMA_VERSION", "PolicyEvalReport", "EloEntry", "PrincipleSet", "BestOfK",
           "RefusalRates", "ConditionRates", "ConditionResult", "Condition", "Benchmark"]
