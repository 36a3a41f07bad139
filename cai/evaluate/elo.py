"""Ratings from pairwise games: a Bradley–Terry fit on the Elo scale, bootstrap intervals,
and win-rate tables. Pure functions over `(model_i, model_j, score_i)` games.

Why a fit and not online Elo updates: sequential Elo depends on the order the games are
played in and on its K-factor, so the same comparisons can give different ratings. The
Bradley–Terry maximum-likelihood fit, P(i beats j) = σ(x_i − x_j), uses every game at once
and has one answer. Scores may be soft (a judge's probability that i's answer is better),
entering the likelihood as fractional wins. A weak Gaussian prior on the strengths keeps
the ratings finite when one model wins every game (plain maximum likelihood would send it
to infinity). Ratings are reported on the Elo scale, 400·log10 odds, shifted so the first
(base) model sits at `base`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

Game = tuple[str, str, float]
"""(model_i, model_j, score of model_i in [0, 1]); 1 = i won, 0.5 = tie, 0.8 = soft win."""

ELO_SCALE = 400.0 / math.log(10.0)
"""Elo points per natural log-odds unit: a 400-point gap is 10:1 odds."""
PRIOR = 0.1
"""Precision of the Gaussian prior on log-strengths; worth ~0.4 game against an equal
opponent, so it only matters when a model wins (or loses) nearly everything."""


def players(games: Sequence[Game], models: Sequence[str] | None = None) -> list[str]:
    """The models, in the given order, then any others in order of first appearance."""
    out = list(models or [])
    seen = set(out)
    if len(seen) != len(out):
        raise ValueError("duplicate model names")
    for a, b, _ in games:
        for m in (a, b):
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


def _check(games: Sequence[Game]) -> None:
    for a, b, s in games:
        if a == b:
            raise ValueError(f"a game of {a!r} against itself")
        if not 0.0 <= float(s) <= 1.0 or math.isnan(float(s)):
            raise ValueError(f"score {s!r} of {a!r} vs {b!r} is not in [0, 1]")


def _encode(games: Sequence[Game], names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = {m: k for k, m in enumerate(names)}
    i = np.array([idx[a] for a, _, _ in games], dtype=np.int64)
    j = np.array([idx[b] for _, b, _ in games], dtype=np.int64)
    s = np.array([float(x) for _, _, x in games], dtype=float)
    return i, j, s


def _tables(i: np.ndarray, j: np.ndarray, s: np.ndarray, m: int,
            weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W[a, b] = (weighted) soft wins of a over b; N[a, b] = games between them."""
    w = np.ones_like(s) if weight is None else weight
    wins = np.bincount(i * m + j, w * s, m * m) + np.bincount(j * m + i, w * (1 - s), m * m)
    wins = wins.reshape(m, m)
    return wins, wins + wins.T


def _objective(x: np.ndarray, wins: np.ndarray, prior: float) -> float:
    d = x[:, None] - x[None, :]
    return float(-(wins * np.logaddexp(0.0, -d)).sum() - 0.5 * prior * (x @ x))


def _fit(wins: np.ndarray, n: np.ndarray, prior: float, x0: np.ndarray | None = None,
         tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Newton's method with backtracking on the (concave) penalised log-likelihood."""
    m = wins.shape[0]
    x = np.zeros(m) if x0 is None else x0.copy()
    f = _objective(x, wins, prior)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(x[:, None] - x[None, :])))
        grad = wins.sum(axis=1) - (n * p).sum(axis=1) - prior * x
        v = n * p * (1.0 - p)
        hess = v - np.diag(v.sum(axis=1)) - prior * np.eye(m)
        step = np.linalg.solve(hess, -grad)
        t = 1.0
        while True:
            cand = x + t * step
            fc = _objective(cand, wins, prior)
            if fc >= f - 1e-12 or t < 1e-8:
                break
            t *= 0.5
        x, f = cand, fc
        if np.max(np.abs(t * step)) < tol:
            break
    return x


def bradley_terry(games: Sequence[Game], models: Sequence[str] | None = None,
                  prior: float = PRIOR) -> dict[str, float]:
    """Log-strengths (natural units) with the first model at 0."""
    _check(games)
    names = players(games, models)
    if not names:
        return {}
    i, j, s = _encode(games, names)
    wins, n = _tables(i, j, s, len(names))
    x = _fit(wins, n, prior)
    return {name: float(v - x[0]) for name, v in zip(names, x)}


