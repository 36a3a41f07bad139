"""Constitutions: the YAML schema, validation with file:line:field errors, the content hash,
seeded weighted principle sampling, and the diff between two versions.

A constitution is the only thing that steers the method, so every record cites the exact
one that produced it by `{name, version, hash}`. The hash covers the parsed content, not the
bytes, so reformatting or comments never change it while any edit of a principle does.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cai.core.config import safe_yaml, yaml_error
from cai.core.errors import CaiError, ValidationErrors, read_text
from cai.core.seeds import derive_seed

SCHEMA = "cai.constitution/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _nonblank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


WEIGHT_RANGE = (1e-6, 1e6)
"""Sampling weights must lie in this range: `.inf`, NaN or a weight so small that every key
underflows (1e-320) would make the sampler draw the first principle every time."""


def _weight(value: float) -> float:
    lo, hi = WEIGHT_RANGE
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


class SLPrinciple(_Strict):
    """One critique → revision principle of the supervised stage."""

    id: str
    """Unique, stable id; records cite it."""
    critique: str
    """Asks the model to find what is wrong with its last answer under this principle."""
    revision: str
    """Asks the model to rewrite its answer to fix what the critique found."""
    weight: float = 1.0
    """Relative sampling weight, from 1e-6 to 1e6."""

    _check = field_validator("id", "critique", "revision")(_nonblank)
    _check_weight = field_validator("weight")(_weight)


class RLPrinciple(_Strict):
    """One comparison principle: a multiple-choice question put to the feedback model."""

    id: str
    """Unique, stable id; labels cite it."""
    text: str
    """A question whose answer is one of the options (A) and (B) that follow it."""
    weight: float = 1.0
    """Relative sampling weight, from 1e-6 to 1e6."""

    _check = field_validator("id", "text")(_nonblank)
    _check_weight = field_validator("weight")(_weight)


class FewShot(_Strict):
    """A worked critique → revision example shown before the real conversation."""

    prompt: str
    response: str
    critique: str
    revision: str
    principle: str | None = None
    """Id of the SL principle the example illustrates; its critique and revision requests
    are shown in the example. Without it the first principle's requests are used."""

    _check = field_validator("prompt", "response", "critique", "revision")(_nonblank)


class SLSection(_Strict):
    rounds: int = Field(default=4, ge=1, le=64)
    """Default number of critique → revision rounds."""
    principles: list[SLPrinciple] = Field(min_length=1)
    few_shot: list[FewShot] = Field(default_factory=list)


class RLSection(_Strict):
    principles: list[RLPrinciple] = Field(min_length=1)


class HelpfulnessSection(_Strict):
    """Comparison principles that ask which answer is more *helpful*.

    The `rl` principles ask which answer is less harmful: the right question for red-team
    prompts, the wrong one for an ordinary request. The policy evaluation judges its
    helpful prompt set with these instead, so its helpfulness column measures helpfulness.
    Same shape as `rl.principles`; ids must not repeat any `rl` id (records cite them)."""

    principles: list[RLPrinciple] = Field(min_length=1)


PRINCIPLE_SETS = ("harmlessness", "helpfulness")
"""The comparison principle sets: `rl.principles` and `helpfulness.principles`."""


class ConstitutionSpec(_Strict):
    schema_: str = Field(alias="schema")
    name: str
    version: str
    description: str = ""
    sl: SLSection
    rl: RLSection
    helpfulness: HelpfulnessSection | None = None
    """Optional: principles for judging answers to helpful prompts (see HelpfulnessSection)."""

    _check = field_validator("name", "version")(_nonblank)


@dataclass(frozen=True)
class Stamp:
    """What every record says about the constitution that produced it."""

    name: str
    version: str
    hash: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "hash": self.hash}


