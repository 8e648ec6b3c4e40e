"""Speed of DPImageBench's three classifiers (their training step: batch 256, Adam, the weight EMA), per way of
running them: what a full protocol run costs on a machine, and what cudnn autotuning or bf16 would save.
Prints ms per step and the implied minutes for 50 epochs of 55,000 images; asserts nothing.

    .venv/bin/python benchmarks/bench_classifier_speed.py --device cuda [--steps 20 --kinds resnet,wrn,resnext]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from mepf.core.device import resolve_device
from mepf.evaluate.bench_protocol import BenchSchedule, WeightEMA, optimiser
from mepf.evaluate.benchnets import bench_classifier

MODES = {  # name: (cudnn.benchmark, bf16 autocast, channels-last)
    "fp32 (the protocol as run)": (False, False, False),
    "fp32 + cudnn autotune": (True, False, False),
    "bf16 autocast + channels-last + autotune": (True, True, True),
}


def step_ms(kind: str, device, steps: int, bench: bool, bf16: bool, cl: bool) -> float:
    torch.backends.cudnn.benchmark = bench
    torch.manual_seed(0)
    model = bench_classifier(kind, 1, 28, 10).to(device)
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt, _ = optimiser(model, BenchSchedule())
    ema = WeightEMA(model.parameters(), 0.9999)
    x = torch.randn(256, 1, 28, 28, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (256,), device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def one():
        with ctx():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model.parameters())

    for _ in range(5):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kinds", default="resnet,wrn,resnext")
    a = ap.parse_args()
    device = resolve_device(a.device)
    per_run = 50 * -(-55000 // 256)
    print(f"device {device}, torch {torch.__version__}; a protocol run is {per_run} steps per classifier")
    for kind in a.kinds.split(","):
        for name, (bench, bf16, cl) in MODES.items():
            ms = step_ms(kind, device, a.steps, bench, bf16, cl)
            print(f"{kind:8s} {name:42s} {ms:8.1f} ms/step  {ms * per_run / 60000:7.1f} min for 50 epochs",
                  flush=True)


if __name__ == "__main__":
    main()
