"""A public proxy with varied brightness: mnist-5k's splits with each image's intensity scaled by a
factor drawn uniformly from [LOW, 1] (seeded). MNIST strokes are all near white, unlike garments; this
proxy asks whether a feature map lets the generator reproduce a spread of intensities.

    python benchmarks/intensity_proxy.py bench/dim     # writes train.npz and test.npz there
"""
import argparse
from pathlib import Path

import numpy as np

from mepf.embed.sources import open_source
from mepf.evaluate.data import read_source


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--low", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    for split in ("train", "test"):
        s = read_source(open_source(f"mnist-5k:{split}"))
        f = rng.uniform(a.low, 1.0, size=(len(s.images), 1, 1, 1))
        x = np.round(s.images.astype(np.float64) * f).astype(np.uint8)
        np.savez(a.out / f"{split}.npz", images=x, labels=s.labels)
        m = x.reshape(len(x), -1).mean(1) / 255
        print(f"{split}: {len(x)} images, per-image mean intensity {m.mean():.4f} +- {m.std():.4f}")


if __name__ == "__main__":
    main()
