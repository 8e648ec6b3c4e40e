"""The fused phi1/phi2 of training (phi_fused, FeatureMap.embed) and the fused per-class sums of phi
(phi_class_sums, FeatureMap.class_sums) against the reference phi1/phi2 in float64: values and gradients, rows
with inf, NaN, zeros, huge and tiny entries, and each moment alone."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mepf.core.features import norm_target, phi1, phi2, phi_class_sums, phi_fused


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


@pytest.mark.parametrize("size,channels,backbone", [(28, 1, "efficientnet-lite0"), (32, 3, "efficientnet-lite0"),
                                                   (28, 1, "efficientnet-lite2")])
def test_folded_padding_is_the_same_map(size, channels, backbone):
    """Stage 2's EfficientNet without the padding copies: same features and input gradients as stage 1's map."""
    import copy

    from mepf.core.features import build_feature_map, fold_same_padding

    fmap, _ = build_feature_map(backbone, "pretrained", image_size=(size, size), channels=channels)
    folded = copy.deepcopy(fmap)
    assert fold_same_padding(folded) >= 10 and fold_same_padding(folded) == 0  # idempotent
    x = torch.rand(6, channels, size, size, generator=torch.Generator().manual_seed(0))
    _assert_same_map(folded, fmap, x, tol=1e-5)


def _assert_same_map(folded, fmap, x, tol: float):
    """folded(x) equals fmap(x), and so do their input gradients under a random weighting of the features, within
    `tol` relative to the largest value, in both memory formats."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        a, b = (x.clone().contiguous(memory_format=fmt).requires_grad_(True) for _ in range(2))
        fa, fb = fmap.to(memory_format=fmt)(a), folded.to(memory_format=fmt)(b)
        torch.testing.assert_close(fb, fa, rtol=tol, atol=tol * float(fa.detach().abs().max()))
        w = torch.randn(fa.shape, generator=torch.Generator().manual_seed(1), dtype=fa.dtype)
        (fa * w).sum().backward()
        (fb * w).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=tol, atol=tol * float(a.grad.abs().max()))


@pytest.mark.parametrize("backbone,weights,size,channels", [
    ("efficientnet-lite0", "pretrained", 28, 1), ("efficientnet-lite1", "pretrained", 32, 3),
    ("resnet18", "random", 32, 3), ("resnet50", "random", 32, 1), ("vgg19", "random", 32, 3)])
def test_folded_batch_norm_is_the_same_map(backbone, weights, size, channels):
    """Stage 2's extractor with every batch norm folded into the convolution before it: none is left, and the
    features and input gradients equal the map's as built (float64, so the comparison is not float32 rounding;
    random weights get random norm statistics and affine terms, which a fresh BatchNorm2d lacks). VGG19 has
    none to fold."""
    import copy

    from mepf.core.features import build_feature_map, fold_batch_norm, fold_same_padding

    fmap, _ = build_feature_map(backbone, weights, image_size=(size, size), channels=channels)
    g = torch.Generator().manual_seed(0)
    if weights == "random":
        for m in fmap.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.data = torch.randn(t.shape, generator=g) * 0.5
                m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    fmap = fmap.double()
    folded = copy.deepcopy(fmap)
    fold_same_padding(folded)
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fmap.modules())
    assert fold_batch_norm(folded) == bns and (bns > 0) == (backbone != "vgg19")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) and fold_batch_norm(folded) == 0
    assert all(not p.requires_grad for p in folded.parameters())
    _assert_same_map(folded, fmap, torch.rand(5, channels, size, size, generator=g, dtype=torch.float64), tol=1e-9)


def test_fold_batch_norm_leaves_a_norm_it_cannot_fold():
    """Only a norm applied straight to a convolution's output in eval mode is folded: one after an activation,
    one without running statistics, or a pair a block's forward does not chain, stays."""
    from torch import nn

    from mepf.core.features import fold_batch_norm

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                        nn.BatchNorm2d(4, track_running_stats=False))

    class Other(nn.Module):  # conv1/bn1 names as in ResNet's blocks, but not one of them
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    both = nn.ModuleList([net, Other()]).eval()
    assert fold_batch_norm(both) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in both.modules()) == 3


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


def sums_reference(f: torch.Tensor, y, k, c1, c2, g1, g2):
    """Per-class sums of today's float64 phi1/phi2 (index_add), and the input gradient of <g1, S1> + <g2, S2>."""
    x = f.detach().double().requires_grad_(True)
    out = []
    for c, phi in ((c1, phi1), (c2, phi2)):
        out.append(None if c is None else torch.zeros(k, f.shape[1], dtype=torch.float64).index_add(0, y, phi(x, c)))
    loss = sum((s * g.double()).sum() for s, g in zip(out, (g1, g2)) if s is not None)
    loss.backward()
    return out[0], out[1], x.grad