def elo_ratings(games: Sequence[Game], models: Sequence[str] | None = None,
                base: float = 1000.0, prior: float = PRIOR) -> dict[str, float]:
    """Bradley–Terry ratings on the Elo scale; the first model (the base) gets `base`."""
    return {k: base + ELO_SCALE * v for k, v in bradley_terry(games, models, prior).items()}


def expected_score(rating_a: float, rating_b: float) -> float:
    """P(a beats b) implied by two Elo ratings."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def bootstrap_intervals(games: Sequence[Game], n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05, models: Sequence[str] | None = None,
                        groups: Sequence[Hashable] | None = None, base: float = 1000.0,
                        prior: float = PRIOR, strata: Sequence[Hashable] | None = None
                        ) -> dict[str, tuple[float, float]]:
    """Percentile (1 − alpha) intervals of each Elo rating over bootstrap resamples.

    Games are drawn with replacement. With `groups` (one key per game, e.g. the prompt)
    whole groups are drawn instead: the games of one prompt share its difficulty, so
    resampling them one by one would make the intervals too narrow. With `strata` (one key
    per game, constant within a group, e.g. the prompt set) groups are drawn within each
    stratum, each keeping its size: a pooled rating over two prompt sets then never rests
    on a resample that happens to hold mostly one of them.
    """
    _check(games)
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    names = players(games, models)
    if not games:  # nothing to resample: every rating is the prior's, the base
        return {name: (base, base) for name in names}
    m = len(names)
    i, j, s = _encode(games, names)
    rng = np.random.default_rng(seed)
    if groups is not None:
        if len(groups) != len(games):
            raise ValueError("one group key per game")
        keys: dict[Hashable, int] = {}
        g = np.array([keys.setdefault(k, len(keys)) for k in groups], dtype=np.int64)
        n_units = len(keys)
    else:
        g = np.arange(len(games))
        n_units = len(games)
    layers = [np.arange(n_units)]
    if strata is not None:
        if len(strata) != len(games):
            raise ValueError("one stratum key per game")
        of_unit: dict[int, Hashable] = {}
        for unit, key in zip(g.tolist(), strata):
            if of_unit.setdefault(unit, key) != key:
                raise ValueError("a group spans two strata")
        order: dict[Hashable, list[int]] = {}
        for unit in range(n_units):
            order.setdefault(of_unit[unit], []).append(unit)
        layers = [np.array(u, dtype=np.int64) for u in order.values()]
    full_wins, full_n = _tables(i, j, s, m)
    x0 = _fit(full_wins, full_n, prior)
    draws = np.empty((n_boot, m))
    for b in range(n_boot):
        counts = np.zeros(n_units, dtype=np.int64)
        for units in layers:
            counts[units] = rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)))
        wins, n = _tables(i, j, s, m, counts[g].astype(float))
        x = _fit(wins, n, prior, x0)
        draws[b] = base + ELO_SCALE * (x - x[0])
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2], axis=0)
    return {name: (float(a), float(b)) for name, a, b in zip(names, lo, hi)}


def win_rate_matrix(games: Sequence[Game], models: Sequence[str] | None = None,
                    hard: bool = False) -> dict[str, dict[str, float | None]]:
    """rate[a][b] = a's mean score against b (None when they never met).

    `hard` counts a game as a whole win, loss or tie instead of its soft score, for a
    judge whose probabilities hover near ½.
    """
    _check(games)
    names = players(games, models)
    total = {a: {b: 0.0 for b in names if b != a} for a in names}
    count = {a: {b: 0 for b in names if b != a} for a in names}
    for a, b, s in games:
        s = float(s)
        if hard:
            s = 1.0 if s > 0.5 else 0.0 if s < 0.5 else 0.5
        total[a][b] += s
        total[b][a] += 1.0 - s
        count[a][b] += 1
        count[b][a] += 1
    return {a: {b: (total[a][b] / count[a][b] if count[a][b] else None) for b in total[a]}
            for a in names}


def win_rate_vs_field(games: Sequence[Game], models: Sequence[str] | None = None,
                      hard: bool = False) -> dict[str, float | None]:
    """Each model's mean score over all its games, whoever the opponent."""
    _check(games)
    names = players(games, models)
    total = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)
    for a, b, s in games:
        s = float(s)
        if hard:
            s = 1.0 if s > 0.5 else 0.0 if s < 0.5 else 0.5
        total[a] += s
        total[b] += 1.0 - s
        count[a] += 1
        count[b] += 1
    return {k: (total[k] / count[k] if count[k] else None) for k in names}


__all__ = ["Game", "ELO_SCALE", "PRIOR", "players", "bradley_terry", "elo_ratings",
           "expected_score", "bootstrap_intervals", "win_rate_matrix", "win_rate_vs_field"]
