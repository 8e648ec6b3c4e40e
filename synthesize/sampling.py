"""Writing samples: an .npz (uint8 images, int labels), a folder of PNGs (one subfolder per class), or DPImageBench's
gen.npz."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mepf.artifacts.errors import MepfError
from mepf.artifacts.plain_file import open_plain_file
from mepf.artifacts.staging import atomic_path, create_folder_of
from mepf.progress import progress as progress_bar

from . import run_folder
from .checkpoint import check_z_scale, load_generator, resumable_past
from .options import SAMPLE_FORMATS, SampleOptions

#: suffixes --out cannot mean: an image or another file type, where a folder of PNGs would be made
NOT_OUTPUTS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".h5", ".hdf5", ".pt", ".npy",
               ".zip", ".tar", ".gz", ".json", ".txt", ".csv"}


def class_folders(names: list) -> list:
    """One folder name per class: its index (zero-padded, so that sorted order is label order) and the name
    made safe ("malignant lesion" -> "1_malignant_lesion"); never '.', '..', a separator or a hidden name,
    whatever the class names in the file say."""
    width = len(str(len(names) - 1))
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", n).strip("._")[:64] for n in names]
    return [f"{i:0{width}d}_{s}" if s else f"{i:0{width}d}" for i, s in enumerate(safe)]


#: what `mepf sample` writes in a folder: its marker, class folders (index, then the safe name) of numbered PNGs,
#: or the PNGs (ASCII digits: Python's \d takes any script's)
MARKER = ".mepf-samples"
#: what the samples record of the release's --crop (an .npz member `crop`, a line `crop: ...` in the marker), so
#: that evaluate reads the reference as the release's data were read (review 50 H1)
CROPS = ("center", "none")


def samples_crop(folder: Path) -> str | None:
    """The crop a folder of samples records in its marker; None where it records none (or is not mepf's)."""
    problem, f = open_plain_file(folder / MARKER)  # never waits on a FIFO (review 51 M2)
    if problem:
        return None
    try:
        with f:
            text = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    said = [line[len("crop: "):].strip() for line in text.splitlines() if line.startswith("crop: ")]
    return said[0] if len(said) == 1 and said[0] in CROPS else None
_CLASS_FOLDER, _PNG = re.compile(r"[0-9]+(_[A-Za-z0-9._-]*)?"), re.compile(r"[0-9]{6,}\.png")


def _not_samples(folder: Path) -> str | None:
    """Why `folder` is not a folder of samples that --overwrite may replace (None where it is one): replacing it
    removes everything in it, so only a folder mepf sample marked as its own, holding nothing else, is replaced
    (names alone matched other tools' frame and sample folders)."""
    if (folder / "options.json").exists() or (folder / "generator.pt").exists():
        return "it is a training run folder"
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return f"it has no {MARKER} marker, so mepf sample did not write it (or wrote it before markers)"
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_symlink() or not (
                (entry.is_dir() and _CLASS_FOLDER.fullmatch(entry.name)
                 and all(f.is_file() and not f.is_symlink() and _PNG.fullmatch(f.name) for f in entry.iterdir()))
                or (entry.is_file() and _PNG.fullmatch(entry.name))):
            return f"it holds {entry.name}, which mepf sample does not write"
    return None


def _check_out(out: Path, overwrite: bool, npz: bool) -> None:
    """--out may be written: absent, or (with --overwrite) an .npz, or a folder of samples mepf sample wrote and
    marked, holding nothing else."""
    if out.name in ("", ".", ".."):
        raise MepfError(f"--out {out}: name the .npz, or a new folder for the PNGs (e.g. samples/), not {out}")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or out.is_dir() == npz:
        what = "a link" if out.is_symlink() else "a folder" if out.is_dir() else "a file"
        raise MepfError(f"--out {out} is {what}, where mepf sample would write {'an .npz' if npz else 'a folder'}; "
                        "choose another --out")
    if not overwrite:
        raise MepfError(f"{out} already exists; pass --overwrite to replace it (a folder only where mepf sample "
                        "wrote it) or choose another --out")
    problem = None if npz else _not_samples(out)
    if problem:
        raise MepfError(f"--out {out} cannot be replaced: {problem}, and --overwrite would remove everything in it; "
                        "choose a new folder")


_D = SampleOptions  # the defaults, written once there


def _run_note(run: Path, g, path: Path) -> str | None:
    """What sample says of a run folder's generator: another run's (review 44 M2: sampled without a word, even a
    non-private one), or one behind a snapshot resume would continue from; None otherwise, or where the folder has
    no readable options.json (a generator.pt samples without a run)."""
    if not (run / run_folder.OPTIONS).is_file():
        return None
    try:
        saved = run_folder.read_options(run)
    except MepfError:
        return None
    step = g.info.get("step")
    if (why := run_folder.of_another_run(g.info, saved)) is not None:
        eps = g.info.get("epsilon")
        claim = ("NONE: trained on a non-private baseline (eps = inf)" if eps == float("inf")
                 else f"eps = {eps:.4g} as it says" if isinstance(eps, (int, float)) else "no guarantee it states")
        return (f"{path} is NOT this run's ({why}); these are samples of that generator ({claim}), not of the "
                f"run's: `mepf info {run_folder.shell_word(run)}` says more")
    if (behind := resumable_past(run, step, saved)) is not None:
        return f"{run_folder.behind_note(behind, step, 'these are samples')} sample again"
    return None


def write_samples(source, n: int, out, seed: int = _D.seed, labels: str = _D.labels, batch_size: int = _D.batch_size,
                  device="cpu", overwrite: bool = False, format: str = _D.format, z_scale: float = _D.z_scale,
                  progress: bool = False) -> Path:
    """n samples to `out`. format 'mepf': an .npz of uint8 images (N, H, W[, C]) and labels, or a folder of PNGs;
    'dpimagebench': an .npz as DPImageBench's eval.py loads its gen.npz: `x` float32 (N, C, H, W) in [0, 1] (the
    same images as 'mepf' gives for the same seed, i.e. uint8 / 255) and `y` int64 labels, classes balanced.
    progress: a bar (or status lines) while the images are drawn and while PNGs are written."""
    out = Path(out)
    npz = out.suffix.lower() == ".npz"
    if format not in SAMPLE_FORMATS:
        raise MepfError(f"--format must be one of {', '.join(SAMPLE_FORMATS)}")
    if format == "dpimagebench":
        if not npz:
            raise MepfError(f"--format dpimagebench writes an .npz (DPImageBench names it gen.npz); --out {out} is not "
                            "one")
        if labels != "balanced":
            raise MepfError("--format dpimagebench takes class-balanced labels, as DPImageBench's synthetic sets "
                            "have; drop --labels prior")
    if out.suffix.lower() in NOT_OUTPUTS:
        raise MepfError(f"--out {out}: an .npz file, or a folder of PNGs (a name without a suffix such as "
                        f"{out.suffix}), one subfolder per class")
    g = load_generator(source)
    check_z_scale(z_scale)  # g.sample checks it too, but only after create_folder_of has made --out's parents
    if format == "dpimagebench" and not g.info.get("labelled"):
        raise MepfError("--format dpimagebench needs a generator trained on a labelled release (DPImageBench "
                        "evaluates class-conditional sets)")
    _check_out(out, overwrite, npz)
    path = Path(source) / run_folder.GENERATOR if Path(source).is_dir() else Path(source)
    note = _run_note(path.parent, g, path)
    if note:
        print(f"note: {note}", file=sys.stderr)
    create_folder_of(out)
    with progress_bar(total=n, desc="sample", unit="image", disable=not progress, leave=False) as bar:
        images, y = g.sample(n, seed=seed, labels=labels, batch_size=batch_size, device=device, z_scale=z_scale,
                             on_batch=bar.update)
    if format == "dpimagebench":
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)
        with atomic_path(out, ".npz") as tmp:
            np.savez(tmp, x=x, y=y.astype(np.int64))
        return out
    if npz:
        # an unlabelled generator's samples carry no labels (all 0 read as one class, which evaluate refused)
        named = ({"labels": y, "class_names": np.array(g.info["class_names"], dtype=str)} if g.info.get("labelled")
                 else {})
        with atomic_path(out, ".npz") as tmp:
            np.savez(tmp, images=images[..., 0] if images.shape[-1] == 1 else images, crop=np.array(g.crop), **named)
        return out
    names = class_folders(g.info["class_names"]) if g.info.get("labelled") else None
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / MARKER).write_text(f"written by mepf sample: --overwrite may replace this folder\ncrop: {g.crop}\n")
        with progress_bar(total=n, desc="write PNGs", unit="image", disable=not progress, leave=False) as bar:
            for i, (img, label) in enumerate(zip(images, y)):
                d = tmp / names[label] if names else tmp
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(d / f"{i:06d}.png")
                bar.update(1)
    return out
