"""Recompute and check a release's privacy guarantee from the file alone."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import guarantee
from .accounting import eps_for_delta
from .errors import MepfError
from .format import printable, read_raw, recompute_checksum
from .ledger import RELATIONS

#: false-alarm probability of the noise check for a genuine file (all rows and moments together)
NOISE_ALPHA = 1e-9


@dataclass
class AuditReport:
    path: str
    checks: list = field(default_factory=list)  # (name, ok, detail)
    summary: dict = field(default_factory=dict)
    sha256: str = ""  # of the bytes audited (whatever the name points to later)
    #: checks that found nothing wrong but cannot vouch for the guarantee (the noise unverifiable from this file,
    #: a delta not shown below 1/n): the audit passes with warnings
    warnings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def check(self, name: str, ok: bool, detail: str, warn: bool = False) -> bool:
        self.checks.append((name, bool(ok), detail))
        if ok and warn:
            self.warnings.append(name)
        return ok

    def to_dict(self) -> dict:
        verdict = "failed" if not self.ok else "passed with warnings" if self.warnings else "passed"
        return {"path": self.path, "ok": self.ok, "verdict": verdict, "summary": self.summary,
                "warnings": list(self.warnings),
                "checks": [{"name": n, "ok": o, "warning": n in self.warnings, "detail": d}
                           for n, o, d in self.checks]}


def audit(path) -> AuditReport:
    """Run every check; never raises for an inconsistent file (the report says what failed)."""
    release = read_raw(path)  # unreadable or foreign files raise MepfError
    rep = AuditReport(path=str(path), sha256=release.file_sha256)
    rep.check("checksum", recompute_checksum(release) == release.checksum,
              "arrays and ledger match the stored SHA-256" if recompute_checksum(release) == release.checksum
              else "stored SHA-256 does not match the content: the file was altered")
    bad = [n for n, a in release.arrays.items() if not np.isfinite(a).all()]
    rep.check("finite", not bad, "every released number is finite" if not bad else
              f"{', '.join(bad)} hold NaN or infinite values, which no release has (they would blind the noise check)")
    try:
        _check_ledger(release, rep, noise=not bad)
    # schema-valid but unworkable numbers (RuntimeError: autodp finding no eps)
    except (ArithmeticError, KeyError, TypeError, ValueError, AssertionError, RuntimeError) as e:
        rep.check("ledger-numbers", False, f"the ledger's numbers cannot be checked ({type(e).__name__})")
    return rep


def _check_ledger(release, rep: AuditReport, noise: bool = True) -> None:
    led, spec = release.ledger, release.features
    private = led.get("private", True) is True
    if not rep.check("private", private, "the ledger declares a DP release" if private else
                     "NON-PRIVATE baseline (eps = inf): exact sums and counts, no noise; never publish this file"):
        rep.summary = {"epsilon": math.inf, "delta": led["achieved"]["delta"], "relation": led["relation"],
                       "private": False}
        return
    relation = led["relation"]
    if not rep.check("relation", relation in RELATIONS, f"relation {relation!r}"):
        return
    results, values = guarantee.checks(release, autodp=True)
    for name, ok, detail in results:
        rep.check(name, ok, detail)
    releases = led["releases"]
    names = [r["name"] for r in releases]
    delta = values["delta"]
    by_name = {r["name"]: r for r in releases}
    _check_delta(release, rep, by_name, delta)
    if noise:
        _check_noise(release, rep, by_name, spec.C1, spec.C2)
        _check_noise_shape(release, rep, by_name)
    rep.summary = {"epsilon": values["epsilon"], "epsilon_autodp": values["epsilon_autodp"],
                   "epsilon_closed_form": values["epsilon_closed_form"], "delta": delta, "mu": values["mu"],
                   "relation": relation, "releases": names, "target": values["target"]}


def _check_delta(release, rep: AuditReport, releases: dict, delta: float) -> None:
    """delta below 1/n (mepf embed refuses otherwise unless --force, which the ledger does not record): n is
    bounded from the noisy counts; a delta of 1/n or more allows publishing a record in the clear."""
    from scipy.stats import norm

    if "counts" not in releases or "counts" not in release.arrays or not releases["counts"]["sigma"] > 0:
        return
    counts = np.asarray(release.arrays["counts"], dtype=np.float64)
    if not np.isfinite(counts).all():  # the finite check fails the file already
        return
    noisy_n = float(counts.sum())
    n_hi = max(noisy_n + float(norm.isf(NOISE_ALPHA)) * float(releases["counts"]["sigma"]) * math.sqrt(len(counts)),
               1.0)
    if delta < 1 / n_hi:
        rep.check("delta", True, f"delta={delta:g} is below 1/n for every n the noisy counts allow (n < {n_hi:.0f})")
    else:
        rep.check("delta", True, f"delta={delta:g} is not shown below 1/n (the noisy counts sum to {noisy_n:.0f}, "
                  f"1/n about {1 / max(noisy_n, 1.0):.3g}): a delta of 1/n or more allows a mechanism that publishes "
                  "a record in the clear, so the eps claim says little (mepf embed refuses it unless --force)",
                  warn=True)


def coordinate_blocks(d: int) -> list:
    """Sets of coordinates each row is also tested on, so that noise left out of some coordinates (and made up
    on others) shows: m contiguous blocks (a layer's features lie together), m strided ones (every m-th
    coordinate) and m drawn at random from OS entropy (no fixed pattern to fit); none where D is small."""
    import secrets

    m = min(16, d // 256)
    if m < 2:
        return []
    idx = np.arange(d)
    perm = np.random.default_rng(secrets.randbits(64)).permutation(d)
    return np.array_split(idx, m) + [idx[i::m] for i in range(m)] + np.array_split(perm, m)


def noise_floor(d: int, rows: int, alpha: float = NOISE_ALPHA) -> tuple:
    """(floor, z, q_hi) for rows of D coordinates with declared noise N(0, sigma^2). Whatever the true sum t,
    ||t + z||^2 >= ||z||^2 - (sigma z_a)^2 unless <t, z> < -z_a sigma ||t||, so a genuine row's squared norm,
    in units of sigma^2, is below floor = chi2_D lower quantile - z_a^2 with probability at most alpha
    (split over the rows and both events). q_hi: an upper quantile of chi2_D, for the power statement."""
    from scipy.stats import chi2, norm

    a = alpha / (2 * rows)
    z = float(norm.isf(a))
    return float(chi2.ppf(a, d)) - z * z, z, float(chi2.isf(a, d))


def _ulp32(x: float) -> float:
    """The spacing of float32 numbers at |x|."""
    return float(np.spacing(np.float32(min(abs(x), 3.0e38))))


def _wrapped_density_bound(sigma: float) -> float:
    """The largest density, on the unit circle, of t + N(0, sigma^2) taken modulo 1, for any t: the wrapped normal's
    value at its mode, sum_j phi_sigma(j), summed directly where sigma < 1 and as its Fourier series
    1 + 2 sum_m exp(-2 pi^2 m^2 sigma^2) (Poisson summation: the same number) elsewhere, each where its terms fall
    fast (60 terms: the next are below exp(-1800))."""
    if sigma < 1:
        return sum(math.exp(-j * j / (2 * sigma * sigma)) for j in range(-60, 61)) / (sigma * math.sqrt(2 * math.pi))
    return 1 + 2 * sum(math.exp(-2 * math.pi ** 2 * m * m * sigma * sigma) for m in range(1, 61))


def _fisher_tail(u: np.ndarray) -> float:
    """P(chi2_2K >= -2 sum log u): the tail of Fisher's combination of K independent numbers, each uniform on (0,1]
    or stochastically larger (then the tail is an upper bound)."""
    from scipy.stats import chi2

    with np.errstate(divide="ignore"):
        stat = float(-2 * np.log(np.clip(u, 0.0, 1.0)).sum())
    return float(chi2.sf(stat, 2 * len(u))) if math.isfinite(stat) else 0.0


def folded_wrapped_cdf(d: np.ndarray, sigma: float) -> np.ndarray:
    """P(|W| <= d), d in [0, 1/2], for W = N(0, sigma^2) wrapped onto [-1/2, 1/2): the law of t + N(0, sigma^2)'s
    distance to the nearest whole number, the same for every whole t. Summed over the wraps where sigma < 1, as
    the Fourier series of the wrapped density elsewhere (60 terms each: the next are below exp(-1800))."""
    from scipy.special import erf, ndtr

    d = np.clip(np.asarray(d, dtype=np.float64), 0.0, 0.5)
    if sigma < 1:
        out = erf(d / (sigma * math.sqrt(2)))
        for m in range(1, 61):
            out = out + 2 * (ndtr(-(m - d) / sigma) - ndtr(-(m + d) / sigma))
    else:
        out = 2 * d
        for m in range(1, 61):
            out = out + 2 * math.exp(-2 * math.pi ** 2 * m * m * sigma * sigma) * np.sin(2 * math.pi * m * d) / (
                math.pi * m)
    return np.clip(out, 0.0, 1.0)


def lattice_law_p(lattice: np.ndarray, half_ulp: np.ndarray, sigma: float) -> float:
    """A two-sided Kolmogorov-Smirnov test of the counts' distances to whole numbers against their law under noise
    of sigma (folded_wrapped_cdf), which holds whatever the true counts: its p-value. Conservative under rounding:
    each stored distance is within its own h of the true one, so the empirical law of the distances plus h lies
    below the true distances' and that of the distances minus h above it; the statistic from the two is at most the
    true distances' own. Every count is taken (a choice by stored value would bias the law)."""
    from scipy.stats import kstwo

    m = len(lattice)
    if m == 0:
        return 1.0
    h = half_ulp + 1e-9  # and the float64 sum's own error, far below
    i = np.arange(1, m + 1)
    stat = max(0.0, float(np.max(i / m - folded_wrapped_cdf(np.sort(lattice + h), sigma))),
               float(np.max(folded_wrapped_cdf(np.sort(lattice - h), sigma) - (i - 1) / m)))
    return float(kstwo.sf(stat, m))


