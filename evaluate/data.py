"""The two sides of an evaluation: synthetic images (a run, a generator, an .npz or a PNG folder) and a
reference (a named split, a folder, an .npz, or precomputed FID statistics). Never the private data."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mepf.artifacts.errors import MepfError
from mepf.artifacts.plain_file import open_plain_file
from mepf.artifacts.schema import MAX_CLASSES, class_names_problem
from mepf.embed.files import ArraySource
from mepf.embed.fingerprint import Fingerprint
from mepf.embed.sources import open_source, pixels_of
from mepf.embed.transform import Transform
from mepf.synthesize import run_folder
from mepf.synthesize.sampling import CROPS, samples_crop

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
    crop: str | None = None  # samples: the crop of the release they were drawn for ("center", "none"); None unknown
    native: dict | None = None  # a reference: how many records were converted to the geometry, and how

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
    native = {"records": 0, "other_aspect": 0, "upsampled": 0, "other_channels": 0}
    # blocks of 64: decoded at their own size first (3000 x 2000 photos took 35 MB each, review 50 M4)
    for images, labels in source.batches(64 if transform is not None else 1000):
        fp.update(images, labels)
        images = pixels_of(images)  # a PNG above the decoding cap is one black pixel, as stage 1 embeds it
        if transform is not None:
            _count_conversions(images, geometry, native)
            x = transform(images).permute(0, 2, 3, 1).numpy()
            images = np.round(x * 255).clip(0, 255).astype(np.uint8)
        else:
            shapes = ({tuple(np.shape(x)) for x in images} if isinstance(images, list) else
                      {tuple(np.shape(images)[1:])}) | ({xs[0].shape[1:]} if xs else set())
            if isinstance(images, list) or len(shapes) > 1:  # (one mode in one batch, another in the next)
                raise MepfError(f"{source.description}: images of more than one size or mode ("
                                + ", ".join("x".join(map(str, sh)) for sh in sorted(shapes)[:4])
                                + "); convert them to one size and mode first")
        xs.append(np.asarray(images))
        if labels is not None:
            ys.append(labels)
    images = np.concatenate(xs)
    if images.dtype != np.uint8:
        images = np.round(images * 255).astype(np.uint8)
    return ImageSet(images, np.concatenate(ys) if ys else None, source.classes, source.description, fp,
                    native=native if transform is not None else None)


def _count_conversions(images, geometry: tuple, native: dict) -> None:
    """Add to `native` the records of `images` (an array or a list of them, as a source yields) that the transform
    to `geometry` stretches (another aspect ratio), upsamples or converts between grey and colour."""
    h, w, c = geometry
    shapes = [np.shape(x) for x in images] if isinstance(images, list) else [np.shape(images)[1:]] * len(images)
    for shape in shapes:
        rh, rw = shape[:2]
        rc = shape[2] if len(shape) > 2 else 1
        native["records"] += 1
        native["other_aspect"] += rh * w != rw * h
        native["upsampled"] += rh < h or rw < w
        native["other_channels"] += (rc >= 3) != (c >= 3)


def _header(d, key: str, path: Path) -> tuple:
    """(shape, dtype) of an open .npz's array, from its header alone, checked as stage 1 checks it."""
    from mepf.embed.files import _npz_member

    member, shape, dtype = _npz_member(d.zip, key, str(path), "file")
    member.close()
    return shape, dtype


def _small(d, key: str, shape, kinds: str, path: Path) -> np.ndarray:
    """An array of an open .npz whose header (shape where given, dtype kind in `kinds`, at most 64 MB) is checked
    before its data is read: a small compressed member cannot inflate to more."""
    got, dtype = _header(d, key, path)
    if (shape is not None and got != shape) or dtype.kind not in kinds or \
            int(np.prod(got, dtype=object)) * dtype.itemsize > 64 << 20:
        raise MepfError(f"{path}: '{key}' is {dtype} of shape {got}; expected one "
                        f"{'label per image' if shape else 'list of class names'}")
    return d[key]


def read_npz(path: Path, geometry: tuple | None = None, crop: str | None = None) -> ImageSet:
    """An .npz of images (and optional labels 0..K-1), read as stage 1 reads it, so fingerprints compare. Its
    classes have no names: `class_names` is None and `by_index` says the labels are indices."""
    problem, f = open_plain_file(path)
    if problem:
        raise MepfError(f"{path}: {problem}; pass an .npz file")
    try:
        with f, np.load(f, allow_pickle=False) as d:
            key = "labels" if "labels" in d else "y" if "y" in d else None
            n = _header(d, "images" if "images" in d else "x", path)[0][:1] if key else ()  # one label per image
            y = _small(d, key, n, "iu", path) if key else None
            named = None
            if y is not None and "class_names" in d:
                names = _small(d, "class_names", None, "U", path)
                if names.ndim == 1 and len(names) <= MAX_CLASSES:
                    named = [str(n) for n in names]  # written by mepf sample
            recorded = None  # the release's --crop, as mepf sample records it (another tool's member: unknown)
            if "crop" in d:
                shape, dtype = _header(d, "crop", path)
                recorded = str(d["crop"]) if shape == () and dtype.kind == "U" and dtype.itemsize <= 64 else None
            if y is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= MAX_CLASSES):
                raise MepfError(f"{path}: labels must be 0 to {MAX_CLASSES - 1:,}; relabel the images")
            classes = named or ([str(i) for i in range(int(y.max()) + 1)] if y is not None and len(y) else None)
    except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise MepfError(f"{path} is not a readable .npz of images and labels ({type(e).__name__}); write it with "
                        "np.savez") from None
    if named is not None and class_names_problem(named):
        raise MepfError(f"{path}: its class_names hold {class_names_problem(named)}; fix or drop them")
    out = read_source(ArraySource(path, classes), geometry, crop)
    out.by_index = classes is not None and named is None
    out.crop = recorded if recorded in CROPS else None
    return out


