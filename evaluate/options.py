"""Every option of `mepf evaluate` and its default, once (the CLI reads the defaults from here). Imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

#: the downstream classifiers classifiers.py trains, in the order reported
CLASSIFIERS = ("logreg", "mlp", "cnn")
METRICS = ("fid", "accuracy", "embedding")


@dataclass
class EvaluateOptions:
    synthetic: str
    reference: str
    out: str
    n: int = 10000  # samples drawn from a run or generator
    fid_samples: int | None = None  # None: all
    metrics: tuple | None = None  # None: all that apply
    classifiers: tuple = CLASSIFIERS
    cnn_epochs: int = 8
    seed: int = 0
    device: str = "auto"