#: geometric mean of |Z| for Z ~ N(0, 1) (exp of E log|Z| = -(gamma + ln 2) / 2): a typical |noise| in a product
_GEOMEAN_ABS_Z = math.exp(-(0.5772156649015329 + math.log(2)) / 2)


def _lattice_power(sigma_n: float, kappa: float, half_ulp: np.ndarray, threshold: float) -> float:
    """The r below which counts carrying noise of r sigma_n (r sigma_n well below 1) fail the whole-number test:
    where the statistic's typical value (|noise| at its geometric mean) reaches the threshold; 0 if even exact
    counts would pass, 1 if any r up to 1 fails."""
    def typical(r: float) -> float:
        return float(-2 * np.log(np.minimum(1.0, 2 * kappa * (r * sigma_n * _GEOMEAN_ABS_Z + half_ulp))).sum())

    if typical(1.0) >= threshold:
        return 1.0
    lo, hi = 1e-300, 1.0
    if typical(lo) < threshold:
        return 0.0
    for _ in range(100):  # bisection in log r
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if typical(mid) >= threshold else (lo, mid)
    return lo


def _count_statistics(counts: np.ndarray, sigma_n: float) -> tuple:
    """(u_lattice, u_zero, lattice distances, half float32 spacings, wrapped density bound): see count_uniforms."""
    from scipy.special import erf

    counts = np.asarray(counts, dtype=np.float64)
    half_ulp = np.array([_ulp32(c) for c in counts]) / 2
    lattice = np.abs(counts - np.round(counts))
    kappa = _wrapped_density_bound(sigma_n)
    u_lattice = np.minimum(1.0, 2 * kappa * (lattice + half_ulp))
    u_zero = np.minimum(1.0, erf((np.abs(counts) + half_ulp) / (sigma_n * math.sqrt(2))))
    return u_lattice, u_zero, lattice, half_ulp, kappa


