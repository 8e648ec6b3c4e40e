"""Every option of `mepf embed` and its default, once (the CLI reads the defaults from here). Imports no torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EmbedOptions:
    data: str
    out: str
    epsilon: float
    delta: float
    relation: str = "add-remove"
    moments: str = "mean+second"
    budget_split: str | None = None  # None: counts 1%, the rest equally over the moments
    backbone: str = "efficientnet-lite0"
    weights: str = "pretrained"
    weights_seed: int = 0
    layers: tuple | None = None  # None: the backbone's own list
    pixel_weight: float | None = None
    pooling: str | None = None  # None: the backbone's own
    image_size: tuple | None = None  # (H, W); required for image folders
    feature_size: tuple | None = None
    channels: int | None = None  # 1 or 3; required for image folders
    crop: str = "none"  # "center": crop each record to the geometry's aspect ratio before resizing
    classes: str | None = None
    data_root: str | None = None
    batch_size: int = 128
    device: str = "auto"
    workers: int | None = None  # decoding processes per rank; None: loader.default_workers
    release_log: str | None = None  # None: ~/.local/share/mepf/releases.jsonl
    allow_repeat: bool = False
    force: bool = False
    overwrite: bool = False
