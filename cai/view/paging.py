"""Paged reading of a stage's jsonl for the viewer, by byte offsets.

Why: a stage of 100,000 records is hundreds of megabytes of jsonl; parsing it whole for
every page would take seconds. The first page reads only its own lines (and the file's last
line, so a torn one is not counted); a line-offset index (one fast scan, cached by file size
and mtime) serves any later page; filters scan once and keep the matching line numbers per
query. A line that is not valid JSON is listed on the page, never silently counted.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE_SIZE = 50
"""Records per page."""


def _torn(path: Path) -> bool:
    """Whether the file's last line has no newline (a writer killed mid-line)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


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


def first_lines(path: Path, n: int, bad: list[int] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """The first n records without scanning the rest of the file (the fast first page);
    the 1-based numbers of unreadable lines met on the way go to `bad`."""
    out = []
    with open(path, "rb") as f:
        k = 0
        for line in f:
            if not line.strip():
                continue
            try:
                out.append((k, json.loads(line)))
            except ValueError:
                if bad is not None:
                    bad.append(k + 1)
            k += 1
            if len(out) >= n:
                break
    return out


def last_line_bad(path: Path) -> bool:
    """Whether the file's last non-blank line is not valid JSON (torn by a kill, or edited):
    read from the end, so the fast first page can leave it out of the count."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        block = b""
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start) + block
            end = start
            if block.strip() and b"\n" in block.rstrip():
                break
    tail = block.rstrip().rsplit(b"\n", 1)[-1]
    if not tail.strip():
        return False
    try:
        json.loads(tail)
    except ValueError:
        return True
    return False


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
    bad_lines: list[int] = field(default_factory=list)
    """1-based numbers of lines met that are not valid JSON: not shown, not counted."""
    torn: bool = False
    """The file's last line has no newline and is not valid JSON (a kill cut it)."""

    @property
    def warning(self) -> str | None:
        """One line saying what was left out, or None."""
        if not self.bad_lines:
            return None
        shown = ", ".join(str(n) for n in self.bad_lines[:5]) + (
            ", …" if len(self.bad_lines) > 5 else "")
        return (f"{len(self.bad_lines)} line{'s' if len(self.bad_lines) != 1 else ''} not valid "
                f"JSON (line {shown}){': the last line is torn (cut by a kill?)' if self.torn else ''}"
                "; not shown and not counted")


def page_of(path: Path | None, page: int, match: Callable[[dict[str, Any]], bool] | None = None,
            query_key: Any = None, prefilter: Callable[[bytes], bool] | None = None,
            sort: Callable[[dict[str, Any]], float] | None = None,
            size: int = PAGE_SIZE) -> Page:
    """Page `page` (1-based) of the records of `path` that `match`, optionally sorted.

    Unfiltered and unsorted, page 1 reads only its own lines (and the file's last line, so a
    torn one is not counted). Otherwise the file is scanned once per (query, file version)
    and the matching line numbers are cached. Unreadable lines met are listed, not hidden.
    """
    if path is None or not path.is_file():
        return Page([], 1, 1, 0, 0)
    page = max(1, page)
    stamp = _stamp(path)
    last_bad = _CACHE.get(("last-bad", str(path), stamp), lambda: last_line_bad(path))
    if match is None and sort is None:
        if page == 1:
            bad: list[int] = []
            rows = first_lines(path, size, bad)
            lines = _CACHE.get(("count", str(path), stamp), lambda: count_lines(path))
            if last_bad and len(rows) >= size:  # the last line was not reached: count it out
                bad.append(lines)
            total = max(0, lines - len(bad))
            return Page([r for _, r in rows], 1, max(1, math.ceil(total / size)), total, total,
                        [n for n, _ in rows], bad, last_bad and _torn(path))
        idx = line_index(path)
        total = len(idx) - last_bad
        pages = max(1, math.ceil(total / size))
        page = min(page, pages)
        want = list(range((page - 1) * size, min(total, page * size)))
        got = idx.read(want)
        seen = {n for n, _ in got}
        bad = [n + 1 for n in want if n not in seen] + ([len(idx)] if last_bad else [])
        return Page([r for _, r in got], page, pages, total, total, [n for n, _ in got],
                    bad, last_bad and _torn(path))

    def scan() -> tuple[list[int], list[int]]:
        keyed: list[tuple[float, int]] = []
        unreadable: list[int] = []
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
                    unreadable.append(n + 1)
                    continue
                if match is None or match(rec):
                    keyed.append((sort(rec) if sort else 0.0, n))
        if sort is not None:
            keyed.sort(key=lambda t: (-t[0], t[1]))
        return [n for _, n in keyed], unreadable

    numbers, bad = _CACHE.get(("scan", str(path), stamp, query_key), scan)
    idx = line_index(path)
    if last_bad and len(idx) not in bad:
        bad = [*bad, len(idx)]
    total = len(numbers)
    pages = max(1, math.ceil(total / size))
    page = min(page, pages)
    chosen = numbers[(page - 1) * size: page * size]
    got = idx.read(chosen)
    return Page([r for _, r in got], page, pages, total, len(idx) - last_bad,
                [n for n, _ in got], bad, last_bad and _torn(path))


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


__all__ = ["LineIndex", "Page", "page_of", "facets", "first_lines", "count_lines", "last_line_bad",
           "line_index", "PAGE_SIZE"]
