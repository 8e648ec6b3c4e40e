"""The empirical privacy audit (benchmarks/privacy_audit.py), fast: it finds no more leakage than the claim
in the real mechanism, and it catches a deliberately under-noised one (noise x 0.1 at eps = 1)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("privacy_audit",
                                              Path(__file__).parents[1] / "benchmarks" / "privacy_audit.py")
privacy_audit = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(privacy_audit)


@pytest.mark.parametrize("noise_scale", [1.0, 0.1])
def test_audit_bounds_the_real_mechanism_and_catches_a_broken_one(noise_scale):
    r = privacy_audit.audit(epsilon=1.0, noise_scale=noise_scale, trials=200, progress=False)
    assert r["eps_claimed"] == pytest.approx(1.0, rel=1e-3)
    if noise_scale == 1.0:
        assert r["eps_lower_bound"] <= r["eps_claimed"]
    else:
        assert r["eps_lower_bound"] > r["eps_claimed"], r
    from mepf.embed import release

    assert release.privatise is privacy_audit.BrokenNoise(1.0).original  # the break never outlives the audit


def test_lower_bound_arithmetic_against_hand_computed_rates():
    import math

    import numpy as np

    # perfectly separated statistics: 0 false positives and negatives in 50 + 50 evaluation trials
    t0, t1 = np.arange(100) * 0.0, np.arange(100) * 0.0 + 10
    r = privacy_audit.lower_bound(t0, t1, delta=1e-5)
    upper = 1 - 0.025 ** (1 / 50)  # Clopper-Pearson upper bound for 0 of 50 at 97.5%
    assert r["false_positives"] == r["false_negatives"] == 0
    assert r["eps_lower_bound"] == pytest.approx(math.log((1 - 1e-5 - upper) / upper), rel=1e-9)
    # indistinguishable statistics give nothing
    rng = np.random.default_rng(0)
    same = privacy_audit.lower_bound(rng.normal(size=400), rng.normal(size=400), delta=1e-5)
    assert same["eps_lower_bound"] < 0.5