def sums_fused(f: torch.Tensor, y, k, c1, c2, g1, g2):
    x = f.detach().clone().requires_grad_(True)
    s1, s2 = phi_class_sums(x, y, k, c1, c2)
    sum((s * g).sum() for s, g in zip((s1, s2), (g1, g2)) if s is not None).backward()
    return s1, s2, x.grad


HOSTILE_LABELS = torch.tensor([0, 3, 0, 1, 3, 3, 1, 0, 3])  # class 2 absent; good rows 0, 5, 6, 7, 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c1,c2", [(1.0, 0.37), (1.0, None), (None, 0.37)])
def test_class_sums_match_the_reference(dtype, c1, c2):
    """Sums of phi over each class without writing phi: the reference's sums and gradients, refused rows adding
    nothing and getting a zero gradient, an absent class summing to zero."""
    f = hostile_rows(dtype)
    k = 4
    g1, g2 = torch.randn(2, k, f.shape[1], generator=torch.Generator().manual_seed(1), dtype=dtype)
    r1, r2, rg = sums_reference(f, HOSTILE_LABELS, k, c1, c2, g1, g2)
    s1, s2, sg = sums_fused(f, HOSTILE_LABELS, k, c1, c2, g1, g2)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for s, r, c in ((s1, r1, c1), (s2, r2, c2)):
        assert (s is None) == (c is None)
        if s is not None:
            assert s.dtype == dtype and s.shape == (k, f.shape[1])
            torch.testing.assert_close(s.double(), r, **tol)
            assert s[2].abs().sum() == 0
    assert sg.dtype == dtype and bool(torch.isfinite(sg).all())
    good = [0, 5, 6, 7, 8]
    # the gradient's natural size per row, C |g| / ||f|| (phi2 alone has a zero gradient on row 8)
    scale = 4 * torch.cat([g1, g2], dim=1).abs().amax().double() / f[good].double().norm(dim=1, keepdim=True)
    torch.testing.assert_close(sg[good].double() / scale, rg[good] / scale, **tol)
    assert sg[[1, 2, 3, 4]].abs().sum() == 0


def test_class_sums_equal_the_sums_of_phi_fused_rows():
    """The fused sums against index_add over phi_fused's own rows (the path they replace), in float32."""
    f = hostile_rows(torch.float32)
    k = 4
    g1, g2 = torch.randn(2, k, f.shape[1], generator=torch.Generator().manual_seed(5))
    x = f.clone().requires_grad_(True)
    p1, p2 = phi_fused(x, 1.0, 0.37)
    a1, a2 = (torch.zeros(k, f.shape[1]).index_add(0, HOSTILE_LABELS, p) for p in (p1, p2))
    ((a1 * g1).sum() + (a2 * g2).sum()).backward()
    s1, s2, sg = sums_fused(f, HOSTILE_LABELS, k, 1.0, 0.37, g1, g2)
    torch.testing.assert_close(s1, a1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2, a2, rtol=1e-5, atol=1e-6)
    scale = x.grad.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(sg / scale, x.grad / scale, rtol=1e-5, atol=1e-6)


