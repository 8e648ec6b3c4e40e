"""Exact accounting for independent Gaussian releases (Gaussian DP), and calibration of their noise.

Independent Gaussian releases with sensitivities Delta_j and noise sigma_j compose exactly into one
Gaussian mechanism with mu = sqrt(sum_j (Delta_j / sigma_j)^2) (Dong, Roth, Su 2019), whose tight
(eps, delta) curve is delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2)
(Balle and Wang 2018). Two computations are offered: our own closed form, and autodp's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import MepfError

#: calibrated mu is shrunk by this factor so that no accountant's rounding can put eps above target
CALIBRATION_MARGIN = 1e-9


def gdp_mu(sensitivities, sigmas) -> float:
    """mu of the exact composition of independent Gaussian releases; inf if any sigma is 0."""
    total = 0.0
    for d, s in zip(sensitivities, sigmas):
        if d == 0:
            continue
        if s <= 0:
            return math.inf
        total += (d / s) ** 2
    return math.sqrt(total)


def delta_for_eps(eps: float, mu: float) -> float:
    """Tight delta of a mu-GDP mechanism at eps (closed form, in log space for stability)."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    from scipy.special import log_ndtr  # here: importing scipy.special costs 0.17 s, which a reader does not need

    a = log_ndtr(-eps / mu + mu / 2)
    b = eps + log_ndtr(-eps / mu - mu / 2)
    return max(0.0, math.exp(a) - math.exp(b))


