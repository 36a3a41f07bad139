"""The numbers of `cai eval known-answer` (cai.evaluate.known_answer_run): bootstrap
intervals over prompts, the PM's pair accuracy against the gold, best-of-n, the
overoptimization fits with their baselines, and the small helpers that lay out answers.
Kept apart from the stage so each can be read (and tested) on plain arrays."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from cai.core.errors import CaiError

# --------------------------------------------------------------------------- statistics


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Mean of per-prompt values with a 95 % percentile bootstrap interval over prompts."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise CaiError("no prompts to bootstrap over", field="limit")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "prompts": int(x.size)}


def pair_accuracy(groups: list[tuple[list[float], list[float]]]) -> dict[str, Any]:
    """Agreement of a PM with the gold over every within-prompt pair the gold splits.

    `groups` holds, per prompt, (PM scores, gold scores) of its answers. A pair counts when
    the gold differs; it is right when the PM scores the gold's choice strictly higher, and
    half right on a PM tie (so a constant PM scores ½, not 0)."""
    right, pairs = 0.0, 0
    for pm, gold in groups:
        for i in range(len(pm)):
            for j in range(i + 1, len(pm)):
                if gold[i] == gold[j]:
                    continue
                pairs += 1
                d = (pm[i] - pm[j]) * (gold[i] - gold[j])
                right += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return {"accuracy": right / pairs if pairs else None, "pairs": pairs}


def pair_accuracy_ci(groups: list[tuple[list[float], list[float]]], n_boot: int, seed: int
                     ) -> dict[str, Any]:
    """`pair_accuracy` with a 95 % percentile bootstrap interval over prompts: pairs of one
    prompt share its answers, so prompts, not pairs, are what is resampled."""
    per = [pair_accuracy([g]) for g in groups]
    right = np.array([p["accuracy"] * p["pairs"] if p["pairs"] else 0.0 for p in per])
    pairs = np.array([p["pairs"] for p in per], dtype=float)
    out = pair_accuracy(groups)
    if pairs.sum() == 0:
        return {**out, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per), size=(n_boot, len(per)))
    num, den = right[idx].sum(1), pairs[idx].sum(1)
    acc = num[den > 0] / den[den > 0]
    lo, hi = np.percentile(acc, [2.5, 97.5])
    return {**out, "ci_low": float(lo), "ci_high": float(hi)}


def best_of_n(proxy: np.ndarray, scores: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Best-of-n for n = 1, 2, 4, …, k from [prompts, k] arrays: each prompt's k answers
    are cut into k/n disjoint groups, the proxy's best of each group is kept, and each
    score's mean over the kept answers is reported with sqrt(KL_bon(n))."""
    from cai.evaluate.overopt import kl_best_of_n

    k = proxy.shape[1]
    rows, n = [], 1
    while n <= k:
        groups = proxy.reshape(proxy.shape[0], k // n, n)
        pick = groups.argmax(axis=2)  # [prompts, k/n]
        idx = (np.arange(k // n) * n)[None, :] + pick
        row = {"n": n, "kl": kl_best_of_n(n), "sqrt_kl": math.sqrt(kl_best_of_n(n))}
        for name, s in scores.items():
            row[name] = float(np.take_along_axis(s, idx, axis=1).mean())
        rows.append(row)
        n *= 2
    return rows


def fit_or_none(points: list[tuple[float, float]], form: str, baseline: float | None
                ) -> dict[str, Any]:
    """A fit of one form through (sqrt KL, gold) points (`reported: true`, with its R² and
    points), or `reported: false` and why (too few points, no baseline)."""
    from cai.evaluate.overopt import fit_overopt

    pts = [(d, g) for d, g in points if d is not None and g is not None and math.isfinite(d)
           and math.isfinite(g)]
    if baseline is None:
        return {"reported": False, "points": len(pts), "reason": "no baseline point"}
    try:
        fit = fit_overopt([d for d, _ in pts], [g for _, g in pts], form, baseline)
    except CaiError as e:
        return {"reported": False, "points": len(pts), "reason": str(e)}
    return {"reported": True, **fit.as_dict()}


def rl_baseline(steps: list[dict[str, Any]]) -> float | None:
    """The gold monitor of RL's first logged step, when that step's policy is still the
    initial one (sqrt KL ≈ 0): the same training prompts and sampling as every later point,
    unlike a gold rate measured elsewhere (held-out prompts, other settings)."""
    first = min(steps, key=lambda e: e["step"], default=None)
    if first is None or first.get("gold") is None or first.get("step") != 1 or \
            first.get("sqrt_kl") is None or first["sqrt_kl"] > 1e-3:
        return None
    return float(first["gold"])


def rl_points(log_path: Path) -> list[dict[str, Any]]:
    """RL's per-step sqrt(KL), reward (the train PM) and monitors, from its log.jsonl (read
    as training writes it: a line cut by a kill is left out)."""
    from cai.train.common import read_steps

    return [{"step": e.get("step"), "sqrt_kl": e.get("sqrt_kl"), "train_pm": e.get("reward_mean"),
             "test_pm": e.get("monitor/test_pm"), "gold": e.get("monitor/gold")}
            for e in read_steps(log_path)]


def grid(which: list[tuple[int, int]], values: Any, prompts: int, n: int) -> np.ndarray:
    """[prompts, n] array of per-answer values (answer k is `which[k]`), NaN where a
    prompt has fewer answers."""
    out = np.full((prompts, n), np.nan)
    for (i, j), v in zip(which, values, strict=True):
        out[i, j] = float(v)
    return out


def examples(prompts: list[Any], which: list[tuple[int, int]], texts: list[str],
             gold: np.ndarray) -> list[dict[str, Any]]:
    """The first answer to each of the first three prompts, with its own prompt and gold
    (answer k of `which` belongs to prompt which[k][0])."""
    first = {}
    for k, (i, _) in enumerate(which):
        first.setdefault(i, k)
    rows = []
    for i in sorted(first)[:3]:
        k = first[i]
        rows.append({"prompt": prompts[i].prompt, "answer": texts[k],
                     "gold": float(gold[i, which[k][1]])})
    return rows


def matmul_gflops(n: int = 1024, reps: int = 3) -> float:
    """Best fp32 GFLOP/s of an n×n matmul now: how much of the machine the run had (a
    loaded machine makes every stage slower)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return round(2 * n ** 3 / best / 1e9, 1)


__all__ = ["bootstrap_mean", "pair_accuracy", "pair_accuracy_ci", "best_of_n", "fit_or_none",
           "rl_baseline", "rl_points", "grid", "examples", "matmul_gflops"]
