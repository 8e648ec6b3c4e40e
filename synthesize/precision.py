"""Stage 2's precision plan: the dtype each network runs in and their memory format. The loss, the moving
averages, the optimiser state and the fake embeddings stay float32 whatever the plan."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mepf.artifacts.errors import MepfError

from .options import PRECISIONS

CLASS_SUMS = ("index_add", "matmul", "fused")


@dataclass(frozen=True)
class Precision:
    generator: str  # "fp32" or "bf16" (bf16: autocast)
    extractor: str
    channels_last: bool  # both networks, and the images between them
    #: the fused phi, the folded padding and float32 class sums; False only for runs started before them
    fast_paths: bool = True
    #: how per-class sums of the batch's features are taken: "index_add" (5 x faster at VGG's D = 303,104), or
    #: "matmul" (a one-hot product), as every run recorded before 2026-12-03 did, so that those resume bit-exactly;
    #: or "fused": phi and the class sums as one autograd step that writes no phi row (fast paths only)
    class_sums: str = "index_add"
    #: the extractor's batch norms folded into its convolutions (fold_batch_norm: the same map up to rounding,
    #: faster); False for runs recorded before it, so that they resume bit-exactly (fast paths only)
    bn_folded: bool = False
    #: the generator's nearest-upsample -> 3x3 convolutions computed as one stride-2 transposed convolution each
    #: (generators.up_conv: the same function up to rounding, faster); False for runs recorded before it
    upsample_folded: bool = False
    #: under torchrun, the generator's batch norms normalise over the global batch (global_norm.py), so N ranks of
    #: B train as one process of N x B; False for runs recorded before it (each rank's batch), so they resume as ran
    bn_global: bool = False
    #: balanced labels at a batch that is not a multiple of K start at a class drawn each step (train.sample_labels);
    #: False for runs recorded before it (classes 0 .. b-1 on every step), so they resume as they ran
    labels_rotated: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d) -> Precision:
        dtypes = ("fp32", "bf16")
        if not (isinstance(d, dict) and d.get("generator") in dtypes and d.get("extractor") in dtypes
                and type(d.get("channels_last")) is bool and type(d.get("fast_paths")) is bool
                and d.get("class_sums", "matmul") in CLASS_SUMS
                and type(d.get("bn_folded", False)) is bool and type(d.get("upsample_folded", False)) is bool
                and type(d.get("bn_global", False)) is bool and type(d.get("labels_rotated", False)) is bool
                and (d["fast_paths"] or (d.get("class_sums", "matmul") == "matmul" and not d.get("bn_folded")
                                         and not d.get("upsample_folded")))):
            raise MepfError("the run's options.json holds no valid precision_resolved; the run folder is damaged")
        # a plan recorded before class_sums was chosen summed by the one-hot product, before bn_folded or
        # upsample_folded did not fold
        return cls(d["generator"], d["extractor"], d["channels_last"], d["fast_paths"], d.get("class_sums", "matmul"),
                   d.get("bn_folded", False), d.get("upsample_folded", False), d.get("bn_global", False),
                   d.get("labels_rotated", False))

    def __str__(self) -> str:
        if self.generator == self.extractor:
            name = self.generator
        else:
            name = f"generator {self.generator}, extractor {self.extractor}"
        return (name + (", channels-last" if self.channels_last else "") + ("" if self.fast_paths else ", legacy")
                + (", phi and class sums fused" if self.class_sums == "fused"
                   else f", class sums by {self.class_sums}") + (", batch norms folded" if self.bn_folded else "")
                + (", upsampling folded" if self.upsample_folded else ""))


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively here: CUDA, or a CPU whose torch build reports AVX512-BF16 or AMX-BF16."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if caps is None:
        return False
    try:
        c = caps()
    except Exception:  # noqa: BLE001 - an unknown CPU: take the safe choice
        return False
    return bool(c.get("avx512_bf16") or c.get("amx_bf16"))


def resolve(precision: str, device: torch.device) -> Precision:
    """--precision for a new run. auto: where bf16 is native (CUDA, or a CPU with AVX512-BF16 or AMX), a bf16
    generator beside an fp32 extractor: a bf16 extractor was not shown to train as well (docs/results.md, "a bf16
    extractor" and "a bf16 extractor again": two and four seeds a side), and on CPU its backward through
    EfficientNet's depthwise convolutions is slower; fp32 elsewhere.
    Channels-last always: it is faster for both networks on CPU and CUDA alike. Class sums by index_add on CPU, by
    the one-hot product elsewhere. The extractor's batch norms folded into its convolutions, and the generator's
    upsampling into the convolutions after it; its batch norms over the global batch under torchrun."""
    if precision not in PRECISIONS:
        raise MepfError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16-generator" if native_bf16(device) else "fp32"
    # index_add accumulates with atomics on GPUs (not bit-reproducible), where the product costs little anyway
    sums = "index_add" if device.type == "cpu" else "matmul"
    g, e = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "bf16-generator": ("bf16", "fp32")}[precision]
    return Precision(g, e, True, True, sums, True, True, True, True)


def legacy(precision: str, device: torch.device) -> Precision:
    """The computation of a run started before the plan was recorded in options.json, as that code did it on
    the device it resumes on: bf16 and channels-last for both networks with bf16 (or auto on CUDA), else fp32
    in the default memory format, and none of the fast paths; so that it resumes bit-exactly (tested against
    the code that made tests/data/compat/run)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise MepfError(f"the run's options.json says --precision {precision!r} but records no plan; the run "
                        "folder is damaged")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16:
        return Precision("bf16", "bf16", True, False, "matmul")
    return Precision("fp32", "fp32", False, False, "matmul")
