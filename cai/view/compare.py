"""Two runs side by side in the viewer: constitution diff, SL and label records, counts."""

from __future__ import annotations

from typing import Any

from cai.core.errors import CaiError
from cai.view.runs import Run, read_jsonl_in


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
            source = s.manifest.config.get("constitution")
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
    a = {(r.get("prompt"), r.get("sample", 0)): r for r in read_jsonl_in(so, "data.jsonl")}
    rows = []
    for r in read_jsonl_in(sn, "data.jsonl"):
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

    a = {key(r): r for r in read_jsonl_in(lo, "data.jsonl")}
    rows = []
    for r in read_jsonl_in(ln, "data.jsonl"):
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
        co = ol[k].manifest.counts if k in ol else {}
        cn = nw[k].manifest.counts if k in nw else {}
        extra_o = (ol[k].manifest.label_stats or {}) if k in ol else {}
        extra_n = (nw[k].manifest.label_stats or {}) if k in nw else {}
        for name in list(dict.fromkeys([*co, *cn])):
            if co.get(name) != cn.get(name):
                rows.append({"stage": k, "count": name, "old": co.get(name), "new": cn.get(name)})
        for name in list(dict.fromkeys([*extra_o, *extra_n])):
            if extra_o.get(name) != extra_n.get(name):
                rows.append({"stage": k, "count": f"label_stats.{name}", "old": extra_o.get(name),
                             "new": extra_n.get(name)})
    return rows


__all__ = ["constitution_diff", "compare_sl", "compare_labels", "compare_counts"]