def count_uniforms(counts: np.ndarray, sigma_n: float) -> tuple:
    """For each stored count, two numbers each uniform on (0, 1] or stochastically larger whatever the true count
    (a whole number) under noise of sigma_n: its distance to the nearest whole number, and its distance to zero,
    each widened by half its float32 spacing and mapped through a bound on its distribution function."""
    return _count_statistics(counts, sigma_n)[:2]


def _check_counts(counts: np.ndarray, sigma_n: float, rep: AuditReport) -> None:
    """The noisy counts against the declared noise, by tests that hold whatever the true counts are (whole numbers,
    at least 0): none far below zero; not nearer whole numbers than noise of sigma_n leaves them (exact or barely
    noised counts: the noise modulo 1 has a density of at most `_wrapped_density_bound`); not nearer zero than
    noise alone leaves them (Anderson's inequality: P(|t + sigma Z| <= a) <= P(|sigma Z| <= a) for every t); their
    distances to whole numbers following the law of sigma Z's (folded, wrapped), as for every whole t (noise of
    another law: +-sigma, uniform, two-point). Each number is judged after widening by half its float32 spacing.
    Counts with some noise, but less than declared, cannot be told from K numbers whose true values are large next
    to sigma, nor can noise bounded within 1/2 (rounding undoes it) from noise of the declared law: the check says
    how little noise it would catch, and always warns."""
    from scipy.stats import chi2, norm

    k = len(counts)
    alpha = NOISE_ALPHA / 4  # split over the four tests
    z = float(norm.isf(alpha / k))
    low = [i for i in range(k) if counts[i] < -z * sigma_n]
    u_lattice, u_zero, lattice, half_ulp, kappa = _count_statistics(counts, sigma_n)
    p_lattice, p_zero = _fisher_tail(u_lattice), _fisher_tail(u_zero)
    p_law = lattice_law_p(lattice, half_ulp, sigma_n)
    ok = not low and p_lattice >= alpha and p_zero >= alpha and p_law >= alpha
    power = _lattice_power(sigma_n, kappa, half_ulp, float(chi2.isf(alpha, 2 * k)))
    if low:
        detail = (f"{len(low)} noisy count(s) lie below -{z:.3g} sigma ({z * sigma_n:.4g}): no true count is negative, "
                  "so the file carries other counts than its ledger declares")
    elif p_lattice < alpha:
        near = int(np.sum(lattice + half_ulp <= 1e-3))
        detail = (f"the noisy counts lie nearer whole numbers than noise of sigma={sigma_n:.6g} leaves them ({near} of "
                  f"{k} within 0.001 of one; probability below {p_lattice:.1e} for a genuine file): they look exact or "
                  "barely noised")
    elif p_law < alpha:
        detail = (f"the noisy counts' distances to whole numbers do not follow their law under noise of "
                  f"sigma={sigma_n:.6g}, which holds whatever the true counts (Kolmogorov-Smirnov: probability below "
                  f"{p_law:.1e} for a genuine file): the counts carry noise of another law or size than the ledger "
                  "declares")
    elif p_zero < alpha:
        detail = (f"the noisy counts lie nearer zero than noise of sigma={sigma_n:.6g} alone leaves them whatever the "
                  f"true counts (probability below {p_zero:.1e} for a genuine file): they carry less noise than the "
                  "ledger declares")
    else:
        reach = (f"power: counts with noise of less than {power:.2g} of the declared sigma (nearly exact) would fail "
                 "about half the time, more often with less" if power > 0 else
                 "NO POWER to tell exact counts here (too few classes, or counts too large for float32)")
        detail = (f"no count below -{z:.3g} sigma, none nearer whole numbers or zero than noise of sigma={sigma_n:.6g} "
                  "allows, and their distances to whole numbers follow the law noise of that sigma gives; "
                  f"{reach}")
    if ok:
        detail += ("; noise whose distances to whole numbers look like the declared noise's but which is smaller (less "
                   "than declared, or bounded, e.g. the declared normal wrapped within 1/2 of zero, which rounding "
                   f"undoes) cannot be told from {k} numbers whose true values may be large next to sigma: the counts' "
                   "share of the guarantee rests on the ledger")
    rep.check("noise:counts", ok, detail, warn=True)  # always: what no test of the counts alone can tell is left


