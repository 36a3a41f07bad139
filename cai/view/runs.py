"""Reading run folders for the viewer: stages, filters and two-run comparison (paged
records are read by `cai.view.paging`, re-exported here).

Every path is resolved before it is read and read only inside the run folder (`Run.inside`).

Nothing here writes: the viewer is read-only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.manifest import Manifest
from cai.core.results import read_json as _read_json
from cai.view.paging import (  # noqa: F401 - the viewer's readers, re-exported
    PAGE_SIZE,
    LineIndex,
    Page,
    _torn,
    count_lines,
    facets,
    first_lines,
    line_index,
    page_of,
)


@dataclass
class StageFolder:
    """One stage folder of a run."""

    key: str
    """Path relative to the run ("sl", "round-2/label"); "." when the run is one stage."""
    path: Path
    """The folder."""
    manifest: Manifest
    """Its manifest.json, read through the schema (`cai.core.manifest`)."""
    run: Run | None = None
    """The run it belongs to: every file of the folder is read through `file`, inside it."""

    @property
    def stage(self) -> str:
        return self.manifest.stage

    def file(self, name: str) -> Path | None:
        """`name` in this folder, resolved; None (and a problem shown on every page) when a
        symlink takes it outside the run. The viewer reads a stage's files only through this."""
        rel = f"{self.key}/{name}" if self.key != "." else name
        return self.run.inside(rel) if self.run is not None else self.path / name


class Run:
    """A run folder (a pipeline run, or one stage folder) as the viewer sees it.

    Every path it reads — manifests, records, logs, results — is resolved first and read only
    when it lies inside the run folder; a symlink out of it, a manifest that is not a valid
    manifest, and a torn or unreadable line are listed in `problems` (shown on every page)
    instead of being followed, taken for "no such stage", or miscounted.
    """

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise CaiError("not a run folder (no such folder)", str(root))
        self.root = root.resolve()
        self.name = root.name or str(root)
        self.problems: list[str] = []
        pipe = self.inside("pipeline.json")
        self.pipeline: dict[str, Any] = (_read_json(pipe) if pipe else None) or {}
        if not isinstance(self.pipeline, dict):
            self.problems.append("pipeline.json is not a JSON object; its config is not shown")
            self.pipeline = {}
        self.stages: list[StageFolder] = []
        own = self._manifest(".")
        if own is not None:
            self.stages.append(StageFolder(".", self.root, own, self))
        elif not (self.root / "manifest.json").exists():
            found = sorted(self.root.glob("*/manifest.json")) + sorted(
                self.root.glob("round-*/*/manifest.json"),
                key=lambda p: (int(p.parent.parent.name.split("-")[1])
                               if p.parent.parent.name.split("-")[1].isdigit() else 0, str(p)))
            for m in found:
                key = m.parent.relative_to(self.root).as_posix()
                data = self._manifest(key)
                if data is not None:
                    self.stages.append(StageFolder(key, self.root / key, data, self))
        if not self.stages and not self.problems:
            raise CaiError("no stage folder with a manifest.json here; give a run folder "
                           "(runs/NAME) or a stage folder", str(root))

    def _manifest(self, key: str) -> Manifest | None:
        """The manifest of the stage folder `key` (relative to the run), or None; one that
        escapes the run or does not fit the manifest schema is a problem, not a stage."""
        rel = "manifest.json" if key == "." else f"{key}/manifest.json"
        if not (self.root / rel).exists():
            return None
        path = self.inside(rel)
        if path is None:
            return None
        data = _read_json(path)
        if data is None:
            self.problem(f"{rel} is not a valid manifest (not JSON): that folder is not shown")
            return None
        try:
            return Manifest.parse(data, rel)
        except CaiError as err:
            self.problem(f"{rel}: {err.message}: that folder is not shown")
            return None

    def problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def inside(self, rel: str) -> Path | None:
        """`rel` resolved (symlinks followed) when it lies inside the run, else None and a
        problem naming it; it need not exist."""
        if "\x00" in rel:
            return None
        try:
            p = (self.root / rel).resolve()
        except (OSError, ValueError, RuntimeError):
            self.problem(f"{rel} cannot be resolved (a symlink loop?): not shown")
            return None
        if p != self.root and self.root not in p.parents:
            self.problem(f"{rel} points outside the run folder: not shown")
            return None
        return p

    def of(self, stage: str) -> list[StageFolder]:
        """Stage folders whose manifest says `stage` ("sl", "label", "pm", ...; a folder
        written under a stage's old name counts as the stage's)."""
        return [s for s in self.stages if s.stage == stage]

    def pick(self, stage: str, key: str | None) -> StageFolder | None:
        options = self.of(stage)
        for s in options:
            if s.key == key:
                return s
        return options[0] if options else None

    def constitution(self) -> dict[str, Any] | None:
        for s in self.stages:
            if s.manifest.constitution:
                return s.manifest.constitution
        return None

    def safe_path(self, rel: str) -> Path | None:
        """`rel` inside this run as a file, or None when it escapes the run or is missing."""
        if "\x00" in rel:
            return None
        try:
            p = (self.root / rel).resolve()
        except (OSError, ValueError, RuntimeError):
            return None
        if p != self.root and self.root not in p.parents:
            return None
        return p if p.is_file() else None

    def pngs(self, folder: Path, recurse: bool = False) -> list[str]:
        """PNG files of a folder inside the run, relative to the run."""
        pattern = "**/*.png" if recurse else "*.png"
        return sorted(rel for p in folder.glob(pattern)
                      if "checkpoint" not in p.as_posix()
                      and self.safe_path(rel := p.relative_to(self.root).as_posix()) is not None)


