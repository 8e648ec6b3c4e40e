"""Sensitivity is a property of the code: adding one record anywhere changes the exact pre-noise sums by
exactly that record's own grid row (computed alone), whose norm is below C, whatever the record, its
position (so every later record changes batch position), the batch size or the backbone. Runs the real
accumulation path on real .npz files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mepf.artifacts.ledger import sensitivity
from mepf.core.features import QUANT_BITS, build_feature_map, grid_rows, normalise, phi1, phi2
from mepf.embed.files import ArraySource
from mepf.embed.release import accumulate
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
             ("resnet50", "random"), ("efficientnet-lite2", "pretrained"),
             ("efficientnet-lite0+pixels", "pretrained")]  # raw pixels weighted far above the network's layers
BATCH = 4


def exact_sums(tmp_path, x, y, extractor, c1=1.0, c2=1.0, batch_size=BATCH, tag="d", device="cpu"):
    """Exact integer sums and counts of the real accumulation path over an .npz of (x, y)."""
    path = tmp_path / f"{tag}.npz"
    np.savez(path, images=x, labels=y)
    s = accumulate(ArraySource(path, [str(i) for i in range(K)]), Transform((28, 28), 1), extractor,
                   "mean+second", c1, c2, batch_size=batch_size, device=device, progress=False)
    return {**{n: q.numpy() for n, q in s.qsums.items()}, "counts": s.counts}


def own_rows(record, extractor, c1=1.0, c2=1.0, batch_size=BATCH, device="cpu"):
    """The record's grid rows computed alone (in a batch of its own, padded as stage 1 pads; on CUDA the
    rows of the whole padded batch are computed together, as stage 1 does there)."""
    x = Transform((28, 28), 1)(record[None])
    x = torch.cat([x, x.new_zeros((batch_size - 1, *x.shape[1:]))]).to(device)
    from mepf.embed.release import deterministic_kernels

    with torch.no_grad(), deterministic_kernels(torch.device(device)):
        f = extractor.to(device)(x)
        if device == "cpu":
            f = f[:1]
        return {"S1": grid_rows(f)[0].cpu().numpy(), "S2": grid_rows(f, second=True)[0].cpu().numpy()}


def assert_adds_exactly(base, plus, rows, label, c1, c2):
    for name, c in (("S1", c1), ("S2", c2)):
        diff = plus[name] - base[name]
        expected = np.zeros_like(diff)
        expected[label] = rows[name].astype(np.int64)
        np.testing.assert_array_equal(diff, expected, err_msg=f"{name}: another record's contribution changed")
        norm = math.sqrt(float((diff.astype(np.float64) ** 2).sum())) * c / 2.0 ** QUANT_BITS
        assert norm <= sensitivity("add-remove", name, c1, c2)[0]
    d = plus["counts"] - base["counts"]
    assert d[label] == 1 and np.abs(d).sum() == 1


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
def test_insertion_at_start_middle_end_adds_exactly_the_records_own_row(tmp_path, extractor, c1, c2):
    x = make_images(11, seed=3)  # 3 batches of 4; an insertion moves every later record
    y = np.arange(11) % K
    base = exact_sums(tmp_path, x, y, extractor, c1, c2)
    for _name, rec in ADVERSARIAL.items():
        rows = own_rows(rec, extractor, c1, c2)
        for pos, label in ((0, 0), (5, K - 1), (11, 1)):
            plus = exact_sums(tmp_path, np.insert(x, pos, rec, axis=0), np.insert(y, pos, label), extractor, c1, c2)
            assert_adds_exactly(base, plus, rows, label, c1, c2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("backbone,weights", [("vgg19", "random"), ("resnet50", "random"),
                                              ("efficientnet-lite0", "pretrained")])
def test_insertion_anywhere_under_cuda_kernels(tmp_path, backbone, weights):
    ex, _ = build_feature_map(backbone, weights, image_size=(28, 28), channels=1)
    x = make_images(11, seed=3)
    y = np.arange(11) % K
    base = exact_sums(tmp_path, x, y, ex, device="cuda")
    for _name, rec in ADVERSARIAL.items():
        rows = own_rows(rec, ex, device="cuda")
        for pos in range(0, 12, 3):
            plus = exact_sums(tmp_path, np.insert(x, pos, rec, axis=0), np.insert(y, pos, 1), ex, device="cuda")
            assert_adds_exactly(base, plus, rows, 1, 1.0, 1.0)


def test_replace_one_with_class_flip(tmp_path, extractor):
    x = make_images(9, seed=4)
    y = np.arange(9) % K
    base = exact_sums(tmp_path, x, y, extractor)
    old = own_rows(x[4], extractor)
    for _name, rec in ADVERSARIAL.items():
        new = own_rows(rec, extractor)
        for new_label in (y[4], (y[4] + 1) % K):
            x2, y2 = x.copy(), y.copy()
            x2[4], y2[4] = rec, new_label
            other = exact_sums(tmp_path, x2, y2, extractor)
            for release in ("S1", "S2"):
                expected = np.zeros_like(base[release])
                expected[new_label] += new[release].astype(np.int64)
                expected[y[4]] -= old[release].astype(np.int64)
                np.testing.assert_array_equal(other[release] - base[release], expected)
                norm = np.linalg.norm((other[release] - base[release]).astype(np.float64)) / 2.0 ** QUANT_BITS
                assert norm <= sensitivity("replace-one", release, 1.0, 1.0)[0]
            dc = np.linalg.norm((other["counts"] - base["counts"]).astype(np.float64))
            assert dc <= sensitivity("replace-one", "counts", 1.0, 1.0)[0]


@pytest.fixture(scope="module")
def tiny_map():
    ex, _ = build_feature_map("efficientnet-lite0", "pretrained", ["pixels", "stem"], image_size=(28, 28),
                              channels=1, pixel_weight=3.0)
    return ex


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 9), batch=st.integers(1, 5), pos=st.floats(0, 1), label=st.integers(0, K - 1),
       seed=st.integers(0, 2 ** 16), kind=st.sampled_from(sorted(ADVERSARIAL) + ["blobs"]))
def test_property_any_dataset_any_position(tmp_path, tiny_map, n, batch, pos, label, seed, kind):
    rng = np.random.default_rng(seed)
    x = make_images(n, seed=seed) if n else np.zeros((0, 28, 28, 1), np.uint8)
    y = rng.integers(0, K, n)
    rec = make_images(1, seed=seed + 1)[0] if kind == "blobs" else ADVERSARIAL[kind]
    at = int(round(pos * n))
    plus = exact_sums(tmp_path, np.insert(x, at, rec, axis=0), np.insert(y, at, label), tiny_map,
                      batch_size=batch, tag="plus")
    if n:
        base = exact_sums(tmp_path, x, y, tiny_map, batch_size=batch, tag="base")
    else:
        base = {k: np.zeros_like(v) for k, v in plus.items()}
    assert_adds_exactly(base, plus, own_rows(rec, tiny_map, batch_size=batch), label, 1.0, 1.0)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_rows_become_zero_and_others_are_untouched(bad):
    f = torch.rand(5, 1000, dtype=torch.float32) + 0.1
    f[1, 17] = bad
    f[3, :] = bad
    for second in (False, True):
        q = grid_rows(f, second)
        assert bool(torch.isfinite(q).all()) and q[1].abs().sum() == 0 and q[3].abs().sum() == 0
        np.testing.assert_array_equal(q[[0, 2, 4]].numpy(), grid_rows(f[[0, 2, 4]], second).numpy())
        assert bool((q.norm(dim=1) <= 2.0 ** QUANT_BITS).all())
    for phi in (phi1, phi2):
        p = phi(f, 1.0)
        assert bool(torch.isfinite(p).all()) and p[1].abs().sum() == 0 and p[3].abs().sum() == 0


def test_huge_finite_rows_keep_their_direction():
    f = torch.rand(3, 500, dtype=torch.float32) * 3e38  # f*f overflows float32 and float64 norms of it would not
    for second in (False, True):
        q = grid_rows(f, second).double() / 2.0 ** QUANT_BITS
        assert bool((q.norm(dim=1) > 0.999).all()) and bool((q.norm(dim=1) <= 1.0).all())
    np.testing.assert_allclose(phi2(f, 1.0).numpy(), phi2(f / 1e30, 1.0).numpy(), rtol=1e-6,
                               atol=1e-9)  # f/1e30 rounds in float32


@pytest.mark.parametrize("scale", [0.0, 1e-300, 1e-30, 1.0, 1e30, 1e150])
def test_normalisation_never_exceeds_c(scale):
    f = torch.randn(64, 1000, dtype=torch.float64) * scale
    f[0] = 0
    f[1] = scale  # constant row
    for c in (1.0, 0.37, 12.0):
        for phi in (phi1, phi2):
            norms = phi(f, c).norm(dim=1)
            assert bool((norms <= c).all()), (phi.__name__, scale, c, norms.max().item())
            if 1e-30 <= scale <= 1e30:  # outside, float64 norms under/overflow to a zero row
                assert bool((norms[1:] >= c * (1 - 1e-5)).all())
    assert normalise(torch.zeros(3, 5), 1.0).abs().sum() == 0


def test_grid_rows_stay_below_c_and_close_to_phi():
    for dim in (10, 16432, 1_212_416):
        f = torch.rand(3, dim, dtype=torch.float32)
        for second, phi in ((False, phi1), (True, phi2)):
            q = grid_rows(f, second) / 2.0 ** QUANT_BITS
            assert bool((q.norm(dim=1) <= 1.0).all())
            assert torch.allclose(q, phi(f, 1.0), atol=2.0 ** -32)


def test_rows_over_the_bound_are_refused_by_the_integer_check():
    from mepf.core.features import within_bound

    q = torch.zeros(3, 4, dtype=torch.float64)
    q[0, 0] = 2.0 ** QUANT_BITS * (1 - 2.0 ** -20)  # the largest norm a correct row can have
    q[1, 0] = 2.0 ** QUANT_BITS  # C itself: not below it
    q[2, :] = 2.0 ** (QUANT_BITS - 1) * 1.0001  # each entry fine, the norm above C
    assert within_bound(q).squeeze(1).tolist() == [True, False, False]
    assert not bool(within_bound(torch.tensor([[math.nan, 0.0]])).item())


def test_phi2_is_not_square_of_phi1():
    f = torch.rand(4, 50, dtype=torch.float64) + 0.1
    p2 = phi2(f, 1.0)
    assert torch.allclose(p2, normalise(f * f, 1.0))
    assert not torch.allclose(p2, phi1(f, 1.0) ** 2)
