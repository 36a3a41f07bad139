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
        return str(self.manifest.get("stage") or "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line of a running stage
                if limit is not None and len(out) >= limit:
                    break
    return out


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
        """Stage folders whose manifest says `stage` ("sl", "label", "train.pm", ...)."""
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


LABEL_FLAGS = ("position-inconsistent", "low-mass", "tie")


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


# --------------------------------------------------------------------------- training


CURVE_KEYS = ("reward", "kl", "sqrt_kl", "loss", "accuracy", "rewards/margins", "mean_p",
              "abs_error", "entropy", "response_length")
"""Logged values drawn as curves on the training page, in this order when present."""


def curves(log: list[dict[str, Any]], width: int = 240, height: int = 70) -> list[dict[str, Any]]:
    """SVG polyline points of each logged value over the steps: curves for every run, even
    one whose PNGs were never drawn (the viewer writes nothing)."""
    out = []
    for key in CURVE_KEYS:
        ys = [(i, float(r[key])) for i, r in enumerate(log)
              if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
              and math.isfinite(float(r[key]))]
        if not ys:
            continue
        lo, hi = min(y for _, y in ys), max(y for _, y in ys)
        span_x = max(1, len(log) - 1)
        span_y = (hi - lo) or 1.0
        pts = " ".join(f"{4 + (width - 8) * i / span_x:.1f},"
                       f"{height - 4 - (height - 8) * (y - lo) / span_y:.1f}" for i, y in ys)
        out.append({"key": key, "points": pts, "lo": lo, "hi": hi, "first": ys[0][1],
                    "last": ys[-1][1], "n": len(ys), "width": width, "height": height})
    return out


def training(run: Run) -> list[dict[str, Any]]:
    """Per training folder: its kind, eval numbers, the last log line and its PNGs."""
    out = []
    for s in run.stages:
        if not s.stage.startswith("train."):
            continue
        log = _read_jsonl(s.path / "log.jsonl")
        ev = _read_json(s.path / "eval.json") or {}
        by_source = ev.get("by_source") or ev.get("per_source") or {}
        numbers = {k: v for k, v in ev.items() if isinstance(v, int | float) and
                   not isinstance(v, bool)}
        out.append({"key": s.key, "stage": s.stage, "manifest": s.manifest, "eval": numbers,
                    "by_source": {k: (v if isinstance(v, dict) else {"accuracy": v})
                                  for k, v in by_source.items()},
                    "reliability": ev.get("reliability") or [],
                    "log_first": log[0] if log else None, "log_last": log[-1] if log else None,
                    "log_steps": len(log), "curves": curves(log),
                    "pngs": run.pngs(s.path, recurse=True)})
    return out


# --------------------------------------------------------------------------- evaluation


def evaluation(run: Run, key: str | None = None) -> dict[str, Any] | None:
    """The Elo table and every judged prompt with each policy's answer and the verdicts."""
    s = run.pick("eval.policies", key)
    if s is None:
        return None
    rep = _read_json(s.path / "report.json") or {}
    elo = rep.get("elo") or {}
    table = []
    for name, v in sorted((elo.get("overall") or {}).items(),
                          key=lambda kv: -((kv[1] or {}).get("rating") or 0)):
        lo, hi = ((v or {}).get("interval") or [None, None])[:2]
        table.append({"model": name, "rating": v.get("rating"), "lo": lo, "hi": hi,
                      "red_team": ((elo.get("red_team") or {}).get(name) or {}).get("rating"),
                      "helpful": ((elo.get("helpful") or {}).get(name) or {}).get("rating"),
                      "refusal": (rep.get("refusal") or {}).get(name) or {}})
    comparisons = {r["id"]: r for r in _read_jsonl(s.path / "comparisons.jsonl") if "id" in r}
    examples = {(r.get("set"), r.get("prompt_id")): r for r in _read_jsonl(s.path / "examples.jsonl")}
    prompts: dict[tuple[str, str], dict[str, Any]] = {}
    for g in _read_jsonl(s.path / "games.jsonl"):
        k = (g.get("set"), g.get("prompt_id"))
        item = prompts.setdefault(k, {"set": k[0], "prompt_id": k[1], "prompt": None,
                                      "answers": {}, "games": [], "_cands": {}})
        comp = comparisons.get(g.get("comparison") or "")
        if comp is not None:
            item["prompt"] = item["prompt"] or comp.get("prompt")
            pair = {comp.get("response_a", ""), comp.get("response_b", "")}
            for m in (g["model_a"], g["model_b"]):
                item["_cands"][m] = item["_cands"].get(m, pair) & pair
            if len(pair) == 2 and not math.isclose(comp.get("p_a", 0.5), 0.5, abs_tol=1e-12):
                same = math.isclose(comp.get("p_a", 0.5), g.get("p_a", 0.5), abs_tol=1e-9)
                a_text = comp.get("response_a") if same else comp.get("response_b")
                b_text = comp.get("response_b") if same else comp.get("response_a")
                item["_cands"][g["model_a"]] = item["_cands"][g["model_a"]] & {a_text}
                item["_cands"][g["model_b"]] = item["_cands"][g["model_b"]] & {b_text}
        item["games"].append({"a": g.get("model_a"), "b": g.get("model_b"), "p_a": g.get("p_a"),
                              "flags": (comp or {}).get("flags") or [],
                              "identical": g.get("comparison") is None})
    for k, item in prompts.items():
        ex = examples.get(k)
        if ex:
            item["prompt"] = ex.get("prompt")
            item["answers"] = dict(ex.get("responses") or {})
        for m, cands in item.pop("_cands").items():
            if m not in item["answers"] and len(cands) == 1:
                item["answers"][m] = next(iter(cands))
    return {"key": s.key, "report": rep, "table": table, "prompts": list(prompts.values()),
            "players": rep.get("players") or [t["model"] for t in table],
            "pngs": run.pngs(s.path)}


# --------------------------------------------------------------------------- two runs


def _load_constitution(run: Run) -> tuple[Any, str | None]:
    """The run's constitution from the file its config names, if it still has the hash the
    run was stamped with; else (None, why)."""
    from cai.constitution import load

    stamp = run.constitution()
    if not stamp:
        return None, "this run has no constitution stamp"
    source = (run.pipeline.get("config") or {}).get("constitution")
    if not source:
        for s in run.stages:
            source = (s.manifest.get("config") or {}).get("constitution")
            if source:
                break
    if not source:
        return None, "the run's config names no constitution file"
    try:
        c = load(source)
    except CaiError as err:
        return None, f"cannot load {source}: {err}"
    if c.hash != stamp.get("hash"):
        return None, (f"{source} has changed since this run (hash {c.hash[:19]}…, the run has "
                      f"{str(stamp.get('hash'))[:19]}…)")
    return c, None


def constitution_diff(old: Run, new: Run) -> dict[str, Any]:
    """Principles added, removed and changed by id, with their old and new texts."""
    from cai.constitution import diff

    a, why_a = _load_constitution(old)
    b, why_b = _load_constitution(new)
    out: dict[str, Any] = {"old": old.constitution(), "new": new.constitution(),
                           "problems": [w for w in (why_a, why_b) if w], "rows": []}
    if a is None or b is None:
        return out
    d = diff(a, b)
    for section in ("sl", "rl"):
        pa = {p["id"]: p for p in a.data[section]["principles"]}
        pb = {p["id"]: p for p in b.data[section]["principles"]}
        for kind, ids in (("added", d.added[section]), ("removed", d.removed[section]),
                          ("changed", d.changed[section])):
            for i in ids:
                out["rows"].append({"section": section, "id": i, "kind": kind,
                                    "old": _principle_text(pa.get(i)),
                                    "new": _principle_text(pb.get(i))})
    out["other"] = d.other_changes
    out["changed"] = d.content_changed
    return out


def _principle_text(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    parts = [f"{k}: {p[k]}" for k in ("critique", "revision", "text", "weight") if k in p]
    return "\n".join(parts)


def compare_sl(old: Run, new: Run, limit: int = 100) -> list[dict[str, Any]]:
    """SL records of the same prompt (and sample) in both runs, side by side."""
    so, sn = old.pick("sl", None), new.pick("sl", None)
    if so is None or sn is None:
        return []
    a = {(r.get("prompt"), r.get("sample", 0)): r for r in _read_jsonl(so.path / "data.jsonl")}
    rows = []
    for r in _read_jsonl(sn.path / "data.jsonl"):
        o = a.get((r.get("prompt"), r.get("sample", 0)))
        if o is not None:
            rows.append({"old": o, "new": r, "same": o.get("final") == r.get("final")})
        if len(rows) >= limit:
            break
    return rows


def compare_labels(old: Run, new: Run, limit: int = 50) -> dict[str, Any]:
    """Labels of the same pair in both runs: those that flipped side, and those that moved
    most (|Δ p_a|)."""
    lo, ln = old.pick("label", None), new.pick("label", None)
    if lo is None or ln is None:
        return {"flipped": [], "moved": [], "matched": 0}

    def key(r: dict[str, Any]) -> tuple:
        return (r.get("prompt"), r.get("response_a"), r.get("response_b"))

    a = {key(r): r for r in _read_jsonl(lo.path / "data.jsonl")}
    rows = []
    for r in _read_jsonl(ln.path / "data.jsonl"):
        o = a.get(key(r))
        if o is None or not isinstance(o.get("p_a"), int | float) or not isinstance(
                r.get("p_a"), int | float):
            continue
        rows.append({"old": o, "new": r, "delta": r["p_a"] - o["p_a"],
                     "flipped": (o["p_a"] - 0.5) * (r["p_a"] - 0.5) < 0})
    flipped = sorted((x for x in rows if x["flipped"]), key=lambda x: -abs(x["delta"]))
    moved = sorted(rows, key=lambda x: -abs(x["delta"]))
    return {"flipped": flipped[:limit], "moved": moved[:limit], "matched": len(rows),
            "n_flipped": len(flipped)}


def compare_counts(old: Run, new: Run) -> list[dict[str, Any]]:
    """Every manifest count that differs between the runs, stage by stage."""
    rows = []
    keys = [s.key for s in old.stages] + [s.key for s in new.stages if s.key not in
                                          {x.key for x in old.stages}]
    ol = {s.key: s for s in old.stages}
    nw = {s.key: s for s in new.stages}
    for k in keys:
        co = (ol[k].manifest.get("counts") or {}) if k in ol else {}
        cn = (nw[k].manifest.get("counts") or {}) if k in nw else {}
        extra_o = (ol[k].manifest.get("label_stats") or {}) if k in ol else {}
        extra_n = (nw[k].manifest.get("label_stats") or {}) if k in nw else {}
        for name in list(dict.fromkeys([*co, *cn])):
            if co.get(name) != cn.get(name):
                rows.append({"stage": k, "count": name, "old": co.get(name), "new": cn.get(name)})
        for name in list(dict.fromkeys([*extra_o, *extra_n])):
            if extra_o.get(name) != extra_n.get(name):
                rows.append({"stage": k, "count": f"label_stats.{name}", "old": extra_o.get(name),
                             "new": extra_n.get(name)})
    return rows


def file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


__all__ = ["Run", "StageFolder", "Page", "page_of", "facets", "PAGE_SIZE", "evaluation",
           "training", "constitution_diff", "compare_sl", "compare_labels", "compare_counts"]