def _check_noise(release, rep: AuditReport, releases: dict, c1: float, c2: float) -> None:
    """The released numbers against the declared noise, from both sides: each noisy row's norm can be neither
    much smaller than the noise alone makes it, nor larger than its true sum (at most n_c C, n_c bounded by
    the noisy count) plus the noise's high quantile. The lower side's power: a row whose true sum is small
    next to sqrt(D) sigma shows under-noising; a row dominated by its signal cannot."""
    moments = [m for m in ("S1", "S2") if m in release.arrays and m in releases]
    counts = np.asarray(release.arrays.get("counts", []), dtype=np.float64)
    if not moments or "counts" not in releases or releases["counts"]["sigma"] <= 0:
        return
    sigma_n = float(releases["counts"]["sigma"])
    _check_counts(counts, sigma_n, rep)
    rows = sum(release.arrays[m].shape[0] for m in moments)
    for m in moments:
        arr = np.asarray(release.arrays[m], dtype=np.float64)
        sigma, c = float(releases[m]["sigma"]), (c1 if m == "S1" else c2)
        if sigma <= 0 or arr.ndim != 2 or len(counts) != arr.shape[0]:
            continue
        blocks = coordinate_blocks(arr.shape[1])
        tests = rows * (1 + len(blocks))  # each row whole and in blocks: the lower side's alpha is split over all
        floor, z, q_hi = noise_floor(arr.shape[1], tests, NOISE_ALPHA / 2)  # the other half: the upper side
        _, z_rows, q_hi = noise_floor(arr.shape[1], rows, NOISE_ALPHA / 2)
        sq = (arr * arr).sum(axis=1) / sigma ** 2
        low = [i for i in range(len(sq)) if not sq[i] >= floor]
        for b in blocks:
            floor_b = noise_floor(len(b), tests, NOISE_ALPHA / 2)[0]
            part = (arr[:, b] ** 2).sum(axis=1) / sigma ** 2
            low += [i for i in range(len(part)) if not part[i] >= floor_b and i not in low]
        z = z_rows
        n_hi = np.maximum(counts + z * sigma_n, 0.0)  # bounds each true count unless the counts' noise is extreme
        ceiling = n_hi * c / sigma + math.sqrt(q_hi)  # in units of sigma
        high = [i for i in range(len(sq)) if not np.sqrt(sq[i]) <= ceiling[i]]
        power = np.maximum((np.sqrt(max(floor, 0.0)) - n_hi * c / sigma) / np.sqrt(q_hi), 0.0)
        # judged row by row: noise taken out of the rows without power (and left in the others) cannot show
        blind = [i for i in range(len(power)) if not power[i] > 0]
        weakest = int(np.argmin(power))
        if low:
            names = ", ".join(printable(release.class_names[i], 30) for i in low[:5])
            detail = (f"{len(low)} row(s) ({names}) have less norm, whole (floor {np.sqrt(floor):.6g} sigma) or in a "
                      f"block of coordinates, than noise of sigma={sigma:.6g} gives any data: the file carries less "
                      "noise than its ledger declares")
        elif high:
            names = ", ".join(printable(release.class_names[i], 30) for i in high[:5])
            detail = (f"{len(high)} row(s) ({names}) have more norm than their noisy count's records (each of norm at "
                      f"most C={c:g}) and noise of sigma={sigma:.6g} can give: the file holds other numbers than its "
                      "ledger declares")
        elif not blind:
            detail = (f"every row's norm is consistent with sigma={sigma:.6g}; power: a row with Gaussian noise of "
                      f"less than {power[weakest]:.0%} of the declared sigma in every coordinate (not noise removed "
                      "along a few directions) would fail this check (the weakest row, "
                      f"{printable(release.class_names[weakest], 30)}); noise missing from part of the coordinates "
                      f"is sought in {len(blocks)} blocks")
        elif len(blind) < len(power):
            names = ", ".join(printable(release.class_names[i], 30) for i in blind[:5])
            detail = (f"every row's norm is consistent with sigma={sigma:.6g}, but {len(blind)} of {len(power)} rows "
                      f"({names}{', ...' if len(blind) > 5 else ''}) have NO POWER: their true sums (up to n*C) can be "
                      "as large as the noise, so noise missing from them cannot be told from the numbers of this file")
        else:
            detail = (f"consistent with sigma={sigma:.6g}, but NO POWER here: every row's true sum (up to n*C) can be "
                      "as large as the noise, so under-noising cannot be told from the numbers of this file")
        rep.check(f"noise:{m}", not low and not high, detail, warn=bool(blind))


