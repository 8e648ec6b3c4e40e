"""The two sides of an evaluation: synthetic images (a run, a generator, an .npz or a PNG folder) and a
reference (a named split, a folder, an .npz, or precomputed FID statistics). Never the private data."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mepf.artifacts.errors import MepfError
from mepf.artifacts.schema import class_names_problem
from mepf.core.tensor_file import open_plain_file
from mepf.embed.files import ArraySource
from mepf.embed.fingerprint import Fingerprint
from mepf.embed.sources import open_source
from mepf.embed.transform import Transform
from mepf.synthesize import run_folder

from .classes import sampled_names


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray | None
    class_names: list | None
    description: str
    fingerprint: object = None  # mepf.embed.fingerprint.Fingerprint, as stage 1 would take it
    run_dir: Path | None = None
    generator: object = None
    by_index: bool = False  # labels are indices without names (an .npz): classes match by position
    sampled_names: list | None = None  # a folder from `mepf sample`: the class names behind INDEX_NAME
    generator_path: Path | None = None

    @property
    def shape(self):
        return self.images.shape[1:]


@dataclass
class FidStats:
    mu: np.ndarray
    sigma: np.ndarray
    description: str


def read_source(source, geometry: tuple | None = None, crop: str | None = None) -> ImageSet:
    """Read a whole (small, public) source into memory, fingerprinting it as stage 1 would. With `geometry`
    (H, W, C), every record is converted and resized to it by stage 1's own transform (embed/transform.py),
    so that whatever `mepf embed` accepts (mixed sizes and modes), evaluate accepts too."""
    fp = Fingerprint(keep_hashes=True)  # in memory anyway; compared under the release log's key later
    transform = Transform(geometry[:2], geometry[2], crop) if geometry is not None else None
    xs, ys = [], []
    for images, labels in source.batches(1000):
        fp.update(images, labels)
        if transform is not None:
            x = transform(images).permute(0, 2, 3, 1).numpy()
            images = np.round(x * 255).clip(0, 255).astype(np.uint8)
        elif isinstance(images, list):
            raise MepfError(f"{source.description}: images have different sizes; resize them to one size first")
        xs.append(np.asarray(images))
        if labels is not None:
            ys.append(labels)
    images = np.concatenate(xs)
    if images.dtype != np.uint8:
        images = np.round(images * 255).astype(np.uint8)
    return ImageSet(images, np.concatenate(ys) if ys else None, source.classes, source.description, fp)


def read_npz(path: Path, geometry: tuple | None = None, crop: str | None = None) -> ImageSet:
    """An .npz of images (and optional labels 0..K-1), read as stage 1 reads it, so fingerprints compare. Its
    classes have no names: `class_names` is None and `by_index` says the labels are indices."""
    problem, f = open_plain_file(path)
    if problem:
        raise MepfError(f"{path}: {problem}; pass an .npz file")
    with f, np.load(f, allow_pickle=False) as d:
        y = d["labels"] if "labels" in d else d["y"] if "y" in d else None
        named = None
        if y is not None and "class_names" in d and d["class_names"].dtype.kind == "U" and d["class_names"].ndim == 1:
            named = [str(n) for n in d["class_names"]]  # written by mepf sample
        classes = named or ([str(i) for i in range(int(y.max()) + 1)] if y is not None and len(y) else None)
    if named is not None and class_names_problem(named):
        raise MepfError(f"{path}: its class_names hold {class_names_problem(named)}; fix or drop them")
    out = read_source(ArraySource(path, classes), geometry, crop)
    out.by_index = classes is not None and named is None
    return out


def load_synthetic(spec: str, n: int, seed: int = 0, device="cpu", z_scale: float = 1.0) -> ImageSet:
    """A run folder or generator.pt (samples n class-balanced images, the latent from N(0, z_scale^2 I)), an .npz,
    or a PNG folder."""
    from mepf.synthesize import load_generator

    p = Path(spec)
    if not p.exists():
        raise MepfError(f"{spec}: no such run folder, generator, .npz or image folder")
    if (p.is_dir() and (p / run_folder.GENERATOR).is_file()) or p.suffix == ".pt":
        g = load_generator(p)
        images, labels = g.sample(n, seed=seed, device=device, z_scale=z_scale)
        run = p if p.is_dir() else (p.parent if (p.parent / run_folder.OPTIONS).is_file() else None)
        names = g.info["class_names"] if g.info.get("labelled") else None
        return ImageSet(images, labels if names else None, names, f"{n} samples from {p}", run_dir=run, generator=g,
                        generator_path=p if p.is_file() else p / run_folder.GENERATOR)
    if p.is_dir() and (p / run_folder.OPTIONS).is_file():
        raise MepfError(f"{p} has no generator.pt yet; finish training (mepf synthesize --resume {p})")
    if z_scale != 1:
        raise MepfError(f"--z-scale samples a generator; {spec} holds images already (give a run folder or "
                        "generator.pt, or drop --z-scale)")
    if p.suffix == ".npz":
        return read_npz(p)
    if p.is_dir():
        out = read_source(open_source(str(p), private=False))
        sampled = sampled_names(out.class_names)
        if sampled is not None:  # a folder written by `mepf sample`: INDEX_NAME, in label order
            out.sampled_names = sampled
        return out
    raise MepfError(f"{spec}: expected a run folder, generator.pt, .npz or a folder of PNGs")


def load_reference(spec: str, data_root=None, geometry: tuple | None = None, crop: str | None = None,
                   flag: str = "--reference"):
    """A named split, a folder, an .npz of images, or an .npz of FID statistics (mu, sigma). With `geometry`
    (the synthetic images' H, W, C: the release's), images are converted and resized to it as stage 1 does."""
    p = Path(spec)
    if p.suffix == ".npz" and p.is_file():
        problem, f = open_plain_file(p)
        if problem:
            raise MepfError(f"{flag} {p}: {problem}; pass an .npz file")
        with f, np.load(f, allow_pickle=False) as d:
            if "mu" in d and "sigma" in d:
                return FidStats(d["mu"], d["sigma"], f"FID statistics {p.name}")
        return read_npz(p, geometry, crop)
    try:
        return read_source(open_source(spec, data_root=data_root, private=False), geometry, crop)
    except MepfError as e:
        raise MepfError(f"{flag}: {e}") from None


def run_stats(run_dir: Path | None) -> list:
    if run_dir is None or not (run_dir / run_folder.STATS).is_file():
        return []
    return [json.loads(l) for l in (run_dir / run_folder.STATS).read_text().splitlines() if l.strip()]
