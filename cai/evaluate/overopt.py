"""Overoptimization curves: how the gold score moves as a policy is pushed against a proxy.

Gao, Schulman & Hilton (2022) measured the gold reward of policies optimised against a
proxy reward model and found two simple shapes in d = sqrt(KL(π ‖ π_init)):

    best-of-n:  R(d) = d · (α − β·d)          with KL_bon(n) = log n − (n − 1)/n
    RL:         R(d) = d · (α − β·log d)

R is the gold score *relative to the initial policy* (R(0) = 0), so callers pass the
initial policy's gold as `baseline`. Both forms are linear in (α, β), so each fit is one
least-squares solve with no starting guess to tune; with β > 0 each has one maximum:

    best-of-n:  d* = α / (2β),            R(d*) = α² / (4β)
    RL:         d* = exp(α/β − 1),        R(d*) = β · d*

A fit is made only through at least `MIN_POINTS` points: each form has two parameters and
R(0) = 0, so three points (best-of-n at n = 1, 2, 4) are interpolated exactly and give
R² = 1 and a "peak" whatever the data. A peak is claimed only where the fit explains the
points (R² ≥ `MIN_R2`) and lies within the measured d; otherwise the peak fields stay None
and `no_peak` says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cai.core.errors import CaiError

FORMS = ("bon", "rl")
MIN_POINTS = 5
"""Fewest points a fit is made through (more than the two parameters plus R(0) = 0 pin)."""
MIN_R2 = 0.5
"""Least share of the relative gold's variance a fit must explain before it claims a peak."""


def kl_best_of_n(n: int | float) -> float:
    """KL of best-of-n sampling from its base policy: log n − (n − 1)/n (0 at n = 1)."""
    if not n >= 1:
        raise CaiError(f"best-of-n needs n >= 1, got {n!r}", field="n")
    return math.log(n) - (n - 1) / n


@dataclass
class OveroptFit:
    """A fitted overoptimization curve (see the module docstring for the forms)."""

    form: str
    """"bon" (d·(α − β·d)) or "rl" (d·(α − β·log d))."""
    alpha: float
    """Initial slope of the gold against d = sqrt(KL)."""
    beta: float
    """How fast the gold bends over; > 0 means it peaks."""
    baseline: float
    """The gold of the initial policy, subtracted before fitting."""
    points: int
    """Points fitted."""
    r2: float | None
    """Share of the relative gold's variance (about its mean) the curve explains; None
    when every point has the same gold."""
    d: list[float]
    """The points' sqrt(KL), as fitted (the points the fit used)."""
    gold: list[float]
    """The points' gold, on the caller's scale (baseline not subtracted)."""
    peak_sqrt_kl: float | None = None
    """d at which the fitted gold is highest, when a peak is claimed (see `no_peak`)."""
    peak_kl: float | None = None
    """KL at that point (d²)."""
    peak_gold: float | None = None
    """The fitted gold there, back on the caller's scale (baseline added)."""
    peak_in_range: bool | None = None
    """Whether the peak lies within the measured d (True whenever a peak is claimed)."""
    no_peak: str | None = None
    """Why no peak is claimed: the curve never turns over (β ≤ 0, or for best-of-n α ≤ 0),
    the fit is poor (R² < `MIN_R2`), or its maximum lies beyond the measured d."""

    def predict(self, d: Sequence[float] | np.ndarray) -> np.ndarray:
        """The fitted gold (baseline added) at each d."""
        x = np.asarray(d, dtype=float)
        return self.baseline + self.alpha * x - self.beta * _second(self.form, x)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _second(form: str, d: np.ndarray) -> np.ndarray:
    """The β column of the design matrix: d² (best-of-n) or d·log d (RL; 0 at d = 0)."""
    if form == "bon":
        return d * d
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * np.log(safe), 0.0)


def fit_overopt(d: Sequence[float], gold: Sequence[float], form: str,
                baseline: float = 0.0, min_points: int = MIN_POINTS) -> OveroptFit:
    """Least-squares α, β of one form through points (d, gold − baseline), and its peak
    where the fit earns one (see the module docstring)."""
    if form not in FORMS:
        raise CaiError(f"must be one of {FORMS}", field="form")
    x = np.asarray(d, dtype=float)
    y = np.asarray(gold, dtype=float) - float(baseline)
    if x.shape != y.shape or x.ndim != 1:
        raise CaiError(f"d and gold must be two lists of one length (got {x.shape} and "
                       f"{y.shape})", field="gold")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and math.isfinite(baseline)):
        raise CaiError("d, gold and baseline must be finite numbers", field="gold")
    if np.any(x < 0):
        raise CaiError("d = sqrt(KL) cannot be negative", field="d")
    informative = np.unique(x[x > 0])
    if informative.size < 2:
        raise CaiError(f"needs points at two or more distinct d > 0 to fit α and β (got "
                       f"{informative.size})", field="d")
    if x.size < min_points:
        raise CaiError(f"needs at least {min_points} points to fit α and β honestly (got "
                       f"{x.size}: fewer are interpolated, not fitted)", field="d")
    design = np.stack([x, -_second(form, x)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    alpha, beta = float(alpha), float(beta)
    resid = y - design @ np.array([alpha, beta])
    total = float(((y - y.mean()) ** 2).sum())
    fit = OveroptFit(form, alpha, beta, float(baseline), int(x.size),
                     1.0 - float((resid ** 2).sum()) / total if total > 0 else None,
                     x.tolist(), np.asarray(gold, dtype=float).tolist())
    peak = _peak(form, alpha, beta)
    if peak is None:
        fit.no_peak = "the fitted gold never turns over"
    elif fit.r2 is None or fit.r2 < MIN_R2:
        fit.no_peak = (f"poor fit (R² {fit.r2:.2f} < {MIN_R2})" if fit.r2 is not None
                       else "every point has the same gold")
    elif peak > float(x.max()):
        fit.no_peak = (f"the fitted maximum (sqrt KL {peak:.3g}) lies beyond the data "
                       f"(up to {float(x.max()):.3g})")
    else:
        fit.peak_sqrt_kl = peak
        fit.peak_kl = peak * peak
        fit.peak_gold = float(fit.predict([peak])[0])
        fit.peak_in_range = True
    return fit


def _peak(form: str, alpha: float, beta: float) -> float | None:
    if beta <= 0:
        return None
    if form == "bon":
        return alpha / (2 * beta) if alpha > 0 else None
    exponent = alpha / beta - 1
    return math.exp(exponent) if exponent < 700 else None  # beyond any measurable KL


def fit_bon(d: Sequence[float], gold: Sequence[float], baseline: float = 0.0) -> OveroptFit:
    """Best-of-n: gold − baseline ≈ d·(α − β·d), d = sqrt(KL_bon(n))."""
    return fit_overopt(d, gold, "bon", baseline)


def fit_rl(d: Sequence[float], gold: Sequence[float], baseline: float = 0.0) -> OveroptFit:
    """RL: gold − baseline ≈ d·(α − β·log d), d = sqrt(KL to the initial policy)."""
    return fit_overopt(d, gold, "rl", baseline)


def bon_sqrt_kl(ns: Sequence[int]) -> list[float]:
    """d = sqrt(KL_bon(n)) for each n: the x axis of a best-of-n curve."""
    return [math.sqrt(kl_best_of_n(n)) for n in ns]


__all__ = ["OveroptFit", "fit_overopt", "fit_bon", "fit_rl", "kl_best_of_n", "bon_sqrt_kl",
           "FORMS", "MIN_POINTS", "MIN_R2"]
