"""How well a generator reproduces the spread of image brightness: per class, the mean and standard
deviation of per-image mean intensity of its samples, next to those of a (public) reference .npz.

    python benchmarks/intensity_spread.py bench/proxy/run-dim-base bench/dim/test.npz
"""
import argparse

import numpy as np

from mepf.synthesize import load_generator


def spread(images, labels, k):
    m = images.reshape(len(images), -1).mean(1) / 255
    return np.array([[m[labels == c].mean(), m[labels == c].std()] for c in range(k)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("reference")
    ap.add_argument("-n", type=int, default=5000)
    a = ap.parse_args()
    g = load_generator(a.run)
    k = g.arch["num_classes"]
    x, y = g.sample(a.n, seed=0)
    with np.load(a.reference) as d:
        rx, ry = d["images"], d["labels"]
    s, r = spread(x, y, k), spread(rx, ry, k)
    print("class  synthetic mean +- std   reference mean +- std")
    for c in range(k):
        print(f"{c:5d}  {s[c, 0]:.4f} +- {s[c, 1]:.4f}      {r[c, 0]:.4f} +- {r[c, 1]:.4f}")
    ratio = s[:, 1].mean() / r[:, 1].mean()
    print(f"mean within-class std: synthetic {s[:, 1].mean():.4f}, reference {r[:, 1].mean():.4f} (ratio {ratio:.2f})")


if __name__ == "__main__":
    main()
