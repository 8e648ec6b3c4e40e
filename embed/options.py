"""Every option of `mepf embed` and its default, once (the CLI reads the defaults from here). Imports no torch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mepf.artifacts.ledger import RELATIONS  # noqa: F401  (offered by the CLI from here)
from mepf.artifacts.schema import MOMENT_SETS  # noqa: F401

#: the named datasets `--data` takes (each with :train or :test); embed/datasets.py implements each
DATASETS = ("mnist-5k", "mnist", "fashion-mnist", "cifar10", "celeba")
CROPS = ("none", "center")
#: what the pass does with a record it cannot embed as it is (an image that cannot be decoded, a float record with
#: NaN, inf or a value outside [0,1], a label outside the declared set): stop the run naming it, or a fixed rule
BAD_RECORDS = ("stop", "zero")
#: default folders as (environment variable, fallback below the home folder, path below either)
DATA_ROOT = ("XDG_CACHE_HOME", ".cache", "mepf/datasets")
RELEASE_LOG = ("XDG_DATA_HOME", ".local/share", "mepf/releases.jsonl")


def default_path(where: tuple) -> Path:
    """DATA_ROOT or RELEASE_LOG resolved in this environment."""
    var, fallback, below = where
    return Path(os.environ.get(var) or Path.home() / fallback) / below


def default_path_text(where: tuple) -> str:
    """DATA_ROOT or RELEASE_LOG in words, for help texts."""
    var, fallback, below = where
    return f"${var}/{below}, else ~/{fallback}/{below}"


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
    release_log: str | None = None  # None: default_path(RELEASE_LOG)
    allow_repeat: bool = False
    force: bool = False
    overwrite: bool = False
    bad_records: str = "stop"
