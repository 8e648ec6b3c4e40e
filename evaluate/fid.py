"""FID with pytorch-fid's own statistics and Frechet distance; reference statistics cached by content."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from mepf.artifacts.errors import MepfError
from mepf.artifacts.staging import atomic_path

from .inception import activations

DIMS = 2048  # pytorch-fid's pool3 features


def statistics(acts: np.ndarray):
    """mu and sigma exactly as pytorch-fid's calculate_activation_statistics computes them."""
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's distance; scipy's warnings about a singular product (few samples) are not shown, as the
    evaluation says in its own words when the sample count is too small."""
    import warnings

    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # scipy's LinAlgWarning
        warnings.simplefilter("ignore", category=DeprecationWarning)  # sqrtm's disp, in pytorch-fid
        try:
            return float(calculate_frechet_distance(mu1, s1, mu2, s2))
        except (ValueError, np.linalg.LinAlgError) as e:  # pytorch-fid's "Imaginary component"; scipy's sqrtm
            raise MepfError(f"the FID cannot be computed ({e}): the covariances are singular (fewer than 2,048 "
                            "samples on either side; draw more with --fid-samples) or not of images (compute the "
                            "statistics again)") from None


#: how far from symmetric and positive semi-definite a covariance may be (relative to its largest entry/eigenvalue):
#: np.cov's own rounding is about 1e-15
COVARIANCE_TOLERANCE = 1e-6


def covariance_problem(sigma: np.ndarray) -> str | None:
    """Why `sigma` is no covariance (not symmetric, or a negative eigenvalue), or None."""
    scale = float(np.abs(sigma).max()) or 1.0
    if float(np.abs(sigma - sigma.T).max()) > COVARIANCE_TOLERANCE * scale:
        return "its sigma is not symmetric"
    lowest = float(np.linalg.eigvalsh(sigma)[0])
    if lowest < -COVARIANCE_TOLERANCE * scale:
        return f"its sigma has a negative eigenvalue ({lowest:.3g})"
    return None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mepf" / "fid-stats"


def content_key(images: np.ndarray, weights: str) -> str:
    """The cache key of reference statistics: the images' bytes and the weights' id."""
    h = hashlib.sha256(f"{images.shape}|{images.dtype}|{weights}|".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def read_statistics(path: Path, what: str) -> tuple | None:
    """(mu, sigma) from an .npz of FID statistics, or None when it holds other arrays. Opened without blocking; the
    two arrays' headers are checked (2048 and 2048 x 2048 floats) before either is read, so that a small file
    cannot declare or inflate to more."""
    import zipfile

    from mepf.artifacts.plain_file import open_plain_file
    from mepf.embed.files import _NPZ_ERRORS, _npz_member

    problem, f = open_plain_file(path)
    if problem:
        raise MepfError(f"{what} {path}: {problem}; pass an .npz file")
    try:
        with f, zipfile.ZipFile(f) as zf:
            names = set(zf.namelist())
            if not {"mu.npy", "sigma.npy"} <= names:
                return None
            out = []
            for key, shape in (("mu", (DIMS,)), ("sigma", (DIMS, DIMS))):
                member, got, dtype = _npz_member(zf, key, path.name, what)
                with member:
                    if got != shape or dtype.kind != "f":
                        raise MepfError(f"{what} {path}: '{key}' is {dtype} of shape {got}, not floats of shape "
                                        f"{shape}; pass statistics of pytorch-fid's 2048-d pool3 features")
                    out.append(np.frombuffer(member.read(), dtype=dtype).reshape(shape).astype(np.float64))
    except (*_NPZ_ERRORS, zipfile.BadZipFile) as e:
        raise MepfError(f"{what} {path} is not a readable .npz file ({type(e).__name__}); pass one written by "
                        "np.savez") from None
    if not all(np.isfinite(a).all() for a in out):
        raise MepfError(f"{what} {path} holds NaN or infinite statistics; compute them again")
    problem = covariance_problem(out[1])
    if problem:
        raise MepfError(f"{what} {path} holds no covariance ({problem}); compute the statistics again")
    return out[0], out[1]


def reference_statistics(model, images: np.ndarray, cache_dir=None, batch_size=100, device="cpu", progress=False):
    """(mu, sigma, cached): computed once per content and weights, then read from the cache."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{content_key(images, model.weights_id)}.npz"  # load_inception's id of the bytes it loaded
    if path.is_file():
        stats = read_statistics(path, "cached FID statistics")
        if stats is not None:
            return (*stats, True)
    mu, sigma = statistics(activations(model, images, batch_size, device, progress, desc="FID: reference images"))
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, mu=mu, sigma=sigma)
    return mu, sigma, False
