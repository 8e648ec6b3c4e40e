"""Do a generator's samples match real images in statistics the release does not hold? Per layer of the feature
map, the class means of each image's channel Gram matrix (A A^T / HW over the layer's C x HW map, scaled to unit
norm per image, as phi scales f) for samples against a public reference, beside the same for the class means of
phi1 (what the release holds), each relative to the reference's size and against the floor of two halves of the
reference. A diagnostic for issue 29's "richer released statistics" lever (docs/results.md), not a metric.

    python benchmarks/gram_fit.py docs/results/generators/r3-55k-lite0-conv64-32k-cooldown-eps10-seed0 \
        fashion-mnist:val-5k -n 5000
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from mepf.core.features import build_feature_map
from mepf.evaluate.data import load_reference
from mepf.synthesize import load_generator


def gram_vector(m: torch.Tensor) -> torch.Tensor:
    """(B, C(C+1)/2): the upper triangle of each image's channel Gram matrix A A^T / HW of a (B, C, H, W) map, at
    unit norm, in the map's dtype."""
    a = m.flatten(2)
    g = a @ a.transpose(1, 2) / a.shape[2]
    iu = torch.triu_indices(g.shape[1], g.shape[1], device=g.device)
    return F.normalize(g[:, iu[0], iu[1]], dim=1)


def class_sums(fmap, images: np.ndarray, labels: np.ndarray, k: int, batch: int = 250) -> tuple:
    """Per layer, the class means of the unit-norm Gram vectors (upper triangle) and of the layer's flattened map
    scaled to unit norm (phi1's layer part, normalised per layer)."""
    grams, firsts = None, None
    y = torch.from_numpy(labels.astype(np.int64))
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float() / 255
            maps = fmap.layer_maps(x)
            yb = y[s:s + batch]
            if grams is None:
                grams = [torch.zeros(k, m.shape[1] * (m.shape[1] + 1) // 2, dtype=torch.float64) for m in maps]
                firsts = [torch.zeros(k, m[0].numel(), dtype=torch.float64) for m in maps]
            for i, m in enumerate(maps):
                gv = gram_vector(m.double())
                f1 = F.normalize(m.double().flatten(1), dim=1)
                grams[i].index_add_(0, yb, gv)
                firsts[i].index_add_(0, yb, f1)
    counts = torch.bincount(y, minlength=k).double()[:, None]
    return [g / counts for g in grams], [f / counts for f in firsts]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over classes of |a - b|^2 / |b|^2."""
    return float((((a - b) ** 2).sum(1) / (b ** 2).sum(1)).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generator", help="generator.pt or its run folder")
    ap.add_argument("reference", help="public labelled images (never the private set): a named split, folder, .npz")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("-n", type=int, default=5000, help="samples, and at most this many reference images")
    ap.add_argument("--z-scale", type=float, default=1.0)
    a = ap.parse_args()
    g = load_generator(a.generator)
    size, channels, k = g.arch["image_size"], g.arch["channels"], g.arch["num_classes"]
    fmap, _ = build_feature_map(a.backbone, image_size=(size, size), channels=channels)
    ref = load_reference(a.reference, geometry=(size, size, channels))
    rx, ry = ref.images[:a.n], ref.labels[:a.n]
    sx, sy = g.sample(len(rx), seed=0, z_scale=a.z_scale)
    half = len(rx) // 2
    gr, fr = class_sums(fmap, rx, ry, k)
    ga, fa = class_sums(fmap, rx[:half], ry[:half], k)
    gb, fb = class_sums(fmap, rx[half:], ry[half:], k)
    gs, fs = class_sums(fmap, sx, sy, k)
    print(f"{len(sx)} samples, {len(rx)} reference images (halves of {half}); relative squared distance of class "
          "means, mean over classes")
    print(f"{'layer':9s} {'Gram s/ref':>10s} {'Gram floor':>10s} {'ratio':>6s} {'phi1 s/ref':>10s} {'phi1 floor':>10s} "
          f"{'ratio':>6s}")
    for name, g_s, g_r, g_a, g_b, f_s, f_r, f_a, f_b in zip(fmap.layers, gs, gr, ga, gb, fs, fr, fa, fb):
        gd, gf, fd, ff = rel(g_s, g_r), rel(g_a, g_b) / 2, rel(f_s, f_r), rel(f_a, f_b) / 2
        print(f"{name:9s} {gd:10.5f} {gf:10.5f} {gd / gf:6.1f} {fd:10.5f} {ff:10.5f} {fd / ff:6.1f}")


if __name__ == "__main__":
    main()