#: half-width, in sigmas, of the windows of the window test: whatever t, t + sigma Z falls in an interval of width
#: 2 HALF sigma with probability at most 2 Phi(HALF) - 1 (0.0797), largest when the interval is centred on t
HALF = 0.1
#: the window test looks at numbers within this many sigmas of zero, where a normal float32's spacing is at most
#: 1e-3 sigma (2^23 x 1e-3): a fixed region, so the windows and their number are fixed before the file is read
REACH = 8388.0


def _window_test(a: np.ndarray, sigma: float) -> tuple:
    """(tail probability x windows, fullest window's share, its centre in sigmas) for numbers in units of sigma: the
    count in each window of width 2 HALF (two cells of HALF on a fixed grid; rounding to float32 widens it by at
    most one spacing: 1e-3 sigma for normal numbers, 2^-149 below them) is at most Binomial(N, p) in law, judged over
    every window the region holds."""
    from scipy.stats import binom, norm

    p = float(2 * norm.cdf(HALF + max(1e-3, 2.0 ** -149 / sigma)) - 1)
    z = a.ravel()
    z = z[np.abs(z) <= REACH]
    windows = int(2 * REACH / HALF) + 2
    if not z.size:
        return 1.0, 0.0, 0.0
    cells = np.floor(z / HALF).astype(np.int64)
    lo = int(cells.min())
    counts = np.bincount(cells - lo)
    both = counts[:-1] + counts[1:] if counts.size > 1 else counts
    j = int(np.argmax(both))
    worst = int(both[j])
    return float(binom.sf(worst - 1, a.size, p)) * windows, worst / a.size, (lo + j + 1) * HALF


