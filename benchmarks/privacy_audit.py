"""Empirical privacy audit of stage 1, from outside: a lower bound on the epsilon it really spends.

Stage 1 is a black box here. A small base dataset D and its neighbour D' (D plus one canary record under
add-remove; D with one record replaced by the canary, in another class, under replace-one) are released
many times each through the real release path (`embed_to_file`, what `mepf embed` runs, with fresh noise
from OS entropy every time). The auditor knows only what a released file and the non-private baseline
(`--epsilon inf`, the same path with the noise off) show. The optimal (Neyman-Pearson) test for two
Gaussians projects each release on the canary's contribution, scaled by the ledger's declared noise:
T = sum_j <r_j - m0_j, m1_j - m0_j> / sigma_j^2 over S1, S2 and the counts. A threshold on T, chosen on
half of the trials, gives false positive and false negative rates on the other half; Clopper-Pearson
upper bounds on both (95% overall) turn them into a lower bound on epsilon at the ledger's delta:
eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR))  (Jagielski et al. 2020,
Nasr et al. 2021). With the real mechanism the bound stays below the claim; --noise-scale S multiplies
the noise by S (a deliberately broken mechanism, the ledger still declaring the full noise), and at
S = 0.1, eps = 1 the bound must exceed the claim. With N trials per side no audit can show more than
about log(N / 3.7): the power is capped, which is why eps = 10 cannot be refuted by a few thousand trials.

    python benchmarks/privacy_audit.py [--epsilon 1] [--relation add-remove] [--noise-scale 1] [--trials 2000]

The last line is exactly `eps_lower_bound=<number> eps_claimed=<number>`.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy.stats import beta
from tqdm import tqdm

from mepf.artifacts import load
from mepf.embed import release, release_log
from mepf.embed.run import EmbedOptions, prepare_embed

SIZE = 8  # 8x8 greyscale records; the feature map is the pixels layer alone (D = 64): a trial costs milliseconds
RELEASES = ("S1", "S2", "counts")


def datasets(folder: Path, relation: str, n: int = 20) -> tuple:
    """D and D' as .npz files. The canary is a record whose contribution has the full norm C in every
    moment; under replace-one it replaces a record of another class with disjoint support, the largest
    change this (non-negative) feature map allows: sqrt(2) C per moment and sqrt(2) in the counts."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
    y = np.arange(n) % 2
    canary = np.zeros((SIZE, SIZE), np.uint8)
    canary[:, SIZE // 2:] = 255
    if relation == "add-remove":
        x2, y2 = np.concatenate([x, canary[None]]), np.append(y, 1)
    else:
        x[0], y[0] = 0, 0
        x[0, :, : SIZE // 2] = 255
        x2, y2 = x.copy(), y.copy()
        x2[0], y2[0] = canary, 1
    np.savez(folder / "D.npz", images=x, labels=y)
    np.savez(folder / "D2.npz", images=x2, labels=y2)
    return folder / "D.npz", folder / "D2.npz"


class Releaser:
    """Releases one dataset through the real path, each time into a fresh file and a fresh release log,
    and returns what an auditor reads: the arrays and the ledger. The source, transform and feature map
    are built once, as `mepf embed` builds them (prepare_embed); each release is one `embed_to_file`."""

    def __init__(self, data: Path, folder: Path, epsilon: float, delta: float, relation: str, tag: str):
        self.opts = EmbedOptions(data=str(data), out=str(folder / f"{tag}.h5"), epsilon=epsilon, delta=delta,
                                 relation=relation, classes="2", backbone="resnet18", weights="random",
                                 layers=("pixels",), release_log=str(folder / f"{tag}.jsonl"), overwrite=True,
                                 batch_size=32, device="cpu")
        self.parts = prepare_embed(self.opts)
        self.loaded = None  # the first file's ledger, once read by load

    def __call__(self) -> dict:
        o = self.opts
        source, transform, extractor, spec, device = self.parts
        for path in (o.release_log, release_log.head_path(o.release_log)):  # a fresh log each trial, on purpose
            Path(path).unlink(missing_ok=True)
        release.embed_to_file(source, transform, extractor, spec, out=o.out, epsilon=o.epsilon, delta=o.delta,
                              relation=o.relation, batch_size=o.batch_size, device=device, overwrite=True,
                              release_log_path=o.release_log, progress=False)
        if not self.loaded:  # the first file through mepf's reader (schema, bounds, checksum)
            self.loaded = load(o.out).ledger
        # then each fresh file read directly: the reader's safety check of a file from elsewhere runs in a
        # child process (~0.12 s, most of a trial), and this file is the one just written here
        with h5py.File(o.out, "r", locking=False) as f:
            arrays = {k: f[k][()].astype(np.float64) for k in RELEASES}
            ledger = json.loads(f["ledger"].asstr()[()])
        if ledger != self.loaded or not all(np.isfinite(a).all() for a in arrays.values()):
            raise RuntimeError(f"{o.out}: a release with another ledger than the first, or non-finite values")
        return {"arrays": arrays, "ledger": ledger}


class BrokenNoise:
    """The deliberately broken mechanism: inside the context, stage 1's noise is multiplied by `scale`
    while the ledger still declares the full noise. Only this benchmark ever does this."""

    def __init__(self, scale: float):
        self.scale, self.original = scale, release.privatise

    def __enter__(self):
        if self.scale != 1.0:
            release.privatise = lambda values, sigmas: self.original(
                values, {k: s * self.scale for k, s in sigmas.items()})
        return self

    def __exit__(self, *exc):
        release.privatise = self.original


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def eps_from_rates(fpr: float, fnr: float, delta: float) -> float:
    best = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if a > 0 and 1 - delta - b > 0:
            best = max(best, math.log((1 - delta - b) / a))
    return best


def lower_bound(t0: np.ndarray, t1: np.ndarray, delta: float, alpha: float = 0.05) -> dict:
    """The threshold (and direction) is chosen on the first half of each side's statistics, by the same
    Clopper-Pearson bound; the rates and their bounds (alpha/2 each) then come from the second half only."""
    h0, h1 = len(t0) // 2, len(t1) // 2
    sel0, ev0, sel1, ev1 = np.sort(t0[:h0]), t0[h0:], np.sort(t1[:h1]), t1[h1:]

    def bound(tau, s0, s1, sorted_=False):
        if sorted_:
            fp, fn = len(s0) - int(np.searchsorted(s0, tau, "right")), int(np.searchsorted(s1, tau, "right"))
        else:
            fp, fn = int((s0 > tau).sum()), int((s1 <= tau).sum())
        return eps_from_rates(clopper_pearson_upper(fp, len(s0), alpha / 2),
                              clopper_pearson_upper(fn, len(s1), alpha / 2), delta), fp, fn

    candidates = np.unique(np.concatenate([sel0, sel1]))
    tau = max(candidates, key=lambda c: bound(c, sel0, sel1, True)[0])
    eps_lb, fp, fn = bound(tau, ev0, ev1)
    return {"eps_lower_bound": eps_lb, "threshold": float(tau), "false_positives": fp, "false_negatives": fn,
            "trials_evaluated": (len(ev0), len(ev1))}


def audit(epsilon: float = 1.0, relation: str = "add-remove", noise_scale: float = 1.0, trials: int = 2000,
          delta: float = 1e-5, progress: bool = True) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        d0, d1 = datasets(folder, relation)
        m0 = Releaser(d0, folder, math.inf, delta, relation, "exact0")()["arrays"]
        m1 = Releaser(d1, folder, math.inf, delta, relation, "exact1")()["arrays"]
        diff = {k: m1[k] - m0[k] for k in RELEASES}
        sides = {0: Releaser(d0, folder, epsilon, delta, relation, "d0"),
                 1: Releaser(d1, folder, epsilon, delta, relation, "d1")}
        stats, ledger = {0: [], 1: []}, None
        with BrokenNoise(noise_scale), tqdm(total=2 * trials, desc="releases", disable=not progress,
                                            mininterval=2) as bar:
            for _t in range(trials):
                for side in (0, 1):
                    r = sides[side]()
                    ledger = r["ledger"]
                    sig = {x["name"]: x["sigma"] for x in ledger["releases"]}  # the declared noise
                    stats[side].append(sum(float(((r["arrays"][k] - m0[k]) * diff[k]).sum()) / sig[k] ** 2
                                           for k in RELEASES))
                    bar.update(1)
    mu_canary = math.sqrt(sum(float((diff[k] ** 2).sum()) / sig[k] ** 2 for k in RELEASES))
    res = lower_bound(np.array(stats[0]), np.array(stats[1]), delta)
    return {**res, "eps_claimed": ledger["achieved"]["epsilon"], "delta": delta, "relation": relation,
            "noise_scale": noise_scale, "trials": trials, "mu_ledger": ledger["mu"], "mu_canary": mu_canary}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--relation", choices=("add-remove", "replace-one"), default="add-remove")
    p.add_argument("--noise-scale", type=float, default=1.0, help="multiply the noise by S (S < 1: a broken mechanism)")
    p.add_argument("--trials", type=int, default=2000, help="releases of D and of D' each")
    a = p.parse_args(argv)
    r = audit(a.epsilon, a.relation, a.noise_scale, a.trials, a.delta)
    print(f"relation {r['relation']}, noise x{r['noise_scale']:g}, {r['trials']} releases of D and of D'; "
          f"ledger mu {r['mu_ledger']:.4g}, the canary's own mu {r['mu_canary']:.4g} (declared noise)")
    print(f"threshold {r['threshold']:.4g}: {r['false_positives']} false positives, {r['false_negatives']} false "
          f"negatives in {r['trials_evaluated'][0]} + {r['trials_evaluated'][1]} evaluation releases")
    print(f"eps_lower_bound={r['eps_lower_bound']:.4f} eps_claimed={r['eps_claimed']:.4f}")


if __name__ == "__main__":
    main()
