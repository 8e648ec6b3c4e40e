"""The audit's noise-shape check (review 17): noise of the declared energy but the wrong shape (concentrated in
spikes, shared along a row, across classes or between S1 and S2) fails; genuine noise passes whatever the true
sums are, including sums built to sit where the tests look (zero, tiny, equal neighbours, equal rows)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mepf.artifacts import audit as audit_mod
from mepf.artifacts.audit import AuditReport, _check_noise_shape
from mepf.embed.release import privatise

SIG = {"S1": 0.7, "S2": 1.3}


def shape_check(arrays: dict, sigmas: dict = SIG):
    rep = AuditReport(path="x")
    _check_noise_shape(SimpleNamespace(arrays=arrays), rep, {m: {"sigma": s} for m, s in sigmas.items()})
    return {n: (ok, d) for n, ok, d in rep.checks}.get("noise:shape")


def true_sums(kind: str, k: int = 10, d: int = 4096, seed: int = 0) -> dict:
    """True sums chosen against the tests: all zero, tiny, equal neighbours, equal classes, S2 = S1 scaled
    (so that S1/sigma1 - S2/sigma2 is zero), and ordinary ones."""
    g = np.random.default_rng(seed)
    if kind == "zero":
        t = np.zeros((k, d))
    elif kind == "tiny":
        t = np.full((k, d), 0.05 * SIG["S1"])
    elif kind == "equal-neighbours":
        t = np.repeat(g.normal(0, 3, (k, d // 2)), 2, axis=1)
    elif kind == "equal-classes":
        t = np.repeat(g.normal(0, 3, (1, d)), k, axis=0)
    else:
        t = g.normal(0, 50, (k, d))
    return {"S1": t, "S2": t * SIG["S2"] / SIG["S1"]}


@pytest.mark.parametrize("kind", ["zero", "tiny", "equal-neighbours", "equal-classes", "ordinary"])
def test_genuine_noise_passes_whatever_the_true_sums(kind):
    t = true_sums(kind)
    for _ in range(3):
        ok, detail = shape_check({k: v.astype(np.float32) for k, v in privatise(t, SIG).items()})
        assert ok, detail


def test_the_tests_hold_their_false_alarm_rate(monkeypatch):
    """At a false-alarm rate of 5%, 300 genuine releases of the adversarial true sums fail at most about that
    often: the degrees of freedom, the small-ball bound and the split over tests are right (at 1e-9 a wrong
    one would go unseen)."""
    monkeypatch.setattr(audit_mod, "NOISE_ALPHA", 0.05)
    fails = 0
    for i in range(300):
        t = true_sums(["zero", "tiny", "equal-neighbours", "equal-classes"][i % 4], k=4, d=64, seed=i)
        fails += not shape_check(privatise(t, SIG))[0]
    assert fails <= 30, fails  # Binomial(300, <= 0.05): P(> 30) < 1e-3


def forged(kind: str, seed: int = 1) -> dict:
    """Noise of the declared sigma per number (energy intact) but of the wrong shape, on ordinary sums."""
    g = np.random.default_rng(seed)
    t = true_sums("zero", seed=seed)
    k, d = t["S1"].shape
    out = {}
    draw = {"S1": g.standard_normal((k, d)), "S2": g.standard_normal((k, d))}
    if kind == "shared-draw":
        draw["S2"] = draw["S1"]
    for m, s in SIG.items():
        if kind == "spikes":  # 5% of sigma almost everywhere, the rest of the energy on 2% of the numbers
            z = 0.05 * draw[m]
            idx = g.random((k, d)) < 0.02
            z[idx] = np.sqrt((1 - 0.05 ** 2) / 0.02)
        elif kind == "shared-along-row":
            z = np.repeat(draw[m][:, :1], d, axis=1)
        elif kind == "shared-across-classes":
            z = np.repeat(draw[m][:1], k, axis=0)
        else:
            z = draw[m]
        out[m] = (t[m] + s * z).astype(np.float32)
    return out


@pytest.mark.parametrize("kind, words", [("spikes", "within 0.1 sigma of zero"),
                                         ("shared-along-row", "paired coordinates"),
                                         ("shared-across-classes", "paired classes"),
                                         ("shared-draw", "S1 against S2")])
def test_noise_of_the_wrong_shape_fails(kind, words):
    ok, detail = shape_check(forged(kind))
    assert not ok and words in detail, detail
    assert shape_check(forged("genuine"))[0]


def test_where_float32_cannot_resolve_the_noise_rounding_is_allowed_for_not_a_false_alarm():
    """Where sigma is below float32's spacing at the sums, rounding alone cancels the noise: the differences are
    moved by what rounding could take and the windows cover only where float32 resolves 1e-3 sigma, so such a
    file passes, with NO POWER (a warning). One large number no longer turns the check off (review 18)."""
    rep = AuditReport(path="x")
    t = np.full((4, 64), 1e9)
    noisy = privatise({"S1": t, "S2": t}, {"S1": 1e-3, "S2": 1e-3})
    arrays = {k: v.astype(np.float32) for k, v in noisy.items()}
    _check_noise_shape(SimpleNamespace(arrays=arrays), rep, {m: {"sigma": 1e-3} for m in arrays})
    (name, ok, detail), = rep.checks
    assert ok and "NO POWER" in detail and rep.warnings == ["noise:shape"], detail
    spikes = forged("spikes")
    spikes["S1"][0, 0] = 1e9  # a spike forgery with one huge number: was skipped whole, silently
    ok, detail = shape_check(spikes)
    assert not ok and "within 0.1 sigma of zero" in detail, detail


def test_noise_of_the_declared_variance_and_another_law_fails_where_sums_are_alike():
    """+-sigma (no privacy at all) and a bimodal law (5% of sigma about +-sigma) have the declared energy and no
    shared noise; where many sums are alike (here all zero) their numbers crowd two windows (review 18)."""
    g = np.random.default_rng(3)
    t = np.zeros((10, 4096))
    for law in ("sign", "bimodal"):
        z = {m: np.sign(g.standard_normal(t.shape)) * (np.sqrt(1 - 0.05 ** 2) if law == "bimodal" else 1)
             + (0.05 * g.standard_normal(t.shape) if law == "bimodal" else 0) for m in SIG}
        ok, detail = shape_check({m: (t + SIG[m] * z[m]).astype(np.float32) for m in SIG})
        assert not ok and "% of its numbers lie within 0.1 sigma of " in detail and "zero" not in detail, (law, detail)


def test_the_power_line_says_how_much_less_noise_would_fail():
    ok, detail = shape_check({k: v.astype(np.float32) for k, v in privatise(true_sums("zero"), SIG).items()})
    assert ok and "power: noise reduced uniformly to less than 9" in detail, detail  # about 96% of sigma


def test_subnormal_sigma_one_number_and_huge_numbers_neither_fail_nor_raise():
    """Review 19: below float32's normal range the spacing is 2^-149 whatever the number (a sigma of 1e-44 failed
    genuine files); one number has no difference to test (said, with a warning); a forged 1e38 over a sigma of
    1e-117 overflowed the statistic into an exception."""
    sig = {"S1": 1e-44, "S2": 1e-44}
    t = {m: np.zeros((10, 4096)) for m in sig}
    for _ in range(3):
        ok, detail = shape_check({k: v.astype(np.float32) for k, v in privatise(t, sig).items()}, sig)
        assert ok, detail
    rep = AuditReport(path="x")
    _check_noise_shape(SimpleNamespace(arrays={"S1": np.array([[0.3]], np.float32)}), rep, {"S1": {"sigma": 1.0}})
    (_, ok, detail), = rep.checks
    assert ok and "no differences to test" in detail and rep.warnings == ["noise:shape"], detail
    ok, detail = shape_check({"S1": np.array([[1e38, 0.0]], np.float32)}, {"S1": 7.458e-117})
    assert ok and "NO POWER" in detail, detail
