"""The change of every pre-noise release between adversarial neighbouring datasets never exceeds the
sensitivity that the ledger declares. Runs the real accumulation path on real .npz files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mepf.artifacts.ledger import sensitivity
from mepf.embed.features import build_feature_map, normalise, phi1, phi2
from mepf.embed.release import accumulate
from mepf.embed.sources import ArraySource
from mepf.embed.transform import Transform
from tests.conftest import make_images

K = 3
RNG = np.random.default_rng(7)
ADVERSARIAL = {
    "zero": np.zeros((28, 28, 1), np.uint8),
    "max": np.full((28, 28, 1), 255, np.uint8),
    "constant": np.full((28, 28, 1), 128, np.uint8),
    "noise": RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8),
    "one-pixel": np.pad(np.full((1, 1, 1), 255, np.uint8), ((13, 14), (13, 14), (0, 0))),
    "checker": ((np.indices((28, 28)).sum(0) % 2) * 255).astype(np.uint8)[:, :, None],
}
BACKBONES = [("efficientnet-lite0", "pretrained"), ("vgg19", "random"), ("resnet18", "random"),
             ("efficientnet-lite0+pixels", "pretrained")]  # raw pixels weighted far above the network's layers


def sums_of(tmp_path, x, y, extractor, c1, c2, tag):
    path = tmp_path / f"{tag}.npz"
    np.savez(path, images=x, labels=y)
    src = ArraySource(path, [str(i) for i in range(K)])
    s = accumulate(src, Transform((28, 28), 1), extractor, "mean+second", c1, c2, batch_size=4, progress=False)
    return {**s.sums, "counts": s.counts.astype(np.float64)}


def change(a, b):
    return {n: float(np.linalg.norm(a[n] - b[n])) for n in a}


@pytest.fixture(scope="module", params=BACKBONES, ids=[b for b, _ in BACKBONES])
def extractor(request):
    backbone, weights = request.param
    if backbone.endswith("+pixels"):
        ex, _ = build_feature_map(backbone.removesuffix("+pixels"), weights, ["pixels", "stem", "block0"],
                                  image_size=(28, 28), channels=1, pixel_weight=1e4)
        return ex
    ex, _ = build_feature_map(backbone, weights, image_size=(28, 28), channels=1)
    return ex


@pytest.mark.parametrize("c1,c2", [(1.0, 1.0), (3.0, 0.5)])
def test_add_remove_one_record(tmp_path, extractor, c1, c2):
    x = make_images(9, seed=3)
    y = np.arange(9) % K
    base = sums_of(tmp_path, x, y, extractor, c1, c2, "base")
    for name, rec in ADVERSARIAL.items():
        for label in (0, K - 1):
            plus = sums_of(tmp_path, np.concatenate([x, rec[None]]), np.append(y, label), extractor, c1, c2, name)
            for release, delta in change(plus, base).items():
                bound = sensitivity("add-remove", release, c1, c2)[0]
                assert delta <= bound, (name, label, release, delta, bound)
            # the added record moved exactly its own class's row
            assert plus["counts"][label] == base["counts"][label] + 1


def test_replace_one_with_class_flip(tmp_path, extractor):
    x = make_images(9, seed=4)
    y = np.arange(9) % K
    base = sums_of(tmp_path, x, y, extractor, 1.0, 1.0, "base")
    for name, rec in ADVERSARIAL.items():
        for new_label in (y[0], (y[0] + 1) % K):
            x2, y2 = x.copy(), y.copy()
            x2[0], y2[0] = rec, new_label
            other = sums_of(tmp_path, x2, y2, extractor, 1.0, 1.0, name)
            for release, delta in change(other, base).items():
                bound = sensitivity("replace-one", release, 1.0, 1.0)[0]
                assert delta <= bound, (name, new_label, release, delta, bound)


@pytest.mark.parametrize("scale", [0.0, 1e-300, 1e-30, 1.0, 1e30, 1e150])
def test_normalisation_never_exceeds_c(scale):
    f = torch.randn(64, 1000, dtype=torch.float64) * scale
    f[0] = 0
    f[1] = scale  # constant row
    for c in (1.0, 0.37, 12.0):
        for phi in (phi1, phi2):
            norms = phi(f, c).norm(dim=1)
            assert bool((norms <= c).all()), (phi.__name__, scale, c, norms.max().item())
            if 1e-30 <= scale <= 1e30 and phi is phi1:  # outside, float64 norms under/overflow to a zero row
                assert bool((norms[1:] >= c * (1 - 1e-5)).all())
    assert normalise(torch.zeros(3, 5), 1.0).abs().sum() == 0


def test_quantised_record_stays_below_c():
    from mepf.embed.features import dequantise, quantise

    for dim in (10, 16432, 1_212_416):
        f = torch.rand(3, dim, dtype=torch.float64)
        for c in (1.0, 0.01, 50.0):
            q = dequantise(quantise(phi1(f, c), c), c)
            assert bool((q.norm(dim=1) <= c).all())
            assert torch.allclose(q, phi1(f, c), atol=c * 2.0 ** -32)


def test_phi2_is_not_square_of_phi1():
    f = torch.rand(4, 50, dtype=torch.float64) + 0.1
    p2 = phi2(f, 1.0)
    assert torch.allclose(p2, normalise(f * f, 1.0))
    assert not torch.allclose(p2, phi1(f, 1.0) ** 2)