def test_class_sums_keep_phi2_of_rows_phi1_refuses():
    """Entries of 1e20 overflow ||f|| in float32 (phi1 refuses the row) but not (f/max|f|)^2: phi2's share of the
    sums and of the gradient stays, as in phi_fused; entries of 1e-21 keep a finite gradient."""
    g = torch.Generator().manual_seed(3)
    f = torch.rand(4, 200, generator=g) + 0.1
    f[0] *= 1e-21
    f[1] *= 1e20
    y = torch.tensor([0, 1, 1, 0])
    g1, g2 = torch.randn(2, 2, 200, generator=g)
    s1, s2, sg = sums_fused(f, y, 2, 1.0, 2.0, g1, g2)
    x = f.clone().requires_grad_(True)
    p1, p2 = phi_fused(x, 1.0, 2.0)
    ((torch.zeros(2, 200).index_add(0, y, p1) * g1).sum() + (torch.zeros(2, 200).index_add(0, y, p2) * g2).sum()
     ).backward()
    assert bool(torch.isfinite(sg).all()) and sg[1].abs().sum() > 0
    for row in range(4):
        torch.testing.assert_close(sg[row], x.grad[row], rtol=1e-4, atol=1e-4 * float(x.grad[row].abs().max()))
    torch.testing.assert_close(s2, torch.zeros(2, 200).index_add(0, y, p2.detach()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale,g_scale", [(2e-16, 1e10), (1e15, 1e-20), (1e18, 1e-6), (1e12, 1e-16), (1.0, 1.0)])
def test_class_sums_float32_gradient_at_extreme_sizes(scale, g_scale):
    """float32 rows and loss gradients far from training's sizes, where a factor like s1^3 (f.G) would leave
    float32's range while the gradient itself does not: the float64 reference's gradient, row-relative."""
    gen = torch.Generator().manual_seed(7)
    f = torch.randn(4, 64, generator=gen) * scale
    y = torch.tensor([0, 1, 0, 1])
    g1, g2 = torch.randn(2, 2, 64, generator=gen) * g_scale
    for c1, c2 in ((1.0, None), (1.0, 0.5)):
        _, _, rg = sums_reference(f, y, 2, c1, c2, g1, g2)
        _, _, sg = sums_fused(f, y, 2, c1, c2, g1, g2)
        assert bool(torch.isfinite(sg).all())
        size = rg.abs().amax(dim=1, keepdim=True)
        torch.testing.assert_close(sg.double() / size, rg / size, rtol=0, atol=1e-5)


def test_class_sums_take_int32_labels_and_refuse_double_backward():
    f = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 1])
    a = phi_class_sums(f, y, 2, 1.0, 1.0)
    b = phi_class_sums(f, y.int(), 2, 1.0, 1.0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    (g,) = torch.autograd.grad(a[0].sum() + a[1].sum(), f, create_graph=True)
    with pytest.raises(RuntimeError):  # the hand-written backward is not itself differentiable: say so
        g.sum().backward()


def test_class_sums_gradcheck_in_float64():
    f = (torch.rand(5, 12, dtype=torch.float64) + 0.1) * torch.tensor([1.0, -1.0] * 6, dtype=torch.float64)
    f.requires_grad_(True)
    y = torch.tensor([2, 0, 2, 2, 0])
    assert torch.autograd.gradcheck(lambda x: phi_class_sums(x, y, 3, 1.0, 0.5), (f,))
    assert torch.autograd.gradcheck(lambda x: phi_class_sums(x, y, 3, None, 0.5)[1], (f,))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), dim=st.integers(1, 40), k=st.integers(1, 5), seed=st.integers(0, 2 ** 31),
       log_scale=st.floats(-20, 20), c=st.floats(0.01, 100))
def test_property_class_sums_match_reference(rows, dim, k, seed, log_scale, c):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, dim, generator=gen, dtype=torch.float64) * 10.0 ** log_scale
    y = torch.randint(0, k, (rows,), generator=gen)
    g1, g2 = torch.randn(2, k, dim, generator=gen, dtype=torch.float64)
    r1, r2, rg = sums_reference(f, y, k, c, 2 * c, g1, g2)
    s1, s2, sg = sums_fused(f, y, k, c, 2 * c, g1, g2)
    torch.testing.assert_close(s1, r1, rtol=1e-10, atol=1e-12 * c * rows)
    torch.testing.assert_close(s2, r2, rtol=1e-10, atol=1e-12 * c * rows)
    scale = 4 * c * torch.cat([g1, g2], dim=1).abs().amax() / f.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sg / scale, rg / scale, rtol=0, atol=1e-12)


def test_feature_map_class_sums_are_float32_under_autocast():
    """FeatureMap.class_sums: the sums of embed's rows per class, float32 even under a bf16 autocast (the
    extractor runs in it, the sums do not), with each moment asked for."""
    from mepf.core.features import build_feature_map

    fmap, _ = build_feature_map("resnet18", "random", layers=["pixels", "stem"], image_size=(16, 16), channels=1,
                                c1=1.0, c2=3.0)
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 0, 1, 1, 2, 0])
    rows = fmap.embed(x, ("S1", "S2"))
    sums = fmap.class_sums(x, y, 3, ("S1", "S2"))
    for m in ("S1", "S2"):
        torch.testing.assert_close(sums[m], torch.zeros(3, rows[m].shape[1]).index_add(0, y, rows[m]),
                                   rtol=1e-5, atol=1e-6)
    assert tuple(fmap.class_sums(x, y, 3, ("S2",))) == ("S2",)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fmap.class_sums(x, y, 3, ("S1", "S2"))
        plain = fmap.embed(x, ("S1",))["S1"]
    assert all(s.dtype == torch.float32 for s in under.values())
    torch.testing.assert_close(under["S1"], torch.zeros(3, plain.shape[1]).index_add(0, y, plain.float()),
                               rtol=1e-5, atol=1e-6)
