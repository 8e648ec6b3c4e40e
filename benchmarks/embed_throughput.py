"""Embed throughput and memory: prints figures, asserts nothing.

1. images/s of the full release path (read, transform, extract, normalise, quantise, accumulate, noise,
   write) against the bare extractor forward on the same batches, in one run;
2. peak resident memory of a whole `mepf embed` process for two dataset sizes (should be flat in n).

    .venv/bin/python benchmarks/embed_throughput.py [--backbone vgg19 --weights random --image-size 32]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mepf.embed.device import resolve_device
from mepf.embed.features import build_feature_map
from mepf.embed.files import ArraySource
from mepf.embed.release import embed_to_file
from mepf.embed.transform import Transform


def make_npz(path: Path, n: int, size: int, channels: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    np.savez(path, images=x, labels=rng.integers(0, 10, n))


PEAK = ("import resource, sys\nfrom mepf.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def peak_mb(cli_args: list) -> float:
    """Peak RSS of a fresh process running `mepf CLI_ARGS` (each run measured on its own)."""
    p = subprocess.run([sys.executable, "-c", PEAK, *cli_args], check=True, capture_output=True, text=True)
    return int(p.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--weights", default="pretrained")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memory-sizes", default="1000,8000")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    size = (a.image_size, a.image_size)
    ex, spec = build_feature_map(a.backbone, a.weights, image_size=size, channels=a.channels)
    ex = ex.to(dev)
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data.npz"
    make_npz(data, a.n, a.image_size, a.channels)
    src = ArraySource(data, [str(i) for i in range(10)])
    tf = Transform(size, a.channels)
    batches = [tf(x) for x, _ in src.batches(a.batch_size)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():  # warm-up
        ex(batches[0].to(dev))
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            ex(x.to(dev))
    sync()
    bare = a.n / (time.perf_counter() - t)
    t = time.perf_counter()
    embed_to_file(src, tf, ex, spec, out=tmp / "r.h5", epsilon=10, delta=1e-5, batch_size=a.batch_size, device=dev,
                  release_log_path=tmp / "log.jsonl", progress=False, force=True)
    sync()
    full = a.n / (time.perf_counter() - t)
    print(f"backbone {a.backbone} ({a.weights}), {a.image_size}x{a.image_size}x{a.channels}, D={spec['dim']}, "
          f"batch {a.batch_size}, device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"bare extractor forward : {bare:8.1f} img/s")
    print(f"full embed path        : {full:8.1f} img/s  ({full / bare:.2f} x bare)")
    for n in (int(s) for s in a.memory_sizes.split(",") if s.strip()):
        path = tmp / f"m{n}.npz"
        make_npz(path, n, a.image_size, a.channels)
        peak = peak_mb(["embed", "--data", str(path), "--classes", "10",
                              "--backbone", a.backbone, "--weights", a.weights, "--out", str(tmp / f"m{n}.h5"),
                              "--epsilon", "10", "--delta", "1e-5", "--force", "--quiet", "--device", str(dev.type),
                              "--batch-size", str(a.batch_size), "--release-log", str(tmp / f"log{n}.jsonl")])
        print(f"peak RSS, n={n:6d}      : {peak:8.0f} MB (whole process, incl. torch; data file "
              f"{path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
