"""Every option of `mepf synthesize` and its default, once (the CLI reads the defaults from here). Imports no torch."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

GENERATOR_NAMES = ("conv", "conv-cbn", "resnet")  # generators.GENERATORS implements each
#: a generator's width when --width is 0 (its channels at the first layer)
GENERATOR_WIDTHS = {"conv": 64, "conv-cbn": 64, "resnet": 256}
OBJECTIVES = ("mavg", "plain")
LABELS = ("balanced", "prior")  # training and sampling labels: class-balanced, or from the noisy class prior
#: auto: a bf16 generator beside an fp32 extractor on CUDA and on CPUs with native bf16, fp32 elsewhere (precision.py)
PRECISIONS = ("auto", "fp32", "bf16", "bf16-generator")
LR_SCHEDULES = ("constant", "cosine", "cooldown")
#: torch.compile modes for the networks' training forward; none: eager (on the CPUs measured, compiling was slower)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
#: the share of --steps over which the cooldown schedule takes the lr linearly to 0
COOLDOWN_FRACTION = 0.2


@dataclass
class TrainOptions:
    release: str
    out: str
    generator: str = "auto"
    width: int = 0  # 0: the generator's default
    objective: str = "mavg"
    lr: float = 1e-3  # chosen on the mnist-5k proxy (docs/results.md)
    lr_mavg: float = 1e-3
    lr_schedule: str = "constant"
    ema: float = 0.0  # decay of an exponential moving average of the generator's weights; 0: off
    batch_size: int = 100
    steps: int = 2000
    seed: int = 0
    labels: str = "balanced"
    moment_weights: dict = field(default_factory=dict)
    layer_weights: dict = field(default_factory=dict)  # {layer or FIRST..LAST: weight}; unnamed layers 1
    grid_every: int = 500
    snapshot_every: int = 500
    log_every: int = 50
    device: str = "auto"
    precision: str = "auto"
    weights: str | None = None  # extractor weights file, when the release was made from one
    compile: str = "none"  # torch.compile mode of both networks in training (COMPILE_MODES)


#: the integer options' ranges (the CLI's); options read back from a run folder are checked against them too
INT_RANGES = {"width": (0, 4096), "batch_size": (1, 100_000), "steps": (1, None), "seed": (0, None),
              "grid_every": (0, None), "snapshot_every": (0, None), "log_every": (1, None)}


def plain_numbers(opts: TrainOptions) -> None:
    """numpy numbers given in Python (a sweep's np.float64 lr) as Python's, in place: options.json must hold
    JSON numbers."""
    def plain(v):
        if isinstance(v, numbers.Integral) and not isinstance(v, (bool, int)):
            return int(v)
        if isinstance(v, numbers.Real) and not isinstance(v, (bool, int, float)):
            return float(v)
        return {k: plain(w) for k, w in v.items()} if isinstance(v, dict) else v

    for k in TrainOptions.__dataclass_fields__:
        setattr(opts, k, plain(getattr(opts, k)))


def options_problem(opts: TrainOptions) -> str | None:
    """Which option is not of its type or range (a run folder's options.json can come from someone else; the CLI
    checks what it is given), as 'NAME VALUE (what it must be)'; None where every one is."""
    def number(v) -> bool:  # numpy's numbers too (TrainOptions built in Python); never a bool
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    for k, (lo, hi) in INT_RANGES.items():
        v = getattr(opts, k)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            return f"{k} {v!r} (an integer from {lo}{f' to {hi}' if hi is not None else ''})"
    for k in ("lr", "lr_mavg"):
        if not (number(getattr(opts, k)) and getattr(opts, k) > 0):
            return f"{k} {getattr(opts, k)!r} (a number above 0)"
    if not (number(opts.ema) and 0 <= opts.ema < 1):
        return f"ema {opts.ema!r} (a number in [0, 1))"
    for k in ("release", "out", "generator", "objective", "lr_schedule", "labels", "device", "precision", "compile"):
        if type(getattr(opts, k)) is not str:
            return f"{k} {getattr(opts, k)!r} (a string)"
    if opts.weights is not None and type(opts.weights) is not str:
        return f"weights {opts.weights!r} (a path)"
    for k in ("moment_weights", "layer_weights"):
        v = getattr(opts, k)
        if not (type(v) is dict and all(type(n) is str for n in v)):  # the weights: objective.check_weight
            return f"{k} {v!r} (names with weights)"
    return None


#: mepf: uint8 images (and PNG folders); dpimagebench: the gen.npz DPImageBench's eval.py loads
SAMPLE_FORMATS = ("mepf", "dpimagebench")


@dataclass
class SampleOptions:
    """`mepf sample`'s options and defaults."""
    source: str
    n: int
    out: str
    seed: int = 0
    labels: str = "balanced"
    batch_size: int = 500
    device: str = "auto"
    overwrite: bool = False
    format: str = "mepf"
    z_scale: float = 1.0  # the latent drawn from N(0, z_scale^2 I); 1: as trained
