"""FID with pytorch-fid's own statistics and Frechet distance; reference statistics cached by content."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from mepf.artifacts.staging import atomic_path

from .inception import activations, weights_id


def statistics(acts: np.ndarray):
    """mu and sigma exactly as pytorch-fid's calculate_activation_statistics computes them."""
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(mu1, s1, mu2, s2))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mepf" / "fid-stats"


def content_key(images: np.ndarray, weights: str | None) -> str:
    h = hashlib.sha256(f"{images.shape}|{images.dtype}|{weights_id(weights)}|".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def reference_statistics(model, images: np.ndarray, weights: str | None, cache_dir=None, batch_size=100,
                         device="cpu", progress=False):
    """(mu, sigma, cached): computed once per content and weights, then read from the cache."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{content_key(images, weights)}.npz"
    if path.is_file():
        d = np.load(path)
        return d["mu"], d["sigma"], True
    mu, sigma = statistics(activations(model, images, batch_size, device, progress, desc="FID: reference images"))
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, mu=mu, sigma=sigma)
    return mu, sigma, False
