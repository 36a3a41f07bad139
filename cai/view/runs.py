"""Reading run folders for the viewer: stages, paged records, filters and two-run comparison.

Why paging by byte offsets: a stage of 100,000 records is hundreds of megabytes of jsonl;
parsing it whole for every page would take seconds. The first page reads only its own
lines; a line-offset index (one fast scan, cached by file size and mtime) serves any later
page; filters scan once and keep the matching line numbers per query.

Nothing here writes: the viewer is read-only.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.folders import stage_name
from cai.core.results import read_json as _read_json

PAGE_SIZE = 50
"""Records per page."""


@dataclass
class StageFolder:
    """One stage folder of a run."""

    key: str
    """Path relative to the run ("sl", "round-2/label"); "." when the run is one stage."""
    path: Path
    """The folder."""
    manifest: dict[str, Any]
    """Its manifest.json."""

    @property
    def stage(self) -> str:
        return str(stage_name(self.manifest.get("stage")) or "")


class Run:
    """A run folder (a pipeline run, or one stage folder) as the viewer sees it."""

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise CaiError("not a run folder (no such folder)", str(root))
        self.root = root.resolve()
        self.name = root.name or str(root)
        self.pipeline: dict[str, Any] = _read_json(self.root / "pipeline.json") or {}
        self.stages: list[StageFolder] = []
        own = _read_json(self.root / "manifest.json")
        if isinstance(own, dict):
            self.stages.append(StageFolder(".", self.root, own))
        else:
            found = sorted(self.root.glob("*/manifest.json")) + sorted(
                self.root.glob("round-*/*/manifest.json"),
                key=lambda p: (int(p.parent.parent.name.split("-")[1])
                               if p.parent.parent.name.split("-")[1].isdigit() else 0, str(p)))
            for m in found:
                data = _read_json(m)
                if isinstance(data, dict):
                    key = m.parent.relative_to(self.root).as_posix()
                    self.stages.append(StageFolder(key, m.parent, data))
        if not self.stages:
            raise CaiError("no stage folder with a manifest.json here; give a run folder "
                           "(runs/NAME) or a stage folder", str(root))

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
            if s.manifest.get("constitution"):
                return s.manifest["constitution"]
        return None

    def safe_path(self, rel: str) -> Path | None:
        """`rel` inside this run as a file, or None when it escapes the run or is missing."""
        if "\x00" in rel:
            return None
        try:
            p = (self.root / rel).resolve()
        except (OSError, ValueError):
            return None
        if p != self.root and self.root not in p.parents:
            return None
        return p if p.is_file() else None

    def pngs(self, folder: Path, recurse: bool = False) -> list[str]:
        """PNG files of a folder, relative to the run."""
        pattern = "**/*.png" if recurse else "*.png"
        return sorted(p.relative_to(self.root).as_posix() for p in folder.glob(pattern)
                      if "checkpoint" not in p.as_posix())


# --------------------------------------------------------------------------- paged jsonl


class LineIndex:
    """Byte offsets of the non-blank lines of a jsonl file, found by a chunked numpy scan
    for newlines (a Python loop over 100,000 lines is several times slower)."""

    CHUNK = 16 << 20

    def __init__(self, path: Path):
        import numpy as np

        self.path = path
        st = path.stat()
        self.stamp = (st.st_size, st.st_mtime_ns)
        starts = [np.zeros(1, dtype=np.int64)]
        pos = 0
        with open(path, "rb") as f:
            while chunk := f.read(self.CHUNK):
                nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
                starts.append(nl.astype(np.int64) + pos + 1)
                pos += len(chunk)
        begin = np.concatenate(starts)
        end = np.append(begin[1:] - 1, pos)  # each line's end (its newline or the file's end)
        keep = end > begin  # drop empty lines (and the empty "line" after the last newline)
        if keep.any():
            # Lines of only whitespace are rare; check just the short ones.
            short = np.flatnonzero(keep & (end - begin <= 4))
            if len(short):
                with open(path, "rb") as f:
                    for k in short:
                        f.seek(int(begin[k]))
                        if not f.read(int(end[k] - begin[k])).strip():
                            keep[k] = False
        self.offsets = begin[keep].tolist()

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, numbers: list[int]) -> list[tuple[int, dict[str, Any]]]:
        """The records at these line numbers (0-based), skipping unreadable lines."""
        out = []
        with open(self.path, "rb") as f:
            for n in numbers:
                f.seek(self.offsets[n])
                try:
                    out.append((n, json.loads(f.readline())))
                except ValueError:
                    continue
        return out


class _Cache:
    """A small LRU of indexes and filter results, dropped when the file changes."""

    def __init__(self, size: int = 32):
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


_CACHE = _Cache()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def line_index(path: Path) -> LineIndex:
    return _CACHE.get(("index", str(path), _stamp(path)), lambda: LineIndex(path))


def first_lines(path: Path, n: int) -> list[tuple[int, dict[str, Any]]]:
    """The first n records without scanning the rest of the file (the fast first page)."""
    out = []
    with open(path, "rb") as f:
        k = 0
        for line in f:
            if not line.strip():
                continue
            try:
                out.append((k, json.loads(line)))
            except ValueError:
                pass
            k += 1
            if len(out) >= n:
                break
    return out


def count_lines(path: Path) -> int:
    """Lines, counted on raw bytes in C (no index, no JSON parsing): all the first page of
    a big stage needs. A store has no blank lines; in a hand-edited file each blank line
    counts here (at worst the pager shows one more page, and the index drops them)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(LineIndex.CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")  # a last line without its newline


@dataclass
class Page:
    """One page of records and what the pager needs."""

    rows: list[dict[str, Any]]
    page: int
    pages: int
    total: int
    """Records that match (the whole stage when nothing filters)."""
    all_records: int
    numbers: list[int] = field(default_factory=list)


def page_of(path: Path, page: int, match: Callable[[dict[str, Any]], bool] | None = None,
            query_key: Any = None, prefilter: Callable[[bytes], bool] | None = None,
            sort: Callable[[dict[str, Any]], float] | None = None,
            size: int = PAGE_SIZE) -> Page:
    """Page `page` (1-based) of the records of `path` that `match`, optionally sorted.

    Unfiltered and unsorted, page 1 reads only its own lines. Otherwise the file is scanned
    once per (query, file version) and the matching line numbers are cached.
    """
    if not path.is_file():
        return Page([], 1, 1, 0, 0)
    page = max(1, page)
    if match is None and sort is None:
        if page == 1:
            rows = first_lines(path, size)
            total = _CACHE.get(("count", str(path), _stamp(path)), lambda: count_lines(path))
            return Page([r for _, r in rows], 1, max(1, math.ceil(total / size)), total, total,
                        [n for n, _ in rows])
        idx = line_index(path)
        total = len(idx)
        pages = max(1, math.ceil(total / size))
        page = min(page, pages)
        got = idx.read(list(range((page - 1) * size, min(total, page * size))))
        return Page([r for _, r in got], page, pages, total, total, [n for n, _ in got])

    def scan() -> list[int]:
        keyed: list[tuple[float, int]] = []
        with open(path, "rb") as f:
            k = 0
            for line in f:
                if not line.strip():
                    continue
                n, k = k, k + 1
                if prefilter is not None and not prefilter(line):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if match is None or match(rec):
                    keyed.append((sort(rec) if sort else 0.0, n))
        if sort is not None:
            keyed.sort(key=lambda t: (-t[0], t[1]))
        return [n for _, n in keyed]

    numbers = _CACHE.get(("scan", str(path), _stamp(path), query_key), scan)
    idx = line_index(path)
    total = len(numbers)
    pages = max(1, math.ceil(total / size))
    page = min(page, pages)
    chosen = numbers[(page - 1) * size: page * size]
    got = idx.read(chosen)
    return Page([r for _, r in got], page, pages, total, len(idx), [n for n, _ in got])


def facets(path: Path, fields: Callable[[dict[str, Any]], dict[str, list[str]]]) -> dict[str, list[str]]:
    """The distinct values of each filterable field (flags, principles, ...) in a file."""

    def make() -> dict[str, list[str]]:
        seen: dict[str, set[str]] = {}
        if path.is_file():
            with open(path, "rb") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    for k, vs in fields(rec).items():
                        seen.setdefault(k, set()).update(v for v in vs if v)
        return {k: sorted(v) for k, v in seen.items()}

    if not path.is_file():
        return {}
    return _CACHE.get(("facets", str(path), _stamp(path), fields.__name__), make)


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



def file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


__all__ = ["Run", "StageFolder", "Page", "page_of", "facets", "PAGE_SIZE", "LineIndex"]
