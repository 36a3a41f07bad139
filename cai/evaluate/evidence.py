"""What the policy report shows beside the games: Elo blocks with bootstrap intervals and
their figure, an RL run's reward against sqrt(KL), and a preference model's calibration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cai.core.errors import CaiError
from cai.evaluate.elo import Game, bootstrap_intervals, elo_ratings


def rl_points(path: str | Path) -> dict[str, Any]:
    """(step, sqrt KL, reward) from an RL run's per-step log, in step order, and the slope
    of reward against sqrt(KL) (roughly linear in the CAI and RLHF papers).

    sqrt(KL) comes from a non-negative estimate: the log's `sqrt_kl`, else the k3 sum
    `kl_k3`, else `kl` when it is ≥ 0. A negative k1 batch mean is noise around a small
    KL; such a step is left out rather than clamped to 0."""
    p = Path(path)
    if p.is_dir():
        p = p / "log.jsonl"
    if not p.is_file():
        raise CaiError("RL log not found", str(p), "rl_log")
    from cai.train.common import read_steps

    points = []
    for e in read_steps(p):  # the one log reader: a bad line is file:line, a cut last line left out
        reward = e.get("reward_mean", e.get("reward"))
        sq = e.get("sqrt_kl")
        for key in ("kl_k3", "kl"):
            if sq is None and isinstance(e.get(key), int | float) and e[key] >= 0:
                sq = math.sqrt(e[key])
        if isinstance(reward, int | float) and isinstance(sq, int | float) and sq >= 0:
            points.append({"step": e.get("step"), "sqrt_kl": float(sq), "reward": float(reward)})
    points.sort(key=lambda q: q["step"] if isinstance(q["step"], int | float) else math.inf)
    slope = None
    xs = np.array([q["sqrt_kl"] for q in points])
    if len(points) >= 2 and np.ptp(xs) > 0:
        slope = float(np.polyfit(xs, [q["reward"] for q in points], 1)[0])
    return {"log": str(p), "points": points, "slope_reward_per_sqrt_kl": slope}


PM_KEYS = ("pairs", "accuracy", "ece", "mean_margin", "mean_abs_error", "mean_p_target",
           "mean_p_model", "reliability")


def pm_calibration(path: str | Path) -> dict[str, Any]:
    """The calibration numbers of a preference model's held-out evaluation (eval.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.is_file():
        raise CaiError("preference-model eval.json not found", str(p), "pm_eval")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CaiError("not valid JSON", str(p), "pm_eval") from None
    return {"eval": str(p), **{k: data[k] for k in PM_KEYS if k in data}}


def elo_block(games: list[Game], groups: list[tuple[str, str]], players: list[str],
              n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Each player's Elo, its 95 % bootstrap interval and its game count. Groups are
    (set, prompt id): prompts are resampled within each prompt set, so a block pooling
    sets keeps each set's share in every resample."""
    ratings = elo_ratings(games, players)
    ci = (bootstrap_intervals(games, n_boot, seed, 0.05, players, groups,
                              strata=[g[0] for g in groups]) if n_boot and games else {})
    count = {p: sum(p in (a, b) for a, b, _ in games) for p in players}
    return {p: {"rating": ratings[p], "interval": list(ci[p]) if p in ci else None,
                "games": count[p]} for p in players}


def elo_plot(elo: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """One panel per prompt set: each player's rating with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    titles = {"red_team": "harmlessness (red-team)", "helpful": "helpfulness",
              "overall": "overall"}
    panels = [k for k in titles if k in elo]
    height = max(2.4, 0.8 + 0.45 * max(len(v) for v in elo.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), height), sharey=True,
                             squeeze=False)
    for ax, key in zip(axes[0], panels):
        names = list(elo[key])
        y = np.arange(len(names))
        r = np.array([elo[key][n]["rating"] for n in names])
        iv = [elo[key][n]["interval"] or [elo[key][n]["rating"]] * 2 for n in names]
        err = np.array([[ri - lo for ri, (lo, _) in zip(r, iv)], [hi - ri for ri, (_, hi) in zip(r, iv)]])
        ax.errorbar(r, y, xerr=np.maximum(err, 0), fmt="o", capsize=3)
        ax.axvline(1000, color="grey", lw=0.8, ls="--")
        ax.set_yticks(y, names)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set(title=titles[key], xlabel="Elo (95 % bootstrap interval)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rl_plot(rl: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Points coloured by step (in step order), no line through them: sqrt(KL) is not
    # monotone in the step, so joining the points would zigzag; the fitted line shows the trend.
    pts = rl["points"]
    xs, ys = np.array([q["sqrt_kl"] for q in pts]), np.array([q["reward"] for q in pts])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = [q["step"] if isinstance(q["step"], int | float) else n for n, q in enumerate(pts)]
    sc = ax.scatter(xs, ys, c=steps, cmap="viridis", s=18, zorder=3)
    if len(pts) > 1:
        fig.colorbar(sc, ax=ax, label="step")
    slope = rl.get("slope_reward_per_sqrt_kl")
    if slope is not None:
        b = float(np.mean(ys) - slope * np.mean(xs))
        grid = np.linspace(xs.min(), xs.max(), 2)
        ax.plot(grid, b + slope * grid, "--", color="grey", lw=1,
                label=f"fit: {slope:.3g} per sqrt(nat)")
        ax.legend(loc="best", fontsize=8)
    ax.set(xlabel="sqrt(KL to the reference)", ylabel="mean reward", title="RL: reward vs sqrt(KL)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["elo_block", "elo_plot", "rl_plot", "rl_points", "pm_calibration", "PM_KEYS"]
