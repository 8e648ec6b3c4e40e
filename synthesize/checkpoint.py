"""generator.pt: a trained generator with its architecture and the privacy guarantee it inherits.

    from mepf.synthesize import load_generator
    g = load_generator("runs/demo")          # or "runs/demo/generator.pt"
    images, labels = g.sample(1000, seed=0)  # uint8 (N, H, W, C), int64 (N,)
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import printable
from mepf.artifacts.ledger import RELATIONS
from mepf.artifacts.plain_file import memory_bytes, open_plain_file, read_plain_file
from mepf.artifacts.schema import GEOMETRY, MAX_CLASSES, class_names_problem
from mepf.core.tensor_file import read_tensors, save_atomic, state_dict_of, stored_in_full_problem

from .generators import GENERATORS, build_generator
from .locate import HDF5_SIGNATURE
from .options import LABELS, SampleOptions
from .run_folder import GENERATOR, OPTIONS, of_another_run, resume_command, snapshots

_D = SampleOptions  # the defaults, written once there

FORMAT = "mepf-generator"
VERSION = 1


def load_tensors(path: Path, what: str) -> tuple:
    """(objects, SHA-256 of the bytes they came from): torch.load restricted to tensors and plain containers
    (weights_only): a generator or snapshot from someone else can carry no code, and declares no more tensor bytes
    than it holds. Anything else is refused with one line. The file is read once: what is hashed is what is
    loaded, whatever is written to the file meanwhile."""
    def refuse(reason):
        return (f"cannot read {what} {path}: it is not a plain tensor checkpoint ({reason}); mepf loads only "
                "tensors and metadata, never pickled objects: use a file written by mepf")

    memory = memory_bytes()
    limit = memory // 4 if memory else None  # loading takes the file about three times over: read, rebuilt, built
    size = os.stat(path).st_size
    if limit is not None and size > limit:
        raise MepfError(f"cannot read {what} {path}: it has {size:,} bytes, more than a quarter of this machine's "
                        f"memory ({memory:,} bytes), and loading it takes about three times its size; load it on a "
                        "machine with more memory")
    problem, data = read_plain_file(path, limit=limit)
    if problem:
        raise MepfError(refuse(problem))
    obj = read_tensors(io.BytesIO(data), require_zip=True, refuse=refuse)
    problem = stored_in_full_problem(obj)
    if problem:
        raise MepfError(f"cannot read {what} {path}: {problem}; use a file written by mepf")
    return obj, hashlib.sha256(data).hexdigest()


def snapshot_of_another_run(state: dict, saved: dict) -> str | None:
    """Why a snapshot cannot be of the run whose options.json is `saved`, or None: another run's or release's
    (run_folder.of_another_run), or a step past the run's --steps (options.json records them before any is trained)."""
    if (why := of_another_run(state, saved)) is not None:
        return why
    if type(saved.get("steps")) is int and state["step"] > saved["steps"]:
        return f"its step {state['step']} is past the run's --steps {saved['steps']}"
    return None


def snapshot_problem(path: Path, step: int, saved: dict) -> tuple:
    """(a snapshot's state or None, why resume cannot continue the run whose options.json is `saved` from it or
    None): unreadable, not of the `step` its name gives, another run's or release's, or past the run's --steps.
    Resume refuses by it, and `mepf info`, sample and evaluate count a run's latest snapshot only where it passes."""
    try:
        state, _ = load_tensors(path, "snapshot")
    except (MepfError, OSError) as e:
        return None, str(e) if isinstance(e, MepfError) else f"cannot read snapshot {path} ({type(e).__name__})"
    if not (isinstance(state, dict) and type(state.get("step")) is int and state["step"] == step):
        return None, f"snapshot {path} is not of the step its name gives; move it away to resume from the one before"
    problem = snapshot_of_another_run(state, saved)
    if problem:
        return None, (f"snapshot {path} is not of this run ({problem}): resumed, its weights would be credited to "
                      "this run and its release; move it away to resume from the one before")
    return state, None


def resumable_past(run: Path, step, saved: dict) -> int | None:
    """The step of the run's latest snapshot where it is past `step` (a generator.pt's: a run stopped after that
    snapshot) and resume would continue from it (snapshot_problem), else None."""
    snaps = snapshots(run) if isinstance(step, int) else []
    if not snaps or snaps[-1][0] <= step:
        return None
    return snaps[-1][0] if snapshot_problem(snaps[-1][1], snaps[-1][0], saved)[1] is None else None


