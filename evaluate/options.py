"""Every option of `mepf evaluate` and its default, once (the CLI reads the defaults from here). Imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

#: the downstream classifiers classifiers.py trains, in the order reported
CLASSIFIERS = ("logreg", "mlp", "cnn")
METRICS = ("fid", "accuracy", "embedding")
#: mepf's own measurement, or DPImageBench's (evaluate/dpimagebench.py)
PROTOCOLS = ("mepf", "dpimagebench")
#: DPImageBench's classifiers, in their order (evaluate/benchnets.py builds them)
BENCH_CLASSIFIERS = ("resnet", "wrn", "resnext")


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
    protocol: str = "mepf"
    epochs: int = 50  # dpimagebench: epochs per classifier
    seed: int = 0
    z_scale: float = 1.0  # a generator's latent drawn from N(0, z_scale^2 I)
    device: str = "auto"
