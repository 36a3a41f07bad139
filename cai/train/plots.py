"""Pictures of a training run: curves from its per-step log, and the one reliability
diagram (with the expected calibration error it draws) that the PM, DPO and the labeler
evaluation all use.

They are drawn from files on disk (log.jsonl, eval.json), not from a live trainer, so a
run can be plotted while it trains, after a crash, or on another machine.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.train.common import read_steps

LOG_NAMES = ("log.jsonl", "training_log.jsonl")
SKIP = {"step", "epoch", "total_flos", "num_tokens"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def read_log(run: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """The per-step entries of a run folder's log (or of a log file given directly)."""
    p = Path(run)
    if p.is_dir():
        found = next((p / n for n in LOG_NAMES if (p / n).is_file()), None)
        if found is None:
            raise CaiError(f"no {' or '.join(LOG_NAMES)} in this folder (is it a training run?)", str(p))
        p = found
    if not p.is_file():
        raise CaiError("not found", str(p))
    entries = read_steps(p)  # a line a kill cut short is left out: a live run plots too
    return p, entries


def _plottable(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and abs(v) < 1e100)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """One PNG per logged quantity (loss, learning rate, accuracy, …) against the step.

    Written to `<run>/plots/` unless `out` is given; returns the files written.
    """
    path, entries = read_log(run_dir)
    entries = [e for e in entries if _plottable(e.get("step"))]
    series = {}
    for k in sorted({k for e in entries for k in e if k not in SKIP}):
        # NaN, infinities and values beyond any sensible scale cannot be drawn; skip them.
        pts = [(e["step"], e[k]) for e in entries if _plottable(e.get(k))]
        if pts:
            series[k] = pts
    if not series:
        raise CaiError("the log has no finite numeric per-step values to plot", str(path))
    folder = Path(out) if out is not None else path.parent / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = []
    for key, pts in series.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} — {path.parent.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        target = folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png")
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def expected_calibration_error(conf: Any, correct: Any, bins: int) -> tuple[float, list]:
    """ECE over equal-width confidence bins on [½, 1]; also the per-bin table for the plot.

    `conf` is the probability given to the option preferred, `correct` whether (or with what
    probability) that option is the right one.
    """
    import numpy as np

    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    table, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        if m.any():
            acc, c = float(correct[m].mean()), float(conf[m].mean())
            ece += m.mean() * abs(acc - c)
            table.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()),
                          "confidence": c, "accuracy": acc})
    return float(ece), table


def reliability_png(table: list[dict[str, Any]], path: str | Path, title: str = "calibration",
                    xlabel: str = "predicted preference", ylabel: str = "target preference") -> Path:
    """A reliability diagram from `expected_calibration_error`'s per-bin table.

    x: the probability given to the option preferred; y: how often (or with what target
    probability) that option is the right one. Points on the diagonal are calibrated; each
    point's size and label give its bin's count.
    """
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0.5, 1], [0.5, 1], "--", color="grey", label="calibrated")
    if table:
        n = max(b["n"] for b in table)
        ax.scatter([b["confidence"] for b in table], [b["accuracy"] for b in table],
                   s=[20 + 200 * b["n"] / n for b in table], zorder=3, label="bins (size = count)")
        ax.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], alpha=0.5)
        for b in table:
            ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlim(0.5, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["plot_run", "reliability_png", "expected_calibration_error", "read_log"]