def load_synthetic(spec: str, n: int, seed: int = 0, device="cpu", z_scale: float = 1.0, generator=None) -> ImageSet:
    """A run folder or generator.pt (samples n class-balanced images, the latent from N(0, z_scale^2 I)), an .npz,
    or a PNG folder. `generator`: SPEC's generator where the caller has loaded it already."""
    from mepf.synthesize import load_generator

    p = Path(spec)
    if not p.exists():
        raise MepfError(f"{spec}: no such run folder, generator, .npz or image folder")
    if (p.is_dir() and (p / run_folder.GENERATOR).is_file()) or p.suffix == ".pt":
        g = generator if generator is not None else load_generator(p)
        images, labels = g.sample(n, seed=seed, device=device, z_scale=z_scale)
        run = p if p.is_dir() else (p.parent if (p.parent / run_folder.OPTIONS).is_file() else None)
        names = g.info["class_names"] if g.info.get("labelled") else None
        return ImageSet(images, labels if names else None, names, f"{n} samples from {p}", run_dir=run, generator=g,
                        generator_path=p if p.is_file() else p / run_folder.GENERATOR,
                        crop=g.crop)
    if p.is_dir() and (p / run_folder.OPTIONS).is_file():
        raise MepfError(f"{p} has no generator.pt yet; finish training ({run_folder.resume_command(p)})")
    if z_scale != 1:
        raise MepfError(f"--z-scale samples a generator; {spec} holds images already (give a run folder or "
                        "generator.pt, or drop --z-scale)")
    if p.suffix.lower() == ".npz":  # as mepf sample writes one (x.NPZ too)
        return read_npz(p)
    if p.is_dir():
        out = read_source(open_source(str(p), private=False))
        sampled = sampled_names(out.class_names)
        if sampled is not None:  # a folder written by `mepf sample`: INDEX_NAME, in label order
            out.sampled_names = sampled
        out.crop = samples_crop(p)
        return out
    if p.is_file():
        from mepf.synthesize.locate import HDF5_SIGNATURE

        problem, f = open_plain_file(p)  # without blocking
        if not problem:
            with f:
                if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    word = run_folder.shell_word(spec)
                    raise MepfError(f"{spec} is a release (the embedding written by mepf embed), not images or a "
                                    f"generator: train one with `mepf synthesize {word} --out RUN`, then evaluate RUN "
                                    "(pass the release as --release for the embedding distance)")
    raise MepfError(f"{spec}: expected a run folder, generator.pt, .npz or a folder of PNGs")


def load_reference(spec: str, data_root=None, geometry: tuple | None = None, crop: str | None = None,
                   flag: str = "--reference"):
    """A named split, a folder, an .npz of images, or an .npz of FID statistics (mu, sigma). With `geometry`
    (the synthetic images' H, W, C: the release's), images are converted and resized to it as stage 1 does."""
    p = Path(spec)
    if p.suffix.lower() == ".npz" and p.is_file():
        from .fid import read_statistics

        stats = read_statistics(p, flag)
        if stats is not None:
            return FidStats(*stats, f"FID statistics {p.name}")
        return read_npz(p, geometry, crop)
    try:
        return read_source(open_source(spec, data_root=data_root, private=False), geometry, crop)
    except MepfError as e:
        said = str(e)  # stage 1 names its option, --data, which evaluate does not have
        said = f"{flag} {said[len('--data '):]}" if said.startswith("--data ") else f"{flag}: {said}"
        raise MepfError(said) from None


def run_stats(run_dir: Path | None) -> list:
    """The run's training records for the report's curves; [] where there are none or they cannot be read (the
    report then shows no curve)."""
    if run_dir is None:
        return []
    out, keys = [], None
    try:
        for _, r in run_folder.iter_stats(run_dir):  # only the distances kept: the file may be large
            if keys is None:
                keys = {k for k, v in r.items() if k.startswith("dist_") and type(v) in (int, float)}
            # a folder from elsewhere: only the records with every distance the first has, as numbers
            if all(type(r.get(k)) in (int, float) for k in keys):
                out.append({"step": r["step"], **{k: r[k] for k in keys}})
    except MepfError:
        return []
    return out