@dataclass
class Constitution:
    """A validated constitution plus where it came from."""

    spec: ConstitutionSpec
    data: dict[str, Any]
    path: str = "<memory>"
    hash: str = ""
    principle_set: str = "harmlessness"
    """Which comparison set `rl_principles` returns (see `for_set`)."""
    _sl_index: dict[str, SLPrinciple] = field(default_factory=dict, repr=False)
    _rl_index: dict[str, RLPrinciple] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.file_hash = content_hash(self.data)
        # A view on another principle set keys its draws and label ids apart from the
        # file's own (the same pair judged for helpfulness is another judgement), while
        # its records still cite the file's stamp.
        self.hash = (self.file_hash if self.principle_set == "harmlessness"
                     else "sha256:" + hashlib.sha256(
                         f"{self.file_hash}\x1f{self.principle_set}".encode()).hexdigest())
        self._sl_index = {p.id: p for p in self.spec.sl.principles}
        self._rl_index = {p.id: p for p in self.rl_principles}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.name, self.version, self.file_hash)

    @property
    def has_helpfulness(self) -> bool:
        return self.spec.helpfulness is not None

    def for_set(self, name: str) -> Constitution:
        """The constitution with `rl_principles` = the named comparison set.

        "harmlessness" is `rl.principles` (this object); "helpfulness" is
        `helpfulness.principles`, or `rl.principles` when the file has none (callers that
        report which set they used check `has_helpfulness`).
        """
        if name not in PRINCIPLE_SETS:
            raise CaiError(f"unknown principle set {name!r}; known: {', '.join(PRINCIPLE_SETS)}")
        if name == self.principle_set or (name == "helpfulness" and not self.has_helpfulness):
            return self
        return Constitution(spec=self.spec, data=self.data, path=self.path, principle_set=name)

    def set_source(self, name: str) -> str:
        """Where the named set's principles come from in the file: "rl.principles" or
        "helpfulness.principles"."""
        return ("helpfulness.principles" if name == "helpfulness" and self.has_helpfulness
                else "rl.principles")

    @property
    def sl_principles(self) -> list[SLPrinciple]:
        return list(self.spec.sl.principles)

    @property
    def rl_principles(self) -> list[RLPrinciple]:
        if self.principle_set == "helpfulness" and self.spec.helpfulness is not None:
            return list(self.spec.helpfulness.principles)
        return list(self.spec.rl.principles)

    @property
    def few_shot(self) -> list[FewShot]:
        return list(self.spec.sl.few_shot)

    def sl_principle(self, pid: str) -> SLPrinciple:
        return self._sl_index[pid]

    def rl_principle(self, pid: str) -> RLPrinciple:
        return self._rl_index[pid]

    def to_json(self) -> dict[str, Any]:
        return {**self.data, "hash": self.hash, "path": self.path}


# ---------------------------------------------------------------------------- hashing


