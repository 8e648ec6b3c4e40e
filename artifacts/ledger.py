"""The privacy ledger: what was released, with which sensitivity and noise, and the guarantee.

The sensitivity rules live here, once: stage 1 declares its sensitivities from them and the audit
checks the ledger against them.
"""
from __future__ import annotations

import json
import math

from .accounting import Calibration, autodp_version, calibrate, non_private

RELATIONS = ("add-remove", "replace-one")

#: release -> (formula, value given C1, C2), per neighbouring relation. Under replace-one every
#: sensitivity doubles by the triangle inequality (counts: a class flip moves two counts by 1: sqrt(2)).
SENSITIVITY_RULES = {
    "add-remove": {
        "S1": ("C1", lambda c1, c2: c1),
        "S2": ("C2", lambda c1, c2: c2),
        "counts": ("1", lambda c1, c2: 1.0),
    },
    "replace-one": {
        "S1": ("2*C1", lambda c1, c2: 2 * c1),
        "S2": ("2*C2", lambda c1, c2: 2 * c2),
        "counts": ("sqrt(2)", lambda c1, c2: math.sqrt(2)),
    },
}

RELATION_TEXT = {
    "add-remove": "neighbouring datasets differ by adding or removing one record (n is private)",
    "replace-one": "neighbouring datasets differ by replacing one record, its label included (n is public)",
}

#: the ledger's fixed words, written once: a reader refuses a ledger whose words differ (a person reading the
#: file with HDF5 tools sees them, and one saying "replace-one" over add-remove noise claims half the eps)
MECHANISM = {True: "gaussian", False: "none (non-private: exact value, no noise)"}
COMPOSITION = ("exact: independent Gaussian releases form one Gaussian mechanism, "
               "mu = sqrt(sum (sensitivity/sigma)^2); "
               "delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2)")
ACCOUNTANT = {"name": "autodp ComposeGaussian of ExactGaussianMechanism", "library": "autodp"}
NOISE = {"source": "OS entropy: secrets.randbits(128) seeds numpy PCG64DXSM; float64 noise added to float64 sums, "
                   "stored as float32",
         "seed_stored": False}
POST_PROCESSING = "per-class mean S/max(counts,1); label prior proportional to max(counts,0)"
#: the keys of the ledger, of each of its releases, and of its target and achieved guarantee
KEYS = {"ledger": {"private", "relation", "relation_text", "releases", "composition", "mu", "accountant", "target",
                   "achieved", "noise", "post_processing"},
        "release": {"name", "mechanism", "shape", "sensitivity", "sensitivity_formula", "sigma", "weight"},
        "accountant": {"name", "library", "version"}, "target": {"epsilon", "delta"},
        "achieved": {"epsilon", "delta", "epsilon_closed_form"}}


def sensitivity(relation: str, name: str, c1: float, c2: float) -> tuple[float, str]:
    """L2 sensitivity of release `name` under `relation`, and its formula."""
    formula, fn = SENSITIVITY_RULES[relation][name]
    return fn(c1, c2), formula


def canonical_json(obj) -> str:
    """Deterministic JSON (sorted keys, no spaces): the bytes that the checksum covers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def calibration_for(relation: str, names, c1: float, c2: float, weights: dict, eps: float,
                    delta: float) -> Calibration:
    """The noise of a run, decided once from the rules above: calibrated to (eps, delta), or none at all for a
    non-private baseline (eps = inf)."""
    sens = {n: sensitivity(relation, n, c1, c2)[0] for n in names}
    return calibrate(eps, delta, sens, weights) if math.isfinite(eps) else non_private(sens, weights)


def build_ledger(relation, shapes, calibration: Calibration, eps, delta) -> dict:
    """The ledger as a plain dict, ready for canonical JSON, from the calibration. A non-private baseline
    (eps = inf) says so: private false, mechanism none, sigma 0, and null where a number would be infinite."""
    private = calibration.private
    releases = []
    for name, value in calibration.sensitivities.items():
        releases.append({
            "name": name,
            "mechanism": MECHANISM[private],
            "shape": list(shapes[name]),
            "sensitivity": value,
            "sensitivity_formula": SENSITIVITY_RULES[relation][name][0],
            "sigma": calibration.sigmas[name],
            "weight": calibration.weights[name],
        })
    return {
        "private": private,
        "relation": relation,
        "relation_text": RELATION_TEXT[relation],
        "releases": releases,
        "composition": COMPOSITION,
        "mu": calibration.mu if private else None,
        "accountant": {**ACCOUNTANT, "version": autodp_version()},
        "target": {"epsilon": eps if private else None, "delta": delta},
        "achieved": {"epsilon": calibration.achieved_eps if private else None, "delta": delta,
                     "epsilon_closed_form": calibration.closed_form_eps if private else None},
        "noise": dict(NOISE),
        "post_processing": POST_PROCESSING,
    }