def read_json_in(folder: StageFolder, name: str) -> Any:
    """A stage's JSON file, read only inside the run (see `StageFolder.file`)."""
    p = folder.file(name)
    return _read_json(p) if p is not None else None


def read_jsonl_in(folder: StageFolder, name: str) -> list[dict[str, Any]]:
    """A stage's jsonl records, read only inside the run; a torn or unreadable line is a
    problem shown on every page, not a silent gap."""
    p = folder.file(name)
    if p is None or not p.is_file():
        return []
    rows, bad = [], []
    with open(p, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                bad.append(n)
    if bad and folder.run is not None:
        folder.run.problem(_bad_lines_text(folder.key, name, bad, _torn(p)))
    return rows


def _bad_lines_text(key: str, name: str, lines: list[int], torn: bool) -> str:
    where = name if key == "." else f"{key}/{name}"
    shown = ", ".join(str(n) for n in lines[:5]) + (", …" if len(lines) > 5 else "")
    return (f"{where}: {len(lines)} line{'s' if len(lines) != 1 else ''} not valid JSON "
            f"(line {shown}){'; the last line is torn (cut by a kill?)' if torn else ''}: "
            "not shown and not counted")


def text_prefilter(q: str) -> Callable[[bytes], bool]:
    """A cheap raw-line test for a text search: the query as it would appear in JSON."""
    needle = json.dumps(q, ensure_ascii=False)[1:-1].lower().encode("utf-8")
    return lambda line: needle in line.lower()


def _texts(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != "provenance":
                yield from _texts(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _texts(v)


def contains_text(rec: dict[str, Any], q: str) -> bool:
    q = q.lower()
    return any(q in t.lower() for t in _texts(rec))


# --------------------------------------------------------------------------- SL records


def sl_fields(rec: dict[str, Any]) -> dict[str, list[str]]:
    return {"flag": list(rec.get("filters") or []) + list(rec.get("flags") or []),
            "principle": [r.get("principle", "") for r in rec.get("rounds") or []],
            "category": [rec.get("category") or ""]}


def sl_prefilter(flag: str, principle: str, category: str, q: str) -> Callable[[bytes], bool] | None:
    """Raw-line tests that every match passes, so most lines are never parsed: each chosen
    value as it is written in the JSON of a record."""
    needles = [json.dumps(flag, ensure_ascii=False).encode() if flag else b"",
               (f'"principle": {json.dumps(principle, ensure_ascii=False)}'.encode()
                if principle else b""),
               (f'"category": {json.dumps(category, ensure_ascii=False)}'.encode()
                if category else b"")]
    needles = [n for n in needles if n]
    text = text_prefilter(q) if q else None
    if not needles and text is None:
        return None
    return lambda line: all(n in line for n in needles) and (text is None or text(line))


def sl_match(flag: str, principle: str, category: str, q: str) -> Callable[[dict], bool] | None:
    if not (flag or principle or category or q):
        return None

    def match(rec: dict[str, Any]) -> bool:
        f = sl_fields(rec)
        return ((not flag or flag in f["flag"]) and (not principle or principle in f["principle"])
                and (not category or category in f["category"])
                and (not q or contains_text(rec, q)))
    return match


# --------------------------------------------------------------------------- labels


LABEL_FLAGS = ("position-inconsistent", "low-mass", "tie", "unparsed", "judge-refused",
               "no-verdict", "judges-disagree")


def order_probs(rec: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per principle, P(response a is better) from each order: {principle: {ab, ba}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for j in rec.get("judgements") or []:
        p = j.get("p_first")
        if p is None:
            continue
        pa = p if j.get("order") == "ab" else 1.0 - p
        out.setdefault(j.get("principle", "?"), {}).setdefault(j.get("order", "?"), []).append(pa)
    return {k: {o: sum(v) / len(v) for o, v in d.items()} for k, d in out.items()}


def disagreement(rec: dict[str, Any]) -> float:
    """Mean over principles of |P(a) in order ab − P(a) in order ba| (0 when one order)."""
    diffs = [abs(d["ab"] - d["ba"]) for d in order_probs(rec).values() if "ab" in d and "ba" in d]
    return sum(diffs) / len(diffs) if diffs else 0.0


def confidence(rec: dict[str, Any]) -> float:
    """|p_a − ½|: how far the label is from a coin flip."""
    p = rec.get("p_a")
    return abs(float(p) - 0.5) if isinstance(p, int | float) else 0.0


def label_fields(rec: dict[str, Any]) -> dict[str, list[str]]:
    return {"flag": list(rec.get("flags") or []),
            "principle": sorted({j.get("principle", "") for j in rec.get("judgements") or []})}


def label_prefilter(flag: str, q: str) -> Callable[[bytes], bool] | None:
    """Raw-line tests for the label filters (see `sl_prefilter`)."""
    return sl_prefilter(flag, "", "", q)


def label_match(flag: str, q: str) -> Callable[[dict], bool] | None:
    if not (flag or q):
        return None

    def match(rec: dict[str, Any]) -> bool:
        return (not flag or flag in (rec.get("flags") or [])) and (not q or contains_text(rec, q))
    return match


SORTS: dict[str, Callable[[dict[str, Any]], float]] = {
    "confidence": confidence, "disagreement": disagreement}



def file_size(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


__all__ = ["Run", "StageFolder", "Page", "page_of", "facets", "PAGE_SIZE", "LineIndex",
           "read_json_in", "read_jsonl_in"]