def _difference(x: np.ndarray, y: np.ndarray, sx: float, sy: float) -> tuple:
    """(statistic, degrees of freedom) of the differences x/sx - y/sy of stored float32 numbers, each N(., 2) for
    independent noise: the sum of squares, with every difference enlarged by what rounding to float32 could have
    taken from it (half a spacing of each number), so that rounding never makes a genuine file fail."""
    with np.errstate(over="ignore", invalid="ignore"):
        d = np.abs(x / sx - y / sy)
        e = (np.spacing(np.abs(x).astype(np.float32)).astype(np.float64) / (2 * sx) +
             np.spacing(np.abs(y).astype(np.float32)).astype(np.float64) / (2 * sy))
        return float(((d + e) ** 2).sum()) / 2, int(d.size)  # each |true difference| is at most |d| + e


def _check_noise_shape(release, rep: AuditReport, releases: dict) -> None:
    """The noise's shape, where _check_noise sees only its energy per row and block. Each test holds whatever the
    true sums are: no window of width 0.2 sigma holds more numbers than Gaussian noise of any mean puts there
    (noise moved into spikes, or of another law where many sums are alike), and the energy of differences that
    independent noise keeps in full and shared noise cancels (Anderson's inequality): paired coordinates (noise
    shared along a row, or too little where neighbouring sums are alike), paired classes, S1 against S2."""
    from scipy.stats import chi2

    arrs = {m: np.asarray(release.arrays[m], dtype=np.float64) for m in ("S1", "S2")
            if m in release.arrays and m in releases and releases[m]["sigma"] > 0
            and np.asarray(release.arrays[m]).ndim == 2 and np.asarray(release.arrays[m]).size}
    if not arrs:
        return
    sig = {m: float(releases[m]["sigma"]) for m in arrs}
    tests = []  # (what, statistic, degrees of freedom)
    for m, a in arrs.items():
        k, d = a.shape
        if d >= 2:
            h = d // 2
            tests.append((f"{m}: paired coordinates", *_difference(a[:, 0:2 * h:2], a[:, 1:2 * h:2], sig[m], sig[m])))
        if k >= 2:
            h = k // 2
            tests.append((f"{m}: paired classes", *_difference(a[0:2 * h:2], a[1:2 * h:2], sig[m], sig[m])))
    if len(arrs) == 2 and arrs["S1"].shape == arrs["S2"].shape:
        tests.append(("S1 against S2", *_difference(arrs["S1"], arrs["S2"], sig["S1"], sig["S2"])))
    alpha = NOISE_ALPHA / (len(tests) + len(arrs))
    floors = {what: float(chi2.ppf(alpha, dof)) for what, _, dof in tests}
    bad = [what for what, stat, _ in tests if not stat >= floors[what]]
    for m, a in arrs.items():
        tail, share, centre = _window_test(a / sig[m], sig[m])
        if tail < alpha:
            where = "zero" if abs(centre) < HALF / 2 else f"{centre:+.4g} sigma"
            bad.append(f"{m}: {share:.1%} of its numbers lie within 0.1 sigma of {where}, where Gaussian noise of any "
                       "mean puts at most 8.0%")
    # power against noise reduced uniformly to r sigma, the file taken as genuine: a difference test's statistic
    # per degree of freedom is (signal + r^2); the signal is what this file shows above its noise's 1
    reach = [math.sqrt(floors[w] / dof - max(stat / dof - 1, 0.0)) for w, stat, dof in tests
             if floors[w] / dof > max(stat / dof - 1, 0.0)]
    power = max(reach, default=0.0)
    useful = 0.5  # below it, a point estimate: a file with that much less noise would fail about half the time
    if bad:
        detail = (f"the noise does not have the declared shape ({'; '.join(bad)}): independent Gaussian noise of the "
                  "declared sigma gives any data this with probability below 1e-9, so the file carries less noise, "
                  "or noise shared between numbers, than its ledger declares")
    elif power >= useful:
        detail = (f"no window of 0.2 sigma fuller than Gaussian noise allows, no noise shared between numbers "
                  f"({len(tests)} difference tests); power: noise reduced uniformly to less than {power:.0%} of the "
                  "declared sigma would fail (estimated from this file's differences); noise of the declared variance "
                  "and another law (e.g. +-sigma) is caught only where many sums are alike")
    else:
        why = ("there are no differences to test (one number per moment)" if not tests else
               f"the differences tested are dominated by the sums or too few (under {useful:.0%} of sigma caught)")
        detail = ("no window of 0.2 sigma fuller than Gaussian noise allows, no noise shared between numbers, but NO "
                  f"POWER against noise reduced uniformly: {why}")
    rep.check("noise:shape", not bad, detail, warn=not bad and power < useful)


