"""The private release: one streaming pass of float64 sums, then Gaussian noise from OS entropy, once.

This is the only code that touches private records. What leaves it is the noisy sums and counts, the
declared specs and the ledger; the exact sums, n, the fingerprint and the noise stay here.
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mepf.artifacts.accounting import calibrate, non_private, parse_budget_split, validate_target
from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import check_output_path, write_release
from mepf.artifacts.ledger import RELATIONS, build_ledger, sensitivity

from . import release_log
from .fingerprint import Fingerprint
from .features import dequantise, phi, quantise

MOMENTS = {"mean": ("S1",), "mean+second": ("S1", "S2")}


@dataclass
class Sums:
    """Exact (pre-noise) statistics: private, never written anywhere."""

    sums: dict  # name -> float64 (K, D)
    counts: np.ndarray  # int64 (K,)
    fingerprint: str

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def release_names(moments: str) -> list:
    if moments not in MOMENTS:
        raise MepfError(f"--moments must be one of {', '.join(MOMENTS)}")
    return [*MOMENTS[moments], "counts"]


def accumulate(source, transform, extractor, moments: str, c1: float, c2: float, batch_size: int = 128,
               device="cpu", progress: bool = True) -> Sums:
    """One pass over `source`: exact per-class sums of the quantised phi1 (and phi2), returned as float64,
    and exact counts. The extractor runs on `device`; normalisation and sums need float64 and int64,
    so on MPS (no float64) they run on the CPU."""
    names = MOMENTS[moments]
    spec = {"C1": c1, "C2": c2}
    cs = {"S1": c1, "S2": c2}
    k = len(source.classes) if source.classes else 1
    device = torch.device(device)
    extractor = extractor.to(device)
    if device.type == "cuda":
        extractor = extractor.to(memory_format=torch.channels_last)
    acc = torch.device("cpu") if device.type == "mps" else device
    sums = {}
    counts = torch.zeros(k, dtype=torch.int64, device=acc)
    fp = Fingerprint(source.description)
    with torch.no_grad(), tqdm(total=len(source), unit="img", desc="embed", disable=not progress,
                               dynamic_ncols=True) as bar:
        for images, labels in source.batches(batch_size):
            fp.update(images, labels)
            b = len(images)
            if labels is None:
                labels = np.zeros(b, dtype=np.int64)
            x = transform(images)
            if b < batch_size:  # every forward pass has the same shape, so the same kernels and rounding
                x = torch.cat([x, x.new_zeros((batch_size - b, *x.shape[1:]))])
            f = extractor(x.to(device, non_blocking=True))[:b].to(acc)
            y = torch.from_numpy(labels).to(acc)
            for name in names:
                q = quantise(phi(name, f, spec), cs[name])
                if name not in sums:
                    sums[name] = torch.zeros(k, q.shape[1], dtype=torch.int64, device=acc)
                sums[name].index_add_(0, y, q)
            counts += torch.bincount(y, minlength=k)
            bar.update(b)
    if int(counts.sum()) == 0:
        raise MepfError("the data source yielded no records")
    return Sums(sums={n: dequantise(s.cpu(), cs[n]).numpy() for n, s in sums.items()},
                counts=counts.cpu().numpy(), fingerprint=fp.hexdigest())


def privatise(values: dict, sigmas: dict) -> dict:
    """value + N(0, sigma^2 I) for each release, float64. The generator is seeded from OS entropy and
    dropped here: neither seed nor noise is kept, logged or returned separately."""
    rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(secrets.randbits(128))))
    out = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        out[name] = v + rng.standard_normal(v.shape) * sigmas[name]
    del rng
    return out


@dataclass
class EmbedResult:
    path: Path
    sha256: str
    ledger: dict
    records_per_second: float
    repeat_of: int


def embed_to_file(source, transform, extractor, feature_spec: dict, *, out, epsilon: float, delta: float,
                  relation: str = "add-remove", moments: str = "mean+second", budget_split: str | None = None,
                  batch_size: int = 128, device="cpu", overwrite: bool = False, force: bool = False,
                  release_log_path=None, allow_repeat: bool = False, progress: bool = True) -> EmbedResult:
    """The whole private release, from a source to a written file and a log entry. epsilon = inf is a
    non-private baseline: the same path with the noise off, declared in the ledger."""
    validate_target(epsilon, delta, allow_inf=True)
    if relation not in RELATIONS:
        raise MepfError(f"--relation must be one of {', '.join(RELATIONS)}")
    out = check_output_path(out, overwrite)
    names = release_names(moments)
    weights = parse_budget_split(budget_split, names)
    c1, c2 = feature_spec["C1"], feature_spec["C2"]
    sens = {n: sensitivity(relation, n, c1, c2)[0] for n in names}
    # before any private record is read
    calib = calibrate(epsilon, delta, sens, weights) if math.isfinite(epsilon) else non_private(names)
    log_path = Path(release_log_path) if release_log_path else release_log.default_log_path()
    release_log.read_log(log_path)  # a corrupt log fails now, not after the pass

    t0 = time.perf_counter()
    sums = accumulate(source, transform, extractor, moments, c1, c2, batch_size, device, progress)
    elapsed = time.perf_counter() - t0
    previous = release_log.releases_of(log_path, sums.fingerprint)
    if previous and not allow_repeat:
        raise MepfError(f"this dataset was already released {len(previous)} time(s) (see {log_path}); a second "
                        "release spends more privacy budget. Reuse the earlier file, or pass --allow-repeat "
                        "knowingly (`mepf audit FILE --release-log` then shows the composed total)")
    k = len(sums.counts)
    noisy = privatise({**sums.sums, "counts": sums.counts.astype(np.float64)}, calib.sigmas)
    n_noisy = float(noisy["counts"].sum())
    if not force and (n_noisy <= 0 or delta >= 1.0 / n_noisy):
        raise MepfError(f"--delta {delta:g} is not below 1/n (n is about {max(n_noisy, 0):.0f} by the noisy count); "
                        "choose a smaller --delta, e.g. 1/(10 n), or pass --force if you know why")
    shapes = {n: noisy[n].shape for n in names}
    ledger = build_ledger(relation, names, shapes, c1, c2, weights, calib, epsilon, delta)
    data_spec = {"dataset": source.description, "labelled": source.classes is not None, "num_classes": k,
                 "transform": transform.spec(), "moments": moments}
    class_names = list(source.classes) if source.classes else ["all"]
    sha = write_release(out, {n: noisy[n] for n in names}, class_names, feature_spec, data_spec, ledger,
                        overwrite=overwrite)
    release_log.append(log_path, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprint": sums.fingerprint,
        "dataset": source.description, "output": str(Path(out).resolve()), "output_sha256": sha,
        "epsilon": ledger["achieved"]["epsilon"], "delta": delta, "mu": ledger["mu"], "relation": relation,
        "repeat": bool(previous)})
    rate = sums.n / elapsed if elapsed > 0 else math.inf
    return EmbedResult(path=out, sha256=sha, ledger=ledger, records_per_second=rate, repeat_of=len(previous))
