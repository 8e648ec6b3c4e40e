"""The guarantee a private release's ledger states, recomputed from its own numbers: the sensitivities from the
rules and the feature spec's norms, each sigma from mu and the weights, and eps from (sensitivity, sigma) pairs.
Deterministic and torch-free: every reader runs it (a file whose stated eps its own sigmas contradict is refused
before anyone trains from it), and the audit reports each check."""
from __future__ import annotations

import math

from .accounting import autodp_eps, eps_for_delta, gdp_mu
from .format import moments_match, printable
from .ledger import SENSITIVITY_RULES

REL_TOL = 1e-6


def close(a: float, b: float, tol: float = REL_TOL) -> bool:
    """a and b equal within a relative tol; an infinite or NaN value is close only to itself (inf - x is inf,
    which the relative bound would otherwise take)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return abs(a - b) <= tol * max(abs(a), abs(b))


def checks(release, autodp: bool = False) -> tuple[list, dict]:
    """([(name, ok, detail)], recomputed values) for a private release whose schema was checked: shapes against
    the spec's K and D, sensitivities against the rules, mu, weights, sigmas, eps (by the closed form; also by
    autodp where asked) against the ledger's, and the achieved guarantee within the target."""
    led, spec = release.ledger, release.features
    relation, releases = led["relation"], led["releases"]
    c1, c2 = spec.C1, spec.C2
    out = []
    names = [r["name"] for r in releases]
    out.append(("releases-match-arrays", sorted(names) == sorted(release.arrays),
                f"ledger releases {names}, file arrays {sorted(release.arrays)}"))
    out.append(("moments-match-arrays", moments_match(release),
                f"data spec moments {printable(release.data_spec.get('moments'))}, file arrays "
                f"{sorted(release.arrays)}"))
    k, d = len(release.class_names), spec.dim
    for r in releases:
        arr = release.arrays.get(r["name"])
        want = [k] if r["name"] == "counts" else [k, d]
        out.append((f"shape:{r['name']}", arr is not None and list(arr.shape) == want == list(r["shape"]),
                    f"expected {want} (K={k} classes, D={d}), array {None if arr is None else list(arr.shape)}, "
                    f"ledger {r['shape']}"))
        formula, fn = SENSITIVITY_RULES[relation][r["name"]]
        expected = fn(c1, c2)
        out.append((f"sensitivity:{r['name']}",
                    r["sensitivity_formula"] == formula and close(r["sensitivity"], expected, 1e-12),
                    f"{r['sensitivity']} ({r['sensitivity_formula']}); {relation} with C1={c1}, C2={c2} requires "
                    f"{expected} ({formula})"))
        out.append((f"mechanism:{r['name']}", r["mechanism"] == "gaussian" and r["sigma"] > 0,
                    f"{r['mechanism']}, sigma={r['sigma']}"))
    sens = [r["sensitivity"] for r in releases]
    sigmas = [r["sigma"] for r in releases]
    weights = [r["weight"] for r in releases]
    mu = gdp_mu(sens, sigmas)
    out.append(("mu", close(mu, led["mu"], 1e-9), f"recomputed mu {mu:.12g}, ledger {led['mu']:.12g}"))
    out.append(("weights", close(sum(weights), 1.0, 1e-9) and all(w > 0 for w in weights),
                f"weights {weights} sum to {sum(weights):.12g}"))
    for r in releases:
        implied = r["sensitivity"] / (mu * math.sqrt(r["weight"])) if mu > 0 and r["weight"] > 0 else math.inf
        out.append((f"sigma:{r['name']}", close(r["sigma"], implied, 1e-9),
                    f"sigma {r['sigma']:.12g}; sensitivity/(mu*sqrt(weight)) = {implied:.12g}"))
    delta = float(led["achieved"]["delta"])
    target_eps, target_delta = float(led["target"]["epsilon"]), float(led["target"]["delta"])
    ledger_eps = float(led["achieved"]["epsilon"])
    eps_closed = eps_for_delta(delta, mu)
    values = {"mu": mu, "epsilon_closed_form": eps_closed, "delta": delta, "epsilon": ledger_eps,
              "target": {"epsilon": target_eps, "delta": target_delta}}
    worst = eps_closed
    if autodp:
        eps_autodp = autodp_eps(sens, sigmas, delta)
        values["epsilon_autodp"] = eps_autodp
        worst = max(worst, eps_autodp)
        out.append(("eps:autodp", close(eps_autodp, ledger_eps),
                    f"autodp {eps_autodp:.9g} vs ledger {ledger_eps:.9g} at delta={delta:g}"))
    out.append(("eps:closed-form", close(eps_closed, ledger_eps),
                f"closed form {eps_closed:.9g} vs ledger {ledger_eps:.9g}"))
    out.append(("target", delta == target_delta and worst <= target_eps * (1 + 1e-12),
                f"achieved ({worst:.6g}, {delta:g}) within target ({target_eps:g}, {target_delta:g})"))
    return out, values


def problem(release) -> str | None:
    """The first check a private release fails, in words (None for a consistent ledger or a non-private one,
    whose ledger states no guarantee)."""
    if not release.private:
        return None
    for name, ok, detail in checks(release)[0]:
        if not ok:
            return f"{name}: {detail}"
    return None