def _log_mu(entry: dict) -> float:
    """A log entry's mu: None is a non-private release (inf); anything but a positive number is an edited log."""
    mu = entry.get("mu", "missing")
    if mu is None:
        return math.inf
    try:
        value = float(mu) if isinstance(mu, (int, float)) and not isinstance(mu, bool) else math.nan
    except OverflowError:  # an integer of hundreds of digits
        value = math.inf
    if not 0 < value < math.inf:
        where = printable(str(entry.get("output") or entry.get("output_sha256") or "?"), 80)
        raise MepfError(f"release log entry for {where} has no valid mu ({printable(repr(mu), 20)}); the log was "
                        "edited or damaged: restore it from a backup")
    return value


def composed_total(log_entries: list, delta: float) -> dict:
    """eps at `delta` of several Gaussian releases from one dataset (GDP: mu adds in quadrature)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise MepfError(f"no valid delta to compose at ({printable(repr(delta), 20)}); the release log was edited or "
                        "damaged: restore it from a backup")
    mus = [_log_mu(e) for e in log_entries]
    if not mus:
        raise MepfError("no release of this dataset is in the log")
    mu = math.sqrt(sum(m * m for m in mus))
    # each mu is for its entry's own relation; replace-one's sensitivities are at least add-remove's, so a
    # replace-one release is no weaker under add-remove and a mixed total holds under add-remove (under
    # replace-one an add-remove release's mu would count up to twice)
    relations = {e.get("relation") if e.get("relation") in RELATIONS else None for e in log_entries}  # edited: None
    mixed = len(relations) > 1
    relation = None if None in relations else "add-remove" if mixed else next(iter(relations))
    return {"releases": len(mus), "mu": mu, "delta": delta, "epsilon": eps_for_delta(delta, mu),
            "relation": relation, "relations_mixed": mixed}
