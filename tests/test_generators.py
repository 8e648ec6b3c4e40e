"""The generators' folded upsampling (training's plan value upsample_folded): each nearest 2x upsample and the
3x3 convolution after it computed as one stride-2 transposed convolution is the same function, with the same
gradients and the same weights; only the exact pattern is folded."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mepf.synthesize.generators import build_generator, fold_upsampling, foldable, run_sequential

CASES = [("conv", 28, 1, 10, 16), ("conv", 32, 3, 10, 16), ("conv-cbn", 28, 1, 10, 16), ("conv-cbn", 28, 1, 1, 16),
         ("resnet", 32, 3, 10, 16), ("resnet", 16, 1, 1, 8)]


@pytest.mark.parametrize("name,size,channels,classes,width", CASES)
def test_folded_upsampling_is_the_same_generator(name, size, channels, classes, width):
    """float64, train mode (batch statistics), random biases and norm affine terms: outputs and the gradients of
    every weight and of z equal the generator as written to 1e-10; the state dict is untouched."""
    torch.manual_seed(0)
    g = build_generator({"name": name, "image_size": size, "channels": channels, "num_classes": classes,
                         "z_dim": 100, "width": width}).double()
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    folded = fold_upsampling(copy.deepcopy(g))
    assert list(folded.state_dict()) == list(g.state_dict())
    z0, y = torch.randn(12, 100, dtype=torch.float64), torch.arange(12) % classes
    out = {}
    for key, net in (("plain", g), ("folded", folded)):
        z = z0.clone().requires_grad_(True)
        x = net(z, y)
        (x * torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)).sum().backward()
        out[key] = (x.detach(), z.grad, [p.grad for p in net.parameters()])
    (xa, za, ga), (xb, zb, gb) = out["plain"], out["folded"]
    torch.testing.assert_close(xb, xa, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(zb, za, rtol=1e-10, atol=1e-12)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for (k, a), (_, b) in zip(g.state_dict().items(), folded.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=k)  # running statistics moved alike
    fold_upsampling(folded, False)
    assert not any(getattr(m, "upsample_folded", False) for m in folded.modules())


def test_only_the_exact_pattern_is_folded():
    """A nearest 2x upsample into a 3x3, stride-1, zero-padding-1 convolution; any other upsample or
    convolution runs as written, folded or not (the upsample module is then called)."""
    up, conv = nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(4, 3, 3, padding=1)
    assert foldable(up, conv)
    others = [(nn.Upsample(scale_factor=2, mode="bilinear"), conv), (nn.Upsample(scale_factor=3), conv),
              (nn.Upsample(size=(8, 8)), conv), (up, nn.Conv2d(4, 3, 5, padding=2)),
              (up, nn.Conv2d(4, 3, 3, padding=1, stride=2)), (up, nn.Conv2d(4, 3, 3, padding=1, dilation=2)),
              (up, nn.Conv2d(4, 4, 3, padding=1, groups=2)),
              (up, nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect")), (up, nn.Conv2d(4, 3, 3, padding=0)),
              (nn.ReLU(), conv)]
    h = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    calls = []
    for a, b in others:
        assert not foldable(a, b)
        seq = nn.Sequential(a, b).double()
        calls.clear()
        hook = a.register_forward_hook(lambda *_: calls.append(1))
        torch.testing.assert_close(run_sequential(seq, h, True), seq(h))
        assert len(calls) == 2
        hook.remove()
    seq = nn.Sequential(up, conv, nn.ReLU()).double()
    calls.clear()
    up.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(run_sequential(seq, h, True), seq(h), rtol=1e-12, atol=1e-12)
    assert len(calls) == 1  # seq(h) alone: the folded pass never upsampled
