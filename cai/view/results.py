"""What the viewer's training and evaluation pages show, read from a run's result files.

The pages read each stage's results through the typed readers of `cai.core.results`
(`eval.json`, `examples.jsonl`) and the logs, so one schema serves the report and the viewer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cai.core.results import Example, PreferenceEval
from cai.view.runs import Run, read_json_in, read_jsonl_in

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
    from cai.core.stage import load_registry

    registry = load_registry()
    out = []
    for s in run.stages:
        if s.stage not in registry or registry[s.stage].group != "train":
            continue
        log = read_jsonl_in(s, "log.jsonl")
        ev = ((PreferenceEval.read(s.path) if s.file("eval.json") is not None else None)
              or PreferenceEval({}))
        out.append({"key": s.key, "stage": s.stage, "manifest": s.manifest, "eval": ev.numbers,
                    "by_source": {k: dataclasses.asdict(v) for k, v in ev.by_source.items()},
                    "reliability": ev.reliability,
                    "log_first": log[0] if log else None, "log_last": log[-1] if log else None,
                    "log_steps": len(log), "curves": curves(log),
                    "pngs": run.pngs(s.path, recurse=True)})
    return out


# --------------------------------------------------------------------------- evaluation


def evaluation(run: Run, key: str | None = None) -> dict[str, Any] | None:
    """The Elo table and every judged prompt with each policy's answer and the verdicts."""
    s = run.pick("eval", key)
    if s is None:
        return None
    rep = read_json_in(s, "report.json") or {}
    elo = rep.get("elo") or {}
    table = []
    for name, v in sorted((elo.get("overall") or {}).items(),
                          key=lambda kv: -((kv[1] or {}).get("rating") or 0)):
        lo, hi = ((v or {}).get("interval") or [None, None])[:2]
        table.append({"model": name, "rating": v.get("rating"), "lo": lo, "hi": hi,
                      "red_team": ((elo.get("red_team") or {}).get(name) or {}).get("rating"),
                      "helpful": ((elo.get("helpful") or {}).get(name) or {}).get("rating"),
                      "refusal": (rep.get("refusal") or {}).get(name) or {}})
    comparisons = {r["id"]: r for r in read_jsonl_in(s, "comparisons.jsonl") if "id" in r}
    examples = {(e.set, e.prompt_id): e for e in (Example.read_all(s.path)
                                                  if s.file("examples.jsonl") is not None else [])}
    prompts: dict[tuple[str, str], dict[str, Any]] = {}
    for g in read_jsonl_in(s, "games.jsonl"):
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
            item["prompt"] = ex.prompt
            item["answers"] = dict(ex.responses)
        for m, cands in item.pop("_cands").items():
            if m not in item["answers"] and len(cands) == 1:
                item["answers"][m] = next(iter(cands))
    return {"key": s.key, "report": rep, "table": table, "prompts": list(prompts.values()),
            "players": rep.get("players") or [t["model"] for t in table],
            "pngs": run.pngs(s.path)}


__all__ = ["CURVE_KEYS", "curves", "training", "evaluation"]