def eps_for_delta(delta: float, mu: float) -> float:
    """Smallest eps >= 0 with delta_for_eps(eps, mu) <= delta (bisection; delta falls with eps). A NaN or
    negative mu or delta is refused: NaN fails every comparison and would otherwise read as eps = 0."""
    if not (mu >= 0 and 0 <= delta <= 1):
        raise ValueError(f"eps_for_delta needs mu >= 0 and delta in [0, 1], got mu={mu!r}, delta={delta!r}")
    if math.isinf(mu):
        return math.inf
    if mu == 0 or delta_for_eps(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_for_eps(hi, mu) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_for_eps(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return hi


def mu_for_target(eps: float, delta: float) -> float:
    """Largest mu whose mechanism is (eps, delta)-DP (bisection; delta rises with mu)."""
    lo, hi = 0.0, 1.0
    while delta_for_eps(eps, hi) <= delta:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_for_eps(eps, mid) <= delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return lo


def autodp_eps(sensitivities, sigmas, delta: float) -> float:
    """eps at delta by autodp: each release an ExactGaussianMechanism, composed by ComposeGaussian."""
    from autodp.mechanism_zoo import ExactGaussianMechanism
    from autodp.transformer_zoo import ComposeGaussian

    mechs = []
    for d, s in zip(sensitivities, sigmas):
        if d == 0:
            continue
        if s <= 0:
            return math.inf
        mechs.append(ExactGaussianMechanism(sigma=s / d))
    if not mechs:
        return 0.0
    composed = ComposeGaussian()(mechs, [1] * len(mechs))
    return float(composed.get_approxDP(delta))


def autodp_version() -> str:
    from importlib.metadata import version

    return version("autodp")


@dataclass(frozen=True)
class Calibration:
    """Noise for each release, and the guarantee it achieves: with the sensitivities and budget shares it was
    calibrated for, and whether the run is private at all (decided here, once)."""

    mu: float
    sigmas: dict
    achieved_eps: float  # autodp
    closed_form_eps: float
    sensitivities: dict  # release -> L2 sensitivity, in release order
    weights: dict  # release -> share of mu^2
    private: bool = True


#: the counts' share of mu^2 when --budget-split does not name it
COUNTS_SHARE = 0.01


def parse_budget_split(text: str | None, names: list[str], default_counts: float = COUNTS_SHARE) -> dict:
    """Weights (summing to 1) of mu^2 over the releases. Names not given share the remainder equally.

    `text` is like "counts=0.01,S1=0.6"; None means counts 1%, the rest equally over the moments.
    """
    given: dict[str, float] = {}
    if text is None:
        text = f"counts={default_counts}" if "counts" in names else ""
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise MepfError(f"--budget-split: '{part}' is not NAME=WEIGHT; use e.g. counts=0.01,S1=0.5")
        name, value = (s.strip() for s in part.split("=", 1))
        if name not in names:
            raise MepfError(f"--budget-split: unknown release '{name}'; this run releases {', '.join(names)}")
        try:
            w = float(value)
        except ValueError:
            raise MepfError(f"--budget-split: weight '{value}' for {name} is not a number") from None
        if not (0 < w < 1) or not math.isfinite(w):
            raise MepfError(f"--budget-split: weight for {name} must be in (0, 1), got {value}")
        given[name] = w
    rest = [n for n in names if n not in given]
    remainder = 1.0 - sum(given.values())
    if rest and remainder <= 0:
        raise MepfError(f"--budget-split: weights sum to {sum(given.values()):g}, leaving nothing for "
                        f"{', '.join(rest)}")
    if not rest and abs(remainder) > 1e-9:
        raise MepfError(f"--budget-split: weights must sum to 1 when every release is named (got {1 - remainder:g})")
    weights = dict(given)
    for n in rest:
        weights[n] = remainder / len(rest)
    total = sum(weights.values())
    return {n: weights[n] / total for n in names}


def calibrate(eps: float, delta: float, sensitivities: dict, weights: dict) -> Calibration:
    """Noise for each release so that together they are (eps, delta)-DP, tightly.

    mu^2 is split over the releases by `weights`: release j gets (Delta_j / sigma_j)^2 = w_j mu^2.
    """
    validate_target(eps, delta)  # refuses inf: a non-private release is never calibrated
    names = list(sensitivities)
    sens = [sensitivities[n] for n in names]
    target_mu = mu_for_target(eps, delta)
    for margin in (CALIBRATION_MARGIN, 1e-7, 1e-5):  # wider only where an accountant's rounding needs it
        mu = target_mu * (1 - margin)
        sigmas = {n: sensitivities[n] / (mu * math.sqrt(weights[n])) for n in sensitivities}
        sig = [sigmas[n] for n in names]
        achieved = autodp_eps(sens, sig, delta)
        closed = eps_for_delta(delta, gdp_mu(sens, sig))
        if achieved <= eps and closed <= eps:
            break
    if not (0.999 * eps <= achieved <= eps) or not (0.999 * eps <= closed <= eps):
        raise MepfError(f"--epsilon {eps:g} at --delta {delta:g} cannot be calibrated: the accountants give "
                        f"{achieved:.6g} (autodp) and {closed:.6g} (closed form), not within 0.1% below it; choose "
                        "an epsilon of 0.001 or more and a delta below 0.1")
    return Calibration(mu=gdp_mu(sens, sig), sigmas=sigmas, achieved_eps=achieved, closed_form_eps=closed,
                       sensitivities=dict(sensitivities), weights=dict(weights))


def non_private(sensitivities: dict, weights: dict) -> Calibration:
    """The noise-off 'calibration' of a non-private baseline (eps = inf): every sigma is 0."""
    return Calibration(mu=math.inf, sigmas={n: 0.0 for n in sensitivities}, achieved_eps=math.inf,
                       closed_form_eps=math.inf, sensitivities=dict(sensitivities), weights=dict(weights),
                       private=False)


#: the largest finite --epsilon and the smallest --delta calibrated: beyond them the accountants' numerics fail
#: (eps above 2^19 reads as infinite in the closed form; autodp finds no eps at delta 5e-324)
MAX_EPSILON, MIN_DELTA = 1e5, 1e-300


def validate_target(eps: float, delta: float, allow_inf: bool = False) -> None:
    """0 < eps <= MAX_EPSILON (inf only where a non-private baseline is allowed), MIN_DELTA <= delta < 1."""
    if not (eps > 0) or math.isnan(eps):
        raise MepfError(f"--epsilon must be > 0 (got {eps}); typical values are 1 to 10")
    if math.isinf(eps) and not allow_inf:
        raise MepfError("--epsilon inf means no privacy; it is only accepted by `mepf embed` for baselines")
    if math.isfinite(eps) and eps > MAX_EPSILON:
        raise MepfError(f"--epsilon {eps:g} is beyond what mepf calibrates ({MAX_EPSILON:g}) and protects nothing; "
                        "typical values are 1 to 10 (--epsilon inf is the non-private baseline)")
    if not (0 < delta < 1):
        raise MepfError(f"--delta must be in (0, 1) (got {delta}); typical is 1e-5, below 1/n")
    if delta < MIN_DELTA:
        raise MepfError(f"--delta {delta:g} is below what mepf calibrates ({MIN_DELTA:g}); typical is 1e-5, below 1/n")
