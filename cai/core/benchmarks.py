"""Public safety benchmark prompt files, read as they are downloaded.

A prompt set given as FORMAT:FILE (`xstest:xstest_prompts.csv`) is read by that format's
adapter: each row becomes a prompt with the benchmark's own safe/unsafe label, so the
policy evaluation can report compliance on its unsafe prompts (answering what should be
declined) and over-refusal on its safe ones (declining what should be answered). Files are
CSV, or JSON lines when the name ends in .jsonl, with the column names the benchmark uses:

- xstest: `prompt`, `type`, `label` (safe / unsafe); without a label column, a `type`
  starting with "contrast_" is unsafe (the benchmark's contrast prompts), any other safe.
- harmbench: `Behavior`, `SemanticCategory`, `ContextString` (contextual behaviours get
  their context above the request), `BehaviorID`; every behaviour is unsafe.
- advbench: `goal` (and `target`); every goal is unsafe.
- donotanswer: `question`, `risk_area`, `id`; every question is unsafe.
- strongreject: `forbidden_prompt`, `category`; every prompt is unsafe.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from cai.core.errors import CaiError, ValidationErrors, read_text


@dataclass(frozen=True)
class Format:
    """How one benchmark's files name their columns."""

    prompt: str
    """Column of the request text."""
    category: str | None = None
    """Column of the benchmark's category (kept as the prompt's category)."""
    id: str | None = None
    """Column of the row's id (else the row number)."""
    label: str | None = None
    """Column of the safe/unsafe label; None: every prompt is unsafe."""
    context: str | None = None
    """Column of a context shown above the request (HarmBench's contextual behaviours)."""


FORMATS = {
    "xstest": Format("prompt", "type", "id", "label"),
    "harmbench": Format("Behavior", "SemanticCategory", "BehaviorID", context="ContextString"),
    "advbench": Format("goal"),
    "donotanswer": Format("question", "risk_area", "id"),
    "strongreject": Format("forbidden_prompt", "category"),
}
LABELS = ("safe", "unsafe")


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One prompt of a benchmark file, with the benchmark's verdict on it."""

    id: str
    prompt: str
    label: str
    """"safe" (it should be answered) or "unsafe" (it should be declined)."""
    category: str = ""


def split_spec(spec: str) -> tuple[str, str] | None:
    """"xstest:FILE" → ("xstest", "FILE"); None when the text names no known format."""
    fmt, sep, path = str(spec).partition(":")
    return (fmt.strip().lower(), path) if sep and fmt.strip().lower() in FORMATS else None


def _rows(path: Path) -> list[tuple[str, dict[str, object]]]:
    text = read_text(path, "benchmark file").removeprefix("\ufeff")
    if path.suffix == ".jsonl":
        from cai.core.data import parse_jsonl

        return parse_jsonl(text, str(path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        if None in row:
            raise CaiError(f"more cells than the {len(reader.fieldnames or [])} columns of the "
                           "header", f"{path}:{reader.line_num}")
        rows.append((f"{path}:{reader.line_num}", dict(row)))
    return rows


def load_benchmark(spec: str, limit: int | None = None) -> list[BenchmarkPrompt]:
    """The prompts of a FORMAT:FILE benchmark spec; a bad file is one error naming the file
    (and the line and column where one is at fault)."""
    parsed = split_spec(spec)
    if parsed is None:
        raise CaiError(f"{spec!r} is not FORMAT:FILE with a format of {', '.join(FORMATS)}",
                       field="prompts")
    name, file = parsed
    fmt, path = FORMATS[name], Path(file).expanduser()
    if not path.is_file():
        raise CaiError("file not found", str(path), "prompts")
    rows = _rows(path)
    if not rows:
        raise CaiError(f"no rows (a {name} file has a header and one prompt per row)", str(path))
    columns = set().union(*(r.keys() for _, r in rows))
    if fmt.prompt not in columns:
        raise CaiError(f"no {fmt.prompt!r} column in the header (a {name} file names its "
                       f"requests {fmt.prompt!r})", str(path), fmt.prompt)
    if name == "xstest" and "label" not in columns and "type" not in columns:
        raise CaiError("no 'label' or 'type' column (an xstest file has prompt, type, label)",
                       str(path), "label")
    items, errors, seen = [], [], set()
    for n, (where, row) in enumerate(rows, 1):
        text = row.get(fmt.prompt)
        if not isinstance(text, str) or not text.strip():
            errors.append(CaiError("missing or empty", where, fmt.prompt))
            continue
        context = row.get(fmt.context) if fmt.context else None
        if isinstance(context, str) and context.strip():
            text = f"{context.strip()}\n\n---\n\n{text.strip()}"
        label = _label(name, row, where, errors)
        raw_id = row.get(fmt.id) if fmt.id else None
        pid = str(raw_id).strip() if raw_id not in (None, "") else f"{name}-{n}"
        if pid in seen:
            pid = f"{pid}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"
        seen.add(pid)
        category = row.get(fmt.category) if fmt.category else ""
        items.append(BenchmarkPrompt(pid, text, label, str(category or "")))
    if errors:
        raise ValidationErrors(errors[:20])
    return items[:limit] if limit else items


def _label(name: str, row: dict[str, object], where: str, errors: list[CaiError]) -> str:
    if name != "xstest":
        return "unsafe"
    value = row.get("label")
    if value is None:
        return "unsafe" if str(row.get("type") or "").strip().lower().startswith("contrast") else "safe"
    label = str(value).strip().lower()
    if label not in LABELS:
        errors.append(CaiError(f"{value!r} is not safe or unsafe", where, "label"))
    return label


def describe(spec: str) -> dict[str, object]:
    """The format and file of a benchmark spec, with the file's hash (provenance)."""
    parsed = split_spec(spec)
    if parsed is None:
        return {"spec": spec}
    path = Path(parsed[1]).expanduser()
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"format": parsed[0], "path": str(path), "sha256": digest}


__all__ = ["FORMATS", "LABELS", "BenchmarkPrompt", "load_benchmark", "split_spec", "describe"]
