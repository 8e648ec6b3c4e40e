"""Where a generator falls short, layer by layer: per layer of the release's feature map, how far the class means
of phi1 of its samples are from the release's (what training minimises) and from a public reference's, and
the within-class spread of its samples against the reference's; then the spread of brightness, contrast and
ink area in pixels. A diagnostic for choosing stage-2 levers (docs/results.md), not a metric of the product.

    python benchmarks/layer_fit.py docs/results/generators/r3-55k-lite0-conv64-32k-cooldown-eps10-seed0 \
        fashion-mnist:test -n 5000                      # the backbone's default map at the generator's size
    python benchmarks/layer_fit.py bench/proxy/run-p55-base-s0 fashion-mnist:test --release bench/p55/release-eps10.h5
"""
import argparse

import numpy as np
import torch

from mepf.artifacts import load
from mepf.core.features import build_feature_map, feature_map_from_spec
from mepf.evaluate.data import load_reference
from mepf.synthesize import load_generator
from mepf.synthesize.objective import Target


def phi1_rows(fmap, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """phi1 (float64) of uint8 (N, H, W, C) images."""
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float() / 255
            out.append(fmap.phi_of("S1", fmap(x), torch.float64))
    return torch.cat(out)


def per_class(rows: torch.Tensor, labels: np.ndarray, k: int):
    """(class means (K, D), mean squared distance of each row to its class mean, per coordinate (K, D))."""
    y = torch.from_numpy(labels.astype(np.int64))
    means = torch.stack([rows[y == c].mean(0) for c in range(k)])
    var = torch.stack([((rows[y == c] - means[c]) ** 2).mean(0) for c in range(k)])
    return means, var


def pixel_spreads(images: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """Per class, the std over images of brightness, contrast and ink area (share of pixels above 0.1)."""
    a = images.astype(np.float64).mean(3) / 255
    stats = {"brightness": a.mean((1, 2)), "contrast": a.std((1, 2)), "ink area": (a > 0.1).mean((1, 2))}
    return {name: np.array([v[labels == c].std() for c in range(k)]) for name, v in stats.items()}


def _num(v: float, width: int) -> str:
    """v in a column of `width`, or '-' where there is no value (no --release)."""
    return f"{'-':>{width}s}" if v != v else f"{v:{width}.6f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generator", help="generator.pt or its run folder")
    ap.add_argument("reference", help="public labelled images: a named split, folder or .npz")
    ap.add_argument("--release", help="the release it was trained on: its feature map, and the distance to it")
    ap.add_argument("--backbone", default="efficientnet-lite0", help="without --release: this backbone's default map")
    ap.add_argument("-n", type=int, default=5000, help="samples, and at most this many reference images")
    a = ap.parse_args()
    g = load_generator(a.generator)
    size, channels, k = g.arch["image_size"], g.arch["channels"], g.arch["num_classes"]
    target = None
    if a.release:
        release = load(a.release)
        if g.info["release_sha256"] != release.file_sha256:
            raise SystemExit(f"{a.generator} was not trained on {a.release} (release SHA-256 differs)")
        fmap = feature_map_from_spec(release.features)
        target = Target(release, "cpu").means["S1"].double()
    else:
        fmap, _ = build_feature_map(a.backbone, image_size=(size, size), channels=channels)
    ref = load_reference(a.reference, geometry=(size, size, channels))
    rx, ry = ref.images[:a.n], ref.labels[:a.n]
    sx, sy = g.sample(a.n, seed=0)
    (mr, vr), (ms, vs) = per_class(phi1_rows(fmap, rx), ry, k), per_class(phi1_rows(fmap, sx), sy, k)
    print(f"{len(sx)} samples, {len(rx)} reference images; per layer, sums over its coordinates, means over classes")
    print(f"{'layer':9s} {'D':>6s} {'|mu_ref|^2':>10s} {'to release':>10s} {'to ref':>9s} {'rel':>6s} "
          f"{'spread s/r':>10s}")
    start = 0
    for name, d in fmap.layer_dims(size, size).items():
        sl = slice(start, start + d)
        start += d
        norm2 = float((mr[:, sl] ** 2).sum(1).mean())
        to_rel = float("nan") if target is None else float(((target[:, sl] - ms[:, sl]) ** 2).sum(1).mean())
        to_ref = float(((mr[:, sl] - ms[:, sl]) ** 2).sum(1).mean())
        spread = float(vs[:, sl].sum(1).mean() / vr[:, sl].sum(1).mean())
        print(f"{name:9s} {d:6d} {norm2:10.5f} {_num(to_rel, 10)} {to_ref:9.6f} {to_ref / norm2:6.3f} {spread:10.3f}")
    to_rel = float("nan") if target is None else float(((target - ms) ** 2).sum(1).mean())
    print(f"{'all':9s} {start:6d} {float((mr ** 2).sum(1).mean()):10.5f} {_num(to_rel, 10)} "
          f"{float(((mr - ms) ** 2).sum(1).mean()):9.6f}")
    print("pixel spreads, samples / reference, per class:")
    ps, pr = pixel_spreads(sx, sy, k), pixel_spreads(rx, ry, k)
    for name in ps:
        ratios = ps[name] / np.maximum(pr[name], 1e-12)
        print(f"  {name:10s} " + " ".join(f"{r:.2f}" for r in ratios) + f"   mean {ratios.mean():.2f}")


if __name__ == "__main__":
    main()
