"""Stage-2 speed: generator training steps/s against the bare extractor forward+backward at the same
batch size, in one run. Prints figures, asserts nothing.

    .venv/bin/python benchmarks/synthesize_speed.py RELEASE.h5 [--batch-size 100 --steps 20]

Without RELEASE.h5 it first embeds mnist-5k:train (efficientnet-lite0, eps=10) into a temporary file.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mepf.core.memory import keep_freed_memory
from mepf.synthesize.train import Trainer, TrainOptions, prepare


def make_release(tmp: Path) -> Path:
    from mepf.embed.run import EmbedOptions, run_embed

    run_embed(EmbedOptions(data="mnist-5k:train", out=str(tmp / "r.h5"), epsilon=10, delta=1e-5,
                           release_log=str(tmp / "log.jsonl")), progress=False)
    return tmp / "r.h5"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("release", nargs="?")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    release = a.release or str(make_release(tmp))
    opts = TrainOptions(release=release, out=str(tmp / "run"), batch_size=a.batch_size, width=a.width,
                        device=a.device)
    rel, ex, arch, dev = prepare(opts)
    t = Trainer(opts, rel, ex, arch, dev)
    spec = rel.features

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    keep_freed_memory()  # as Trainer.fit does; before both measurements, so that they compare
    x = torch.rand(a.batch_size, spec.channels, spec.height, spec.width, device=dev, requires_grad=True)
    for _ in range(2):  # warm-up
        t.train_step()
        t.fmap(x).sum().backward()
    sync()
    s = time.perf_counter()
    for _ in range(a.steps):
        t.fmap(x).sum().backward()
    sync()
    bare = a.steps / (time.perf_counter() - s)
    s = time.perf_counter()
    for _ in range(a.steps):
        t.train_step()
    sync()
    full = a.steps / (time.perf_counter() - s)
    print(f"{spec.backbone} D={spec.dim}, generator {arch['name']} width "
          f"{arch['width']}, "
          f"batch {a.batch_size}, device {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"bare extractor forward+backward : {bare:7.2f} it/s")
    print(f"full generator training step    : {full:7.2f} steps/s  ({full / bare:.2f} x bare)")


if __name__ == "__main__":
    main()
