"""The scaling-law fitter recovers known laws from synthetic points (seeded), with honest intervals."""

import math

import numpy as np
import pytest

from scalelm.analysis.scaling_fit import (
    FitError,
    chinchilla_optimum,
    fit_isoflop,
    fit_law,
)

TRUE = {"E": 1.2, "A": 60.0, "alpha": 0.32, "B": 90.0, "beta": 0.28}


def law(n, d, p=TRUE):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def synthetic(count=36, noise=0.004, seed=0):
    rng = np.random.default_rng(seed)
    n = np.exp(rng.uniform(math.log(1e5), math.log(3e7), count))
    d = np.exp(rng.uniform(math.log(1e6), math.log(1e9), count))
    return n, d, law(n, d) * np.exp(rng.normal(0.0, noise, count))


def test_two_variable_fit_recovers_the_law_within_its_intervals():
    n, d, loss = synthetic()
    fit = fit_law([n, d], loss, bootstrap=60, seed=1, screen=64)
    assert fit.variables == ("N", "D") and fit.n_points == len(loss) and len(fit.samples) >= 50
    ci = fit.ci
    for name, value in TRUE.items():
        lo, hi = ci[name]
        assert lo <= value <= hi, f"{name}: true {value} outside [{lo:.4g}, {hi:.4g}]"
        assert lo < fit.params[name] < hi
    # the intervals are informative, not the whole allowed range
    assert ci["alpha"][1] - ci["alpha"][0] < 0.15 and ci["beta"][1] - ci["beta"][0] < 0.15
    assert abs(fit.params["alpha"] - TRUE["alpha"]) < 0.05 and abs(fit.params["beta"] - TRUE["beta"]) < 0.05
    assert np.allclose(fit.predict(n, d), law(n, d), rtol=0.02)
    d_ = fit.to_dict()
    assert d_["law"] == "L(N, D)" and set(d_["ci"]) == set(TRUE) and "N^" in d_["formula"]


def test_one_variable_fit_and_a_derived_interval():
    rng = np.random.default_rng(3)
    n = np.geomspace(1e5, 1e8, 12)
    loss = (1.7 + 400.0 / n ** 0.34) * np.exp(rng.normal(0, 0.003, n.size))
    fit = fit_law(n, loss, bootstrap=80, seed=0, variables=("N",))
    for name, value in (("E", 1.7), ("A", 400.0), ("alpha", 0.34)):
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, lo, hi)
    lo, hi = fit.interval(lambda p: p["E"] + p["A"] / 1e9 ** p["alpha"])  # an extrapolated loss
    assert lo < 1.7 + 400 / 1e9 ** 0.34 < hi


def test_huber_loss_shrugs_off_an_outlier():
    n, d, loss = synthetic(count=30, noise=0.002, seed=5)
    bad = loss.copy()
    bad[7] *= 1.5  # a diverged run
    clean = fit_law([n, d], loss, bootstrap=0, screen=64)
    robust = fit_law([n, d], bad, bootstrap=0, screen=64)
    assert abs(robust.params["alpha"] - clean.params["alpha"]) < 0.02
    assert abs(robust.params["beta"] - clean.params["beta"]) < 0.02


def test_too_few_or_degenerate_points_are_errors():
    with pytest.raises(FitError, match="too few"):
        fit_law([[1e5, 1e6], [1e6, 1e7]], [3.0, 2.5])
    with pytest.raises(FitError, match="share one value"):
        fit_law([[1e5] * 6, np.geomspace(1e6, 1e8, 6)], np.linspace(3, 2, 6))
    with pytest.raises(FitError):
        fit_law([1e5, 1e6, float("nan")], [3.0, 2.5, 2.0])  # only two valid points


def test_chinchilla_closed_form_is_the_constrained_minimum():
    c = 1e18
    n_opt, d_opt = chinchilla_optimum(TRUE, c)
    assert n_opt * d_opt * 6 == pytest.approx(c)
    ns = np.geomspace(n_opt / 30, n_opt * 30, 20001)
    brute = ns[np.argmin(law(ns, c / (6 * ns)))]
    assert brute == pytest.approx(n_opt, rel=1e-3)


def test_isoflop_minima_follow_the_law():
    """Approach 2 on IsoFLOP profiles of a known law: N_opt ~ C^(beta / (alpha + beta))."""
    rng = np.random.default_rng(2)
    cs, ns, ds, losses, ids = [], [], [], [], []
    for i, c in enumerate(np.geomspace(1e15, 1e19, 5)):
        n_star = chinchilla_optimum(TRUE, c)[0]
        for n in n_star * np.geomspace(1 / 8, 8, 9):
            d = c / (6 * n)
            cs.append(c), ns.append(n), ds.append(d), ids.append(f"iso{i}")
            losses.append(law(n, d) * math.exp(rng.normal(0, 0.001)))
    res = fit_isoflop(cs, ns, ds, losses, ids, bootstrap=100, seed=0)
    expected = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert len(res.levels) == 5 and res.n_law is not None
    assert abs(res.n_law[1] - expected) < 0.03 and abs(res.d_law[1] - (1 - expected)) < 0.03
    lo, hi = res.interval(lambda s: s[1])
    assert lo <= expected <= hi
    n_pred, d_pred = res.predict(1e20)
    assert n_pred == pytest.approx(chinchilla_optimum(TRUE, 1e20)[0], rel=0.25)
    assert res.to_dict()["n_opt"]["a_ci"] == [lo, hi]


def test_isoflop_needs_three_sizes_and_a_minimum_inside_them():
    res = fit_isoflop([1e15, 1e15], [1e6, 2e6], [1e8, 5e7], [3.0, 2.9], ["iso0", "iso0"], bootstrap=10)
    assert res.levels == [] and res.n_law is None and math.isnan(res.predict(1e16)[0])
    # convex but still falling at the largest size: the vertex would be an extrapolation
    n = np.array([1e6, 2e6, 4e6, 8e6])
    res = fit_isoflop([1e15] * 4, n, 1e15 / (6 * n), [3.0, 2.7, 2.5, 2.4], ["iso0"] * 4, bootstrap=10)
    assert res.levels == []
