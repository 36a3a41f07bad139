"""Input loaders: prompt sets and response pairs, from jsonl files or local `datasets` folders.

Every bad line is reported as file:line and field, so a user fixing a 10 000-line file
knows exactly where to look.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, ValidationErrors, read_text


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a prompt set."""

    id: str
    prompt: str
    category: str = ""
    truncated: bool = False
    """The prompt text was cut to fit a model's context (a stage's `overlong: truncate`)."""
    system: str = ""
    """A system prompt sent before it (an evaluation's test condition); empty: none."""


@dataclass(frozen=True)
class PairItem:
    """A prompt with two responses to compare."""

    id: str
    prompt: str
    response_a: str
    response_b: str
    truncated: bool = False
    """Texts were cut to fit a model's context (a stage's `overlong: truncate`)."""


def _text_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def _rows(source: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a jsonl file or a `save_to_disk` folder."""
    path = Path(source)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise CaiError(f"not a `datasets` folder: {exc}", str(path)) from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        return [(f"{path}[{i}]", dict(row)) for i, row in enumerate(ds)]
    if not path.exists():
        raise CaiError("file not found", str(path))
    return parse_jsonl(read_text(path, "jsonl file"), str(path))


def parse_jsonl(text: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(where:line, object) for each non-blank line of jsonl text; bad lines are reported
    together (up to 20), each as `file:line`. A UTF-8 byte-order mark is accepted, as in YAML."""
    rows, errors = [], []
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(CaiError(f"invalid JSON: {exc.msg}", f"{where}:{n}"))
            continue
        except RecursionError:
            errors.append(CaiError("invalid JSON: nested too deeply", f"{where}:{n}"))
            continue
        if not isinstance(obj, dict):
            errors.append(CaiError("expected a JSON object", f"{where}:{n}"))
            continue
        rows.append((f"{where}:{n}", obj))
    if errors:
        raise ValidationErrors(errors[:20])
    return rows


def _check_limit(limit: int | None) -> None:
    # `items[:0]` would be everything and `items[:-1]` all but the last: refuse both.
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CaiError(f"must be at least 1, got {limit!r}", field="limit")


def _row_id(row: dict, fallback: str) -> str:
    value = row.get("id")
    return fallback if value is None or value == "" else str(value)


def _text(row: dict, key: str, where: str, errors: list[CaiError]) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        what = "missing" if key not in row else "must be a non-empty string"
        errors.append(CaiError(what, where, key))
        return ""
    return value


def load_prompts(source: str | Path, text_field: str = "prompt",
                 limit: int | None = None) -> list[PromptItem]:
    """Prompts from jsonl (`prompt`, optional `id`, `category`) or a local dataset folder;
    a bare name (`red_team`) picks a shipped prompt set."""
    from cai.core.resources import resolve

    _check_limit(limit)
    return read_prompts(resolve(source, "prompts"), text_field, limit, source)


def read_prompts(path: str | Path, text_field: str = "prompt", limit: int | None = None,
                 source: str | Path | None = None) -> list[PromptItem]:
    """`load_prompts` for a path already resolved (a caller that resolves its inputs up
    front); `source` is the name the user gave, for the error of an empty set."""
    _check_limit(limit)
    items, errors, seen = [], [], set()
    for where, row in _rows(path):
        text = _text(row, text_field, where, errors)
        pid = _row_id(row, _text_id(text))
        if pid in seen:
            errors.append(CaiError(f"duplicate id {pid!r}", where, "id"))
        seen.add(pid)
        items.append(PromptItem(pid, text, str(row.get("category") or "")))
    if errors:
        raise ValidationErrors(errors[:20])
    if not items:
        raise CaiError("no prompts", str(path if source is None else source))
    return items[:limit] if limit else items


def load_pairs(source: str | Path, limit: int | None = None) -> list[PairItem]:
    """Pairs from jsonl with `prompt`, `response_a`, `response_b` (optional `id`)."""
    _check_limit(limit)
    items, errors = [], []
    for where, row in _rows(source):
        p, a, b = (_text(row, k, where, errors) for k in ("prompt", "response_a", "response_b"))
        items.append(PairItem(_row_id(row, _text_id(p, *sorted((a, b)))), p, a, b))
    if errors:
        raise ValidationErrors(errors[:20])
    if not items:
        raise CaiError("no pairs", str(source))
    return items[:limit] if limit else items
