"""The known-answer run's own report: one plot and a short markdown page from its json.

The plot has three panels, each against sqrt(KL) from the SL-CAI model: the RL steps (the
train PM it pushed on, the test PM and the gold as monitors), best-of-n (the same three
scores of the train PM's pick), and every policy's gold rate with its interval. PM scores
and the gold live on different scales, so the PMs are read on the left axis and the gold
on the right.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cai.core.records import write_text_atomic

COLORS = {"train_pm": "tab:blue", "test_pm": "tab:orange", "gold": "tab:green"}
LABELS = {"train_pm": "train PM (proxy)", "test_pm": "test PM", "gold": "gold"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(y: list[float], w: int) -> list[float]:
    """Trailing mean over up to w points (RL batches are small and noisy)."""
    out = []
    for i in range(len(y)):
        part = y[max(0, i - w + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def _three(ax: Any, xs: list[float], series: dict[str, list[float | None]], marker: str,
           smooth: int = 1) -> None:
    """Train and test PM on ax (left), the gold on a twin axis (right)."""
    right = ax.twinx()
    for name in ("train_pm", "test_pm", "gold"):
        ys = series.get(name)
        if not ys:
            continue
        pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
        if not pts:
            continue
        px, py = zip(*pts)
        target = right if name == "gold" else ax
        target.plot(px, py, marker, color=COLORS[name], alpha=0.35 if smooth > 1 else 1.0,
                    label=LABELS[name])
        if smooth > 1:
            target.plot(px, _smooth(list(py), smooth), "-", color=COLORS[name])
    ax.set_xlabel("sqrt(KL) from SL-CAI (nats^½)")
    ax.set_ylabel("PM score")
    right.set_ylabel("gold rate", color=COLORS["gold"])
    handles = ax.get_legend_handles_labels()
    rh = right.get_legend_handles_labels()
    ax.legend(handles[0] + rh[0], handles[1] + rh[1], fontsize=7, loc="best")


def plot(result: dict[str, Any], path: Path) -> None:
    """known_answer.png: RL steps, best-of-n, and the policies, against sqrt(KL)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = result.get("rl_steps") or []
    _three(axes[0], [r["sqrt_kl"] for r in steps],
           {k: [r.get(k) for r in steps] for k in COLORS}, ".", smooth=5)
    axes[0].set_title("RL (PPO on the train PM), per rollout batch")
    bon = result.get("best_of_n") or []
    _three(axes[1], [r["sqrt_kl"] for r in bon], {k: [r.get(k) for r in bon] for k in COLORS},
           "o-")
    for r in bon:
        axes[1].annotate(f"n={r['n']}", (r["sqrt_kl"], r["train_pm"]), fontsize=7)
    axes[1].set_title("best-of-n from SL-CAI, picked by the train PM")
    ax = axes[2]
    for name, row in (result.get("policies") or {}).items():
        g = row["gold"]
        x = row["sqrt_kl_from_sl"]
        ax.errorbar([x], [g["mean"]], yerr=[[g["mean"] - g["ci_low"]], [g["ci_high"] - g["mean"]]],
                    fmt="o", capsize=3, label=name)
    ax.set_xlabel("sqrt(KL) from SL-CAI (nats^½)")
    ax.set_ylabel("gold rate (95 % CI over prompts)")
    ax.set_title("policies on held-out prompts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: Any, digits: int = 3) -> str:
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return f"{x:.{digits}f}"
    return "n/a"


def _ci(d: dict[str, Any] | None) -> str:
    if not d:
        return "n/a"
    return f"{_f(d['mean'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}]"


def _fit_line(name: str, fit: dict[str, Any] | None) -> str:
    if not fit or not fit.get("reported"):
        why = (fit or {}).get("reason", "too few points")
        return f"| {name} | {(fit or {}).get('points', 0)} | n/a | n/a | n/a | not fitted: {why} |"
    peak = f"none claimed: {fit.get('no_peak')}" if fit.get("peak_sqrt_kl") is None else (
        f"sqrt(KL) {_f(fit['peak_sqrt_kl'])}, gold {_f(fit['peak_gold'])}")
    return (f"| {name} | {fit['points']} | {_f(fit['alpha'])} | {_f(fit['beta'])} | "
            f"{_f(fit.get('r2'))} | {peak} |")


def markdown(result: dict[str, Any]) -> str:
    """report.md: the headline figures, the policies' table, the fits, and what it means."""
    acc_ci = result.get("pm_gold_accuracy_ci") or {}
    lines = ["# Known-answer run", "",
             "A gold preference that code checks was planted in noisy labels; every figure "
             "below is measured with the exact gold on held-out prompts.", "",
             f"- PM accuracy against the gold: **{_f(result.get('pm_gold_accuracy'))}** on "
             f"{result.get('pm_gold_pairs', 'n/a')} held-out pairs, 95 % CI over prompts "
             f"[{_f(acc_ci.get('ci_low'))}, {_f(acc_ci.get('ci_high'))}] (test PM: "
             f"{_f(result.get('test_pm_gold_accuracy'))})",
             f"- RL (on the PM) − SL gold: **{_ci(result.get('rl_minus_sl_gold'))}**",
             f"- DPO − SL gold: **{_ci(result.get('dpo_minus_sl_gold'))}**",
             f"- RL on the noisy gold itself − SL gold: "
             f"**{_ci(result.get('rl_direct_minus_sl_gold'))}**; on its negation: "
             f"**{_ci(result.get('rl_direct_negated_minus_sl_gold'))}**",
             f"- base rate (embedded policy): {_f(result.get('base_rate'))}; "
             f"{result.get('prompts')} held-out prompts",
             f"- wall time: {_f(result.get('wall_s'), 0)} s; load average at the end "
             f"{(result.get('machine') or {}).get('load_avg_at_end')}", "",
             "![known-answer curves](known_answer.png)", "",
             "| policy | gold mean [95 % CI] | KL from SL | train PM | test PM |",
             "|---|---|---|---|---|"]
    for name, row in (result.get("policies") or {}).items():
        lines.append(f"| {name} | {_ci(row['gold'])} | {_f(row['kl_from_sl'])} | "
                     f"{_f(row.get('train_pm'))} | {_f(row.get('test_pm'))} |")
    lines += ["", "Overoptimization fits (gold − start ≈ d·(α − β·d) for best-of-n, "
              "d·(α − β·log d) for RL; d = sqrt(KL)):", "",
              "| curve, form | points | α | β | R² | gold peak |", "|---|---|---|---|---|---|"]
    for curve in ("bon_fit", "rl_fit"):
        for form, fit in (result.get(curve) or {}).items():
            lines.append(_fit_line(f"{curve[:-4]}, {form}", fit))
    lines += ["", "What this shows: the machinery (labels → PM → RL/DPO → evaluation) carries "
              "a known preference through in the right direction, or, where a figure misses "
              "its target, by how much. What it does not show: that the embedded model can "
              "judge harmlessness — no model judges anything here; the gold is a word check.",
              ""]
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: Path) -> None:
    """report.md and known_answer.png in `out`."""
    plot(result, out / "known_answer.png")
    write_text_atomic(out / "report.md", markdown(result))


__all__ = ["write_report", "plot", "markdown"]
