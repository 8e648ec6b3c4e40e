"""The fused phi1/phi2 of training (phi_fused, FeatureMap.embed) against the reference phi1/phi2 in float64:
values and gradients, rows with inf, NaN, zeros, huge and tiny entries, and each moment alone."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mepf.core.features import norm_target, phi1, phi2, phi_fused


def reference(f: torch.Tensor, c1, c2, g1, g2):
    """Values and input gradient of <g1, phi1> + <g2, phi2> by autograd through today's float64 phi1/phi2."""
    x = f.detach().double().requires_grad_(True)
    p1, p2 = phi1(x, c1), phi2(x, c2)
    (p1 * g1.double()).sum().add((p2 * g2.double()).sum()).backward()
    return p1.detach(), p2.detach(), x.grad


def fused(f: torch.Tensor, c1, c2, g1, g2):
    x = f.detach().clone().requires_grad_(True)
    p1, p2 = phi_fused(x, c1, c2)
    (p1 * g1).sum().add((p2 * g2).sum()).backward()
    return p1.detach(), p2.detach(), x.grad


def hostile_rows(dtype, d=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(9, d, generator=g, dtype=torch.float64)
    f[1] = 0  # zero row
    f[2, 5] = math.inf
    f[3, 7] = math.nan
    f[4, :] = -math.inf
    f[5] *= 1e30 if dtype == torch.float64 else 1e18  # huge: f*f overflows float32 without the max|f| scaling
    f[6] *= 1e-30 if dtype == torch.float64 else 1e-18
    f[7] = 2.5  # constant row
    f[8, 0], f[8, 1:] = 1.0, 0.0  # one non-zero entry
    return f.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_match_the_reference(dtype):
    f = hostile_rows(dtype)
    g1, g2 = torch.randn(2, *f.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    c1, c2 = 1.0, 0.37
    r1, r2, rg = reference(f, c1, c2, g1, g2)
    p1, p2, pg = fused(f, c1, c2, g1, g2)
    assert p1.dtype == p2.dtype == pg.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(p1.double(), r1, **tol)
    torch.testing.assert_close(p2.double(), r2, **tol)
    good = [0, 5, 6, 7, 8]
    scale = rg[good].abs().amax(dim=1, keepdim=True)  # the gradient scales as 1/|f|: compare row-relative
    torch.testing.assert_close(pg[good].double() / scale, rg[good] / scale, **tol)
    for bad in (1, 2, 3, 4):  # zero and non-finite rows: zeros as the reference's, with a zero gradient
        assert p1[bad].abs().sum() == 0 and p2[bad].abs().sum() == 0 and pg[bad].abs().sum() == 0
        assert r1[bad].abs().sum() == 0 and r2[bad].abs().sum() == 0
    assert bool(torch.isfinite(pg).all())
    # the reference's autograd gives a non-finite row a NaN gradient (inf/inf in the norm's backward), which
    # would poison every weight of the generator: the fused backward is the rule's own derivative, zero
    assert not bool(torch.isfinite(rg[[2, 3, 4]]).all())


def test_norms_stay_below_c():
    f = hostile_rows(torch.float32)
    for c in (1.0, 12.0):
        p1, p2 = phi_fused(f, c, c)
        assert bool((p1.norm(dim=1) <= c).all()) and bool((p2.norm(dim=1) <= c).all())
        ok = [0, 5, 6, 7, 8]
        assert bool((p1[ok].double().norm(dim=1) >= norm_target(c, f.shape[1]) * (1 - 1e-5)).all())


def test_each_moment_alone_equals_its_share_of_the_pair():
    f = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    both = phi_fused(f, 1.0, 2.0)
    only1, none2 = phi_fused(f, 1.0, None)
    none1, only2 = phi_fused(f, None, 2.0)
    assert none1 is None and none2 is None
    torch.testing.assert_close(only1, both[0], rtol=0, atol=0)
    torch.testing.assert_close(only2, both[1], rtol=0, atol=0)
    g = torch.randn(4, 50, dtype=torch.float64)
    (ga,) = torch.autograd.grad((only2 * g).sum(), f)
    (gb,) = torch.autograd.grad((phi2(f, 2.0) * g).sum(), f)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)


def test_gradcheck_in_float64():
    f = (torch.rand(3, 20, dtype=torch.float64) + 0.1) * torch.tensor([1.0, -1.0] * 10, dtype=torch.float64)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: phi_fused(x, 1.0, 0.5), (f,))
    assert torch.autograd.gradcheck(lambda x: phi_fused(x, 1.0, None)[0], (f,))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), dim=st.integers(1, 40), seed=st.integers(0, 2 ** 31),
       log_scale=st.floats(-20, 20), c=st.floats(0.01, 100))
