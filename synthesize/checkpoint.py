"""generator.pt: a trained generator with its architecture and the privacy guarantee it inherits.

    from mepf.synthesize import load_generator
    g = load_generator("runs/demo")          # or "runs/demo/generator.pt"
    images, labels = g.sample(1000, seed=0)  # uint8 (N, H, W, C), int64 (N,)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mepf.artifacts.errors import MepfError
from mepf.embed.tensor_file import read_tensors

from .generators import build_generator
from .run_folder import GENERATOR

FORMAT = "mepf-generator"
VERSION = 1


def load_tensors(path: Path, what: str):
    """torch.load restricted to tensors and plain containers (weights_only): a generator or snapshot from
    someone else can carry no code. Anything else is refused with one line."""
    return read_tensors(path, lambda reason: (
        f"cannot read {what} {path}: it is not a plain tensor checkpoint ({reason}); mepf loads only tensors "
        "and metadata, never pickled objects: use a file written by mepf"))


def save_generator(path: Path, generator, arch: dict, release, step: int) -> None:
    obj = {"format": FORMAT, "schema_version": VERSION, "arch": arch,
           "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
           "release_sha256": release.file_sha256, "release_checksum": release.checksum,
           "epsilon": release.epsilon, "delta": release.delta, "relation": release.ledger["relation"],
           "class_names": list(release.class_names), "labelled": release.labelled,
           "label_prior": release.label_prior().tolist(), "step": step}
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@dataclass
class TrainedGenerator:
    module: torch.nn.Module
    arch: dict
    info: dict

    @property
    def epsilon(self) -> float:
        return self.info["epsilon"]

    @property
    def delta(self) -> float:
        return self.info["delta"]

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, labels: str = "balanced", batch_size: int = 500, device="cpu"):
        """n images as uint8 (N, H, W, C) and labels (N,); deterministic given seed."""
        k = self.arch["num_classes"]
        g = torch.Generator().manual_seed(seed)
        if labels == "prior":
            y = torch.multinomial(torch.tensor(self.info["label_prior"]), n, replacement=True, generator=g)
        elif labels == "balanced":
            y = torch.arange(n) % k
        else:
            raise MepfError("labels must be balanced or prior")
        z = torch.randn(n, self.arch["z_dim"], generator=g)
        self.module.to(device).eval()
        out = []
        for s in range(0, n, batch_size):
            x = self.module(z[s:s + batch_size].to(device), y[s:s + batch_size].to(device)).float()
            out.append((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        return (np.concatenate(out) if out else np.zeros((0, self.arch["image_size"], self.arch["image_size"],
                                                          self.arch["channels"]), np.uint8)), y.numpy()


def load_generator(path) -> TrainedGenerator:
    """Load generator.pt, or the one in a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / GENERATOR
    if not path.is_file():
        raise MepfError(f"{path} does not exist; train one with `mepf synthesize FILE --out RUN_DIR`")
    obj = load_tensors(path, "generator")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("schema_version") != VERSION:
        raise MepfError(f"{path} is not an mepf generator (version {VERSION})")
    module = build_generator(obj["arch"])
    module.load_state_dict(obj["state_dict"])
    module.eval()
    info = {k: v for k, v in obj.items() if k not in ("state_dict", "arch")}
    return TrainedGenerator(module, obj["arch"], info)