def save_generator(path: Path, generator, arch: dict, release, step: int, run_id: str | None = None) -> None:
    obj = {"format": FORMAT, "schema_version": VERSION, "arch": arch,
           "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
           "release_sha256": release.file_sha256, "release_checksum": release.checksum,
           "epsilon": release.epsilon, "delta": release.delta, "relation": release.ledger["relation"],
           "class_names": list(release.class_names), "labelled": release.labelled,
           "label_prior": release.label_prior().tolist(), "step": step, "run_id": run_id,
           "transform": {"crop": "center"} if release.data_spec.get("transform", {}).get("crop") else {}}
    save_atomic(obj, path)


@dataclass
class TrainedGenerator:
    module: torch.nn.Module
    arch: dict
    info: dict
    #: SHA-256 of the bytes this generator was loaded from (None where it was built in this process)
    sha256: str | None = None

    @property
    def epsilon(self) -> float:
        return self.info["epsilon"]

    @property
    def crop(self) -> str:
        """The crop its release's data were read with ("center" or "none"), which samples record and evaluate
        applies to a reference."""
        return (self.info.get("transform") or {}).get("crop") or "none"

    @property
    def delta(self) -> float:
        return self.info["delta"]

    @torch.no_grad()
    def sample(self, n: int, seed: int = _D.seed, labels: str = _D.labels, batch_size: int = _D.batch_size,
               device="cpu", z_scale: float = _D.z_scale, on_batch=None):
        """n images as uint8 (N, H, W, C) and labels (N,); deterministic given seed. z_scale: the latent is drawn
        from N(0, z_scale^2 I) (the same draws times z_scale; 1: as trained). Post-processing: no privacy cost.
        on_batch(k) is called after each batch of k images (a progress bar)."""
        check_z_scale(z_scale)
        k = self.arch["num_classes"]
        if labels not in LABELS:
            raise MepfError(f"labels must be one of {', '.join(LABELS)}")
        self.module.to(device).eval()
        size, c = self.arch["image_size"], self.arch["channels"]
        # at most 256 MB of float32 images per batch: a small file may declare large images (1024 x 1024 x 3); and
        # about 1 GiB of activations, some `width` channels at the image's size (review 50 M2: 7.6 GB at 128 px)
        batch_size = min(batch_size, max(1, (1 << 26) // (size * size * c)),
                         max(1, (1 << 30) // (32 * size * size * max(c, self.arch["width"]))))
        try:  # the labels and latents too: -n sets their size (review 44 L3)
            g = torch.Generator().manual_seed(seed)
            if labels == "prior":
                y = torch.multinomial(torch.tensor(self.info["label_prior"]), n, replacement=True, generator=g)
            else:
                y = torch.arange(n) % k
            z = torch.randn(n, self.arch["z_dim"], generator=g)
            if z_scale != 1:
                z = z * z_scale
            images = np.empty((n, size, size, c), np.uint8)
            for s in range(0, n, batch_size):
                x = self.module(z[s:s + batch_size].to(device), y[s:s + batch_size].to(device)).float()
                images[s:s + batch_size] = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
                if on_batch:
                    on_batch(len(x))
        except (MemoryError, RuntimeError) as e:  # CPU: "can't allocate memory"; CUDA: OutOfMemoryError
            if isinstance(e, RuntimeError) and "memory" not in str(e):
                raise
            raise MepfError(f"{n} images of {size} x {size} x {c} do not fit in this machine's memory "
                            f"({type(e).__name__}); free memory, or draw them in smaller batches with `mepf sample "
                            "--batch-size` and evaluate that file") from None
        return images, y.numpy()


#: the widest latent --z-scale draws: far past any useful spread, and below float32's overflow of z * s (1e39
#: sampled all-black images, review 47 L5)
Z_SCALE_MAX = 100.0


def check_z_scale(z_scale) -> None:
    """--z-scale is a number in (0, Z_SCALE_MAX]."""
    if isinstance(z_scale, bool) or not (isinstance(z_scale, (int, float)) and 0 < z_scale <= Z_SCALE_MAX):
        raise MepfError(f"--z-scale {z_scale}: give a number above 0 and at most {Z_SCALE_MAX:g} (1 samples as the "
                        "generator was trained)")


def load_generator(path) -> TrainedGenerator:
    """Load generator.pt, or the one in a run folder."""
    path = Path(path)
    if path.is_dir():
        if (path / OPTIONS).is_file() and not (path / GENERATOR).exists():
            raise MepfError(f"{path} has no {GENERATOR} yet; finish training ({resume_command(path)})")
        path = path / GENERATOR
    if not path.is_file():
        raise MepfError(f"{path} does not exist; train one with `mepf synthesize FILE --out RUN_DIR`")
    problem, f = open_plain_file(path)  # without blocking: a FIFO swapped in after is_file is refused
    if problem:
        raise MepfError(f"cannot read generator {path}: {problem}; use a generator.pt written by mepf")
    with f:
        if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            raise MepfError(f"{path} is a release (the embedding written by mepf embed), not a generator: train one "
                            f"with `mepf synthesize {path} --out RUN`, then sample RUN")
    obj, sha = load_tensors(path, "generator")
    if isinstance(obj, dict) and "format" not in obj and {"step", "generator"} <= set(obj):
        where = f"the run folder {path.parent} or its {GENERATOR}" if path.name.startswith("snapshot-") else (
            "the run folder or its generator.pt")
        raise MepfError(f"{path} is a training snapshot (to resume from), not a generator; pass {where}")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("schema_version") != VERSION:
        raise MepfError(f"{path} is not an mepf generator (format {FORMAT}, version {VERSION}); use a "
                        f"{GENERATOR} written by mepf synthesize")
    problem = generator_problem(obj)
    if problem:
        raise MepfError(f"{path} is not a valid mepf generator: {problem}; use a generator.pt written by mepf")
    try:
        module = build_generator(obj["arch"])
        module.load_state_dict(state_dict_of(obj["state_dict"]))
    except (RuntimeError, MemoryError) as e:  # an arch within bounds can still exceed this machine's memory
        raise MepfError(f"cannot load generator {path}: {type(e).__name__} building its {obj['arch']['name']} "
                        f"of width {obj['arch']['width']} at {obj['arch']['image_size']} px (out of memory?)") from None
    module.eval()
    info = {k: v for k, v in obj.items() if k not in ("state_dict", "arch")}
    return TrainedGenerator(module, obj["arch"], info, sha)


#: bounds of a generator's architecture as read from a file (the CLI's --width goes up to 4096)
MAX_WIDTH, MAX_Z = 4096, 4096


def arch_problem(arch) -> str | None:
    """Why `arch` is not a generator mepf builds, checked before anything is allocated."""
    if not isinstance(arch, dict) or arch.get("name") not in GENERATORS:
        return f"its arch names no generator of {', '.join(GENERATORS)}"
    lo, hi = GEOMETRY
    bounds = {"image_size": (lo, hi), "channels": (1, 3), "num_classes": (1, MAX_CLASSES), "z_dim": (1, MAX_Z),
              "width": (2, MAX_WIDTH)}
    for key, (a, b) in bounds.items():
        v = arch.get(key)
        if type(v) is not int or not a <= v <= b or (key == "channels" and v == 2):
            return f"its arch's {key} is missing or outside {a}..{b}"
    return None


def generator_problem(obj: dict) -> str | None:
    """The file's arch, weights and metadata against what mepf writes: the arch in bounds, exactly the
    state_dict keys, shapes and dtypes that arch has (found on the meta device: nothing allocated), every
    value finite, class names safe, a label prior that is a distribution over the classes."""
    arch = obj.get("arch")
    problem = arch_problem(arch)
    if problem:
        return problem
    try:
        with torch.device("meta"):
            expected = build_generator(arch).state_dict()
    except MepfError as e:
        return str(e)
    state = obj.get("state_dict")
    if not isinstance(state, dict) or set(state) != set(expected):
        return "its state_dict does not hold this arch's weights"
    for k, t in expected.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or v.shape != t.shape or v.dtype != t.dtype:
            return f"its weight {printable(k)} is not {t.dtype} {list(t.shape)}"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return "its weights hold NaN or infinite values"
    k = arch["num_classes"]
    names, prior = obj.get("class_names"), obj.get("label_prior")
    problem = class_names_problem(names)
    if problem or len(names) != k:
        return problem or "its class names do not match its number of classes"
    if not (isinstance(prior, list) and len(prior) == k and all(type(p) in (int, float) and math.isfinite(p)
                                                                and 0 <= p <= 1 for p in prior)
            and abs(float(torch.tensor(prior, dtype=torch.float32).sum()) - 1) < 1e-3):
        return "its label prior is not a distribution over its classes (entries in [0, 1] summing to 1)"
    eps, delta = obj.get("epsilon"), obj.get("delta")
    if not (type(eps) in (int, float) and eps > 0 and type(delta) in (int, float) and 0 < delta < 1
            and isinstance(obj.get("labelled"), bool) and type(obj.get("step")) is int
            and obj.get("relation", "add-remove") in RELATIONS
            and isinstance(obj.get("release_sha256"), str) and len(obj["release_sha256"]) == 64):
        return "its guarantee (epsilon, delta, relation), labelled, step or release is missing or out of bounds"
    run_id = obj.get("run_id")
    if not (run_id is None or (isinstance(run_id, str) and len(run_id) == 32
                               and all(c in "0123456789abcdef" for c in run_id))):
        return "its run id is not one mepf writes (32 hex digits)"
    t = obj.get("transform", {})
    if not (isinstance(t, dict) and set(t) <= {"crop"} and t.get("crop") in (None, "center")):
        return "its transform is not one mepf writes ({} or {'crop': 'center'})"
    return None