def test_property_matches_reference(rows, dim, seed, log_scale, c):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, dim, generator=gen, dtype=torch.float64) * 10.0 ** log_scale
    g1, g2 = torch.randn(2, rows, dim, generator=gen, dtype=torch.float64)
    r1, r2, rg = reference(f, c, 2 * c, g1, g2)
    p1, p2, pg = fused(f, c, 2 * c, g1, g2)
    torch.testing.assert_close(p1, r1, rtol=1e-10, atol=1e-12 * c)
    torch.testing.assert_close(p2, r2, rtol=1e-10, atol=1e-12 * c)
    # the gradient's natural size per row: C |g| / ||f|| (phi is scale-free); where the true gradient is 0
    # (dim 1, a constant row for phi2) both sides are rounding noise of that size
    scale = 4 * c * torch.cat([g1, g2], dim=1).abs().amax(dim=1, keepdim=True) / f.norm(dim=1, keepdim=True)
    torch.testing.assert_close(pg / scale, rg / scale, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_folded_padding_is_the_same_map(size, channels):
    """Stage 2's EfficientNet without the padding copies: same features and input gradients as stage 1's map."""
    import copy

    from mepf.core.features import build_feature_map, fold_same_padding

    fmap, _ = build_feature_map("efficientnet-lite0", "pretrained", image_size=(size, size), channels=channels)
    folded = copy.deepcopy(fmap)
    assert fold_same_padding(folded) >= 10 and fold_same_padding(folded) == 0  # idempotent
    x = torch.rand(6, channels, size, size, generator=torch.Generator().manual_seed(0))
    for fmt in (torch.contiguous_format, torch.channels_last):
        a, b = (x.clone().contiguous(memory_format=fmt).requires_grad_(True) for _ in range(2))
        fa, fb = fmap.to(memory_format=fmt)(a), folded.to(memory_format=fmt)(b)
        torch.testing.assert_close(fb, fa, rtol=1e-5, atol=1e-5 * float(fa.detach().abs().max()))
        g = torch.randn(fa.shape, generator=torch.Generator().manual_seed(1))
        (fa * g).sum().backward()
        (fb * g).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5 * float(a.grad.abs().max()))


def test_embed_gives_each_moment_asked_for():
    from mepf.core.features import build_feature_map

    fmap, _ = build_feature_map("resnet18", "random", layers=["pixels", "stem"], image_size=(16, 16), channels=1,
                                c1=1.0, c2=3.0)
    x = torch.rand(4, 1, 16, 16)
    f = fmap(x)
    both = fmap.embed(x, ("S1", "S2"))
    for moments in (("S1",), ("S2",), ("S2", "S1")):
        out = fmap.embed(x, moments)
        assert tuple(out) == moments
        for m in moments:
            torch.testing.assert_close(out[m], both[m], rtol=0, atol=0)
    torch.testing.assert_close(both["S1"], phi1(f, 1.0, torch.float32))
    torch.testing.assert_close(both["S2"], phi2(f, 3.0, torch.float32))


def test_extreme_float32_rows_keep_finite_gradients_and_phi2():
    """Rows a saturated sigmoid or an overflowing layer can give in float32: max|f| of 1e-21 (m*m underflows) and
    entries of 1e20 (||f|| overflows, so phi1 refuses the row, but (f/max|f|)^2 has a usable norm). phi2 and its
    gradient match the reference there; phi1 is zero exactly where float32 phi1 is."""
    g = torch.Generator().manual_seed(3)
    f = torch.rand(4, 200, generator=g) + 0.1
    f[0] *= 1e-21
    f[1] *= 1e20
    f[2] *= 1e-22
    g1, g2 = torch.randn(2, 4, 200, generator=g)
    p1, p2, pg = fused(f, 1.0, 2.0, g1, g2)
    assert bool(torch.isfinite(pg).all())
    torch.testing.assert_close(p2, phi2(f, 2.0, torch.float32), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(p1, phi1(f, 1.0, torch.float32), rtol=2e-5, atol=1e-7)
    assert p1[1].abs().sum() == 0 and p2[1].abs().sum() > 0
    x = f.double().requires_grad_(True)  # the phi2 part of the gradient, in float64, where no norm overflows
    (phi2(x, 2.0) * g2.double()).sum().backward()
    for row in (1,):
        torch.testing.assert_close(pg[row].double(), x.grad[row], rtol=1e-4, atol=1e-4 * float(x.grad[row].abs().max()))
    # at 1e-21 and below f*f is subnormal in float32, so phi1 itself is only as good as float32 makes it; there
    # autograd through the float32 phi1 (the old training path) overflowed to inf, which would poison every
    # weight, while the fused gradient stays finite. A normal row matches the float64 reference.
    y = f.clone().requires_grad_(True)
    (phi1(y, 1.0, torch.float32) * g1).sum().backward()
    assert not bool(torch.isfinite(y.grad[[0, 2]]).all())
    _, _, full = reference(f, 1.0, 2.0, g1, g2)
    torch.testing.assert_close(pg[3].double(), full[3], rtol=1e-4, atol=1e-4 * float(full[3].abs().max()))