def content_hash(data: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the parsed file: keys sorted, no whitespace."""
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canon.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- loading


MAX_NODES = 100_000
"""More YAML values than this (say, aliases nested to expand exponentially) is refused."""


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None,
              active: frozenset = frozenset()) -> dict:
    """Map each key path (tuple of keys / indexes) to its 1-based line in the file.

    A key maps to the line of the key itself, so "unknown key" and "wrong type" errors
    point at the line a user would edit. Duplicate mapping keys are collected under
    the special entry `("__dupes__",)`. A node that contains itself (through an alias) or
    a file that expands to more than `MAX_NODES` values is a `ValueError`.
    """
    out = {"__count__": 0} if out is None else out
    out["__count__"] += 1
    if out["__count__"] > MAX_NODES:
        raise ValueError(f"expands to more than {MAX_NODES} values (aliases?)")
    if id(node) in active:
        raise ValueError("a value contains itself (a recursive alias)")
    active = active | {id(node)}
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
            if key in seen:
                out.setdefault(("__dupes__",), []).append((path + (key,), key_node.start_mark.line + 1))
            seen.add(key)
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out, active)
            out[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out, active)
    return out


def _dotted(loc: Sequence) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _nearest_line(lines: dict, loc: tuple) -> int:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 1


def parse(text: str, path: str = "<memory>") -> Constitution:
    """Parse and validate constitution text; raise `ValidationErrors` naming file:line:field."""
    try:
        return _parse(text, path)
    except RecursionError:
        raise ValidationErrors([CaiError("YAML nested too deeply", f"{path}:1")]) from None


def _parse(text: str, path: str) -> Constitution:
    try:
        node = yaml.compose(text)
        data = safe_yaml(text, f"{path}:1")  # the project's one loader: aliases bounded
    except yaml.YAMLError as exc:
        raise ValidationErrors([yaml_error(exc, path)]) from None
    except CaiError as exc:
        raise ValidationErrors([exc]) from None
    if node is None or not isinstance(data, dict):
        raise ValidationErrors([CaiError("expected a mapping at the top level", f"{path}:1")])
    try:
        lines = _line_map(node)
    except ValueError as exc:
        raise ValidationErrors([CaiError(f"YAML structure refused: {exc}", f"{path}:1")]) from None
    errors: list[CaiError] = []
    for loc, line in lines.get(("__dupes__",), []):
        errors.append(CaiError("duplicate key", f"{path}:{line}", _dotted(loc)))
    if data.get("schema") != SCHEMA and "schema" in data:
        errors.append(CaiError(f"unsupported schema {data.get('schema')!r}, expected {SCHEMA!r}",
                               f"{path}:{lines.get(('schema',), 1)}", "schema"))
    try:
        spec = ConstitutionSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            # pydantic reports the alias for `schema`; keep user-facing names.
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required field is missing"
            elif err["type"] == "too_short":
                msg = "must not be empty"
            errors.append(CaiError(msg, f"{path}:{_nearest_line(lines, loc)}", _dotted(loc)))
        raise ValidationErrors(errors) from None
    sections = [("sl", spec.sl.principles), ("rl", spec.rl.principles)]
    if spec.helpfulness is not None:
        sections.append(("helpfulness", spec.helpfulness.principles))
    for section, plist in sections:
        seen: dict[str, int] = {}
        for i, p in enumerate(plist):
            if p.id in seen:
                loc = (section, "principles", i, "id")
                errors.append(CaiError(f"duplicate id {p.id!r} (first at principles[{seen[p.id]}])",
                                       f"{path}:{_nearest_line(lines, loc)}", _dotted(loc)))
            seen.setdefault(p.id, i)
    rl_ids = {p.id for p in spec.rl.principles}
    for i, p in enumerate(spec.helpfulness.principles if spec.helpfulness else []):
        if p.id in rl_ids:
            loc = ("helpfulness", "principles", i, "id")
            errors.append(CaiError(f"id {p.id!r} is also an rl principle's; records cite ids, "
                                   "so the two sets must not share one",
                                   f"{path}:{_nearest_line(lines, loc)}", _dotted(loc)))
    sl_ids = {p.id for p in spec.sl.principles}
    for i, ex in enumerate(spec.sl.few_shot):
        if ex.principle is not None and ex.principle not in sl_ids:
            loc = ("sl", "few_shot", i, "principle")
            errors.append(CaiError(f"unknown sl principle id {ex.principle!r}",
                                   f"{path}:{_nearest_line(lines, loc)}", _dotted(loc)))
    if errors:
        raise ValidationErrors(errors)
    return Constitution(spec=spec, data=data, path=path)


def load(path: str | Path) -> Constitution:
    """Load and validate a constitution file, or a shipped one by name (`harmless`)."""
    from cai.core.resources import resolve

    return read(resolve(path, "constitutions"))


def read(path: Path) -> Constitution:
    """`load` for a path already resolved (a stage that resolves its input files up front)."""
    return parse(read_text(path, "constitution"), str(path))


# ---------------------------------------------------------------------------- sampling


def weighted_sample(items: Sequence, weights: Sequence[float], k: int, rng: random.Random) -> list:
    """k distinct items, drawn with probability proportional to weight, without replacement.

    Uses exponential keys (Efraimidis–Spirakis): key = log(u) / w, keep the k largest.
    """
    if k > len(items):
        raise CaiError(f"asked for {k} distinct principles but the constitution has {len(items)}")
    if k < 1:
        raise CaiError(f"asked for {k} principles; at least 1 is needed", field="principles")
    lo, hi = WEIGHT_RANGE
    if len(weights) != len(items) or not all(math.isfinite(w) and lo <= w <= hi for w in weights):
        raise CaiError(f"sampling weights must be numbers from {lo:g} to {hi:g}")
    keys = [math.log(max(rng.random(), 1e-300)) / w for w in weights]
    order = sorted(range(len(items)), key=lambda i: keys[i], reverse=True)
    return [items[i] for i in order[:k]]


def sample_sl_principle(c: Constitution, *key: object) -> SLPrinciple:
    """The principle for one (prompt, sample, round), a pure function of `key`."""
    rng = random.Random(derive_seed("sl", c.hash, *key))
    ps = c.sl_principles
    return weighted_sample(ps, [p.weight for p in ps], 1, rng)[0]


def sample_rl_principles(c: Constitution, k: int, *key: object) -> list[RLPrinciple]:
    """K distinct comparison principles for one pair, a pure function of `key`.

    Callers pass an order-free key for the pair so that swapping its responses keeps the
    same principles (and the label becomes exactly 1 − p).
    """
    rng = random.Random(derive_seed("rl", c.hash, *key))
    ps = c.rl_principles
    return weighted_sample(ps, [p.weight for p in ps], k, rng)


# ---------------------------------------------------------------------------- diff


@dataclass
class Diff:
    old: Stamp
    new: Stamp
    added: dict[str, list[str]]
    removed: dict[str, list[str]]
    changed: dict[str, list[str]]
    other_changes: list[str]

    @property
    def content_changed(self) -> bool:
        return self.old.hash != self.new.hash

    @property
    def version_warning(self) -> str | None:
        if self.content_changed and self.old.version == self.new.version:
            return (f"content changed but version is still {self.new.version}: "
                    "bump `version` so records can tell the two apart")
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"old": self.old.as_dict(), "new": self.new.as_dict(), "added": self.added,
                "removed": self.removed, "changed": self.changed,
                "other_changes": self.other_changes, "warning": self.version_warning}


def diff(old: Constitution, new: Constitution) -> Diff:
    """Principles added, removed and changed (by id) in each section, plus other edits."""
    added, removed, changed = {}, {}, {}
    for section in ("sl", "rl", "helpfulness"):
        a = {p["id"]: p for p in (old.data.get(section) or {}).get("principles", [])}
        b = {p["id"]: p for p in (new.data.get(section) or {}).get("principles", [])}
        added[section] = [i for i in b if i not in a]
        removed[section] = [i for i in a if i not in b]
        changed[section] = [i for i in a if i in b and a[i] != b[i]]
    other = []
    for key in ("name", "description", "schema"):
        if old.data.get(key) != new.data.get(key):
            other.append(key)
    if old.data["sl"].get("rounds") != new.data["sl"].get("rounds"):
        other.append("sl.rounds")
    if old.data["sl"].get("few_shot") != new.data["sl"].get("few_shot"):
        other.append("sl.few_shot")
    return Diff(old.stamp, new.stamp, added, removed, changed, other)
