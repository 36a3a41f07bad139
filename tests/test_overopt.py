"""Overoptimization fits: synthetic curves with known α, β (Gao et al.'s two forms) are
recovered, peaks land where the calculus puts them, KL of best-of-n is right, bad input
is one clear error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cai.core.errors import CaiError
from cai.evaluate.overopt import bon_sqrt_kl, fit_bon, fit_overopt, fit_rl, kl_best_of_n

NS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_overopt_kl_of_best_of_n() -> None:
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_best_of_n(64) == pytest.approx(math.log(64) - 63 / 64)
    kls = [kl_best_of_n(n) for n in NS]
    assert all(b > a for a, b in zip(kls, kls[1:]))  # more samples, further from the base
    assert bon_sqrt_kl([1, 4]) == pytest.approx([0.0, math.sqrt(math.log(4) - 0.75)])
    with pytest.raises(CaiError, match="n >= 1"):
        kl_best_of_n(0)


@pytest.mark.parametrize("alpha, beta, baseline", [(1.3, 0.4, 0.0), (0.8, 0.15, 0.27),
                                                   (0.5, -0.05, -1.0)])
def test_overopt_bon_recovers_known_alpha_beta(alpha: float, beta: float, baseline: float) -> None:
    d = np.array(bon_sqrt_kl(NS))
    gold = baseline + d * (alpha - beta * d)
    fit = fit_bon(d, gold, baseline=baseline)
    assert fit.form == "bon" and fit.points == len(NS)
    assert fit.alpha == pytest.approx(alpha, abs=1e-9) and fit.beta == pytest.approx(beta, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    if beta > 0 and alpha / (2 * beta) <= d.max():
        assert fit.peak_sqrt_kl == pytest.approx(alpha / (2 * beta))
        assert fit.peak_kl == pytest.approx((alpha / (2 * beta)) ** 2)
        assert fit.peak_gold == pytest.approx(baseline + alpha ** 2 / (4 * beta))
        assert fit.peak_in_range is True and fit.no_peak is None
    else:  # the gold never turns over, or only beyond the data: no peak is claimed
        assert fit.peak_sqrt_kl is None and fit.peak_gold is None and fit.peak_in_range is None
        assert fit.no_peak
    assert fit.predict(d) == pytest.approx(gold)


def test_overopt_rl_recovers_known_alpha_beta_and_peak() -> None:
    alpha, beta = 0.9, 0.6
    d = np.linspace(0.0, 6.0, 25)
    gold = 0.1 + np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1))), 0.0)
    fit = fit_rl(d, gold, baseline=0.1)
    assert fit.alpha == pytest.approx(alpha, abs=1e-9) and fit.beta == pytest.approx(beta, abs=1e-9)
    peak = math.exp(alpha / beta - 1)
    assert fit.peak_sqrt_kl == pytest.approx(peak) and fit.peak_in_range is True
    assert fit.peak_gold == pytest.approx(0.1 + beta * peak)
    # The fitted curve is highest at the reported peak.
    grid = np.linspace(0.01, 6.0, 2000)
    assert grid[np.argmax(fit.predict(grid))] == pytest.approx(peak, abs=0.01)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_overopt_noisy_curves_recover_alpha_beta_within_noise(form: str) -> None:
    rng = np.random.default_rng(7)
    alpha, beta = 1.1, 0.35
    d = np.repeat(np.array(bon_sqrt_kl(NS)) if form == "bon" else np.linspace(0.1, 4, 12), 20)
    second = d * d if form == "bon" else d * np.log(d)
    gold = alpha * d - beta * second + rng.normal(0, 0.05, d.size)
    fit = fit_overopt(d, gold, form)
    assert fit.alpha == pytest.approx(alpha, abs=0.05) and fit.beta == pytest.approx(beta, abs=0.05)
    assert fit.r2 > 0.9
    # The other form fits the same points worse: the two are told apart.
    other = fit_overopt(d, gold, "rl" if form == "bon" else "bon")
    assert other.r2 < fit.r2


def test_overopt_bad_input_is_one_clear_error() -> None:
    with pytest.raises(CaiError, match="two or more distinct d > 0"):
        fit_bon([0.0, 1.0, 1.0], [0.0, 0.2, 0.3])
    with pytest.raises(CaiError, match="finite"):
        fit_rl([0.5, 1.0, 2.0], [0.1, float("nan"), 0.3])
    with pytest.raises(CaiError, match="one length"):
        fit_bon([0.5, 1.0], [0.1])
    with pytest.raises(CaiError, match="negative"):
        fit_bon([-0.5, 1.0, 2.0], [0.1, 0.2, 0.3])
    with pytest.raises(CaiError, match="form: must be one of"):
        fit_overopt([0.5, 1.0], [0.1, 0.2], "linear")
