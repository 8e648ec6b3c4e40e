"""Calibration and accounting against autodp and an independent high-precision computation."""
from __future__ import annotations

import math

import mpmath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mepf.artifacts.accounting import (
    autodp_eps,
    calibrate,
    delta_for_eps,
    eps_for_delta,
    gdp_mu,
    mu_for_target,
    parse_budget_split,
)
from mepf.artifacts.errors import MepfError


def mp_delta(eps, mu):
    """delta(eps) of mu-GDP in 50-digit arithmetic (independent of scipy and autodp)."""
    mpmath.mp.dps = 50
    eps, mu = mpmath.mpf(eps), mpmath.mpf(mu)
    return mpmath.ncdf(-eps / mu + mu / 2) - mpmath.e ** eps * mpmath.ncdf(-eps / mu - mu / 2)


def mp_eps(delta, mu):
    return float(mpmath.findroot(lambda e: mp_delta(e, mu) - delta, (0, 200), solver="bisect", tol=1e-30))


SPLITS = [None, "counts=0.05", "counts=0.01,S1=0.7", "S1=0.2,S2=0.3,counts=0.5"]


@pytest.mark.parametrize("eps", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("split", SPLITS)
def test_calibration_hits_target(eps, split):
    names = ["S1", "S2", "counts"]
    weights = parse_budget_split(split, names)
    sens = {"S1": 1.0, "S2": 2.5, "counts": math.sqrt(2)}
    cal = calibrate(eps, 1e-5, sens, weights)
    sigmas = [cal.sigmas[n] for n in names]
    sv = [sens[n] for n in names]
    for achieved in (cal.achieved_eps, autodp_eps(sv, sigmas, 1e-5), eps_for_delta(1e-5, gdp_mu(sv, sigmas))):
        assert 0.999 * eps <= achieved <= eps
    # independent: the calibrated mechanism's delta at the target eps is at most the target delta
    assert float(mp_delta(eps, gdp_mu(sv, sigmas))) <= 1e-5 * (1 + 1e-9)
    assert abs(mp_eps(1e-5, gdp_mu(sv, sigmas)) - cal.achieved_eps) <= 1e-6 * eps
    # each release receives its declared share of mu^2
    for n in names:
        assert (sens[n] / cal.sigmas[n]) ** 2 == pytest.approx(weights[n] * cal.mu ** 2, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(mu=st.floats(0.05, 8.0), log_delta=st.floats(-12, -2))
def test_closed_form_matches_autodp_and_mpmath(mu, log_delta):
    delta = 10.0 ** log_delta
    ours = eps_for_delta(delta, mu)
    theirs = autodp_eps([1.0], [1.0 / mu], delta)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)
    if ours > 1e-6:
        assert delta_for_eps(ours, mu) == pytest.approx(float(mp_delta(ours, mu)), rel=1e-6, abs=1e-15)


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.05, 20.0), log_delta=st.floats(-10, -3),
       w=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4),
       sens=st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4))
def test_calibration_property(eps, log_delta, w, sens):
    delta = 10.0 ** log_delta
    names = [f"r{i}" for i in range(len(w))]
    weights = {n: x / sum(w) for n, x in zip(names, w)}
    s = {n: sens[i] for i, n in enumerate(names)}
    cal = calibrate(eps, delta, s, weights)
    assert 0.999 * eps <= cal.achieved_eps <= eps
    # composition is exact: one Gaussian with the same mu gives the same eps
    assert autodp_eps([1.0], [1.0 / cal.mu], delta) == pytest.approx(cal.achieved_eps, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(mu=st.floats(0.1, 5.0), e1=st.floats(0.0, 10.0), e2=st.floats(0.0, 10.0))
def test_delta_decreases_in_eps(mu, e1, e2):
    lo, hi = sorted((e1, e2))
    assert delta_for_eps(hi, mu) <= delta_for_eps(lo, mu) + 1e-15


def test_mu_for_target_is_tight():
    mu = mu_for_target(1.0, 1e-5)
    assert delta_for_eps(1.0, mu) <= 1e-5
    assert delta_for_eps(1.0, mu * (1 + 1e-6)) > 1e-5


def test_budget_split_parsing():
    w = parse_budget_split(None, ["S1", "S2", "counts"])
    assert w == pytest.approx({"S1": 0.495, "S2": 0.495, "counts": 0.01})
    assert parse_budget_split("counts=0.1", ["S1", "counts"]) == pytest.approx({"S1": 0.9, "counts": 0.1})
    for bad in ("counts=2", "S3=0.1", "counts", "counts=x", "S1=0.6,S2=0.5"):
        with pytest.raises(MepfError):
            parse_budget_split(bad, ["S1", "S2", "counts"])


@pytest.mark.parametrize("eps,delta", [(0, 1e-5), (-1, 1e-5), (float("nan"), 1e-5), (1, 0), (1, 1), (1, -0.1)])
def test_bad_targets_refused(eps, delta):
    with pytest.raises(MepfError):
        calibrate(eps, delta, {"S1": 1.0}, {"S1": 1.0})


def test_the_calibration_decides_once_whether_a_run_is_private():
    """calibration_for carries the sensitivities, shares and privacy the ledger is built from (no recomputing)."""
    from mepf.artifacts.ledger import build_ledger, calibration_for

    shares = {"S1": 0.99, "counts": 0.01}
    off = calibration_for("add-remove", ["S1", "counts"], 2.0, 3.0, shares, math.inf, 1e-5)
    assert not off.private and set(off.sigmas.values()) == {0.0} and off.sensitivities == {"S1": 2.0, "counts": 1.0}
    led = build_ledger("add-remove", {"S1": (2, 5), "counts": (2,)}, off, math.inf, 1e-5)
    assert led["private"] is False and led["mu"] is None and led["target"]["epsilon"] is None
    on = calibration_for("replace-one", ["S1", "counts"], 2.0, 3.0, shares, 1.0, 1e-5)
    assert on.private and on.sensitivities == {"S1": 4.0, "counts": math.sqrt(2)} and on.weights == shares
    led = build_ledger("replace-one", {"S1": (2, 5), "counts": (2,)}, on, 1.0, 1e-5)
    assert [(r["name"], r["sensitivity"], r["sigma"], r["sensitivity_formula"]) for r in led["releases"]] == [
        ("S1", 4.0, on.sigmas["S1"], "2*C1"), ("counts", math.sqrt(2), on.sigmas["counts"], "sqrt(2)")]


@pytest.mark.parametrize("eps, delta", [(1e-4, 1e-5), (1e-6, 1e-300), (1e-9, 1e-5), (1e5, 1e-5)])
def test_calibration_at_the_edges_stays_at_or_below_target(eps, delta):
    """Where autodp's rounding put eps 1e-10 above target (eps 1e-4), the margin widens instead of failing;
    both accountants still at or below the target and within 0.1% of it."""
    cal = calibrate(eps, delta, {"S1": 1.0, "S2": 2.0, "counts": 1.0}, {"S1": 0.495, "S2": 0.495, "counts": 0.01})
    assert 0.999 * eps <= cal.achieved_eps <= eps and 0.999 * eps <= cal.closed_form_eps <= eps

