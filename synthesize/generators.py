"""Generators: images in [0, 1] from z (100 dims) and, when labelled, a one-hot label concatenated to z."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mepf.artifacts.errors import MepfError
from mepf.artifacts.schema import CONV_MAX_SIDE, RESNET_MAX_START, resnet_start

from .options import GENERATOR_WIDTHS as WIDTHS

Z_DIM = 100


def _up_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Along `dim`, the 3 taps of a kernel that follows a nearest 2x upsample, as the 4 taps of one stride-2
    transposed convolution (padding 1): output 2i reads input i-1 (tap 0) and i (taps 1 + 2), output 2i+1 reads
    i (taps 0 + 1) and i+1 (tap 2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


def foldable(up: nn.Module, conv: nn.Module) -> bool:
    """Whether up -> conv is a nearest 2x upsample into a 3x3, stride-1, zero-padding-1 convolution."""
    return (isinstance(up, nn.Upsample) and up.mode == "nearest" and up.size is None
            and up.scale_factor in (2, 2.0, (2.0, 2.0)) and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def up_conv(x: torch.Tensor, conv: nn.Conv2d, folded: bool) -> torch.Tensor:
    """conv(nearest 2x upsample of x) for a 3x3, padding-1 conv. folded: as one stride-2 transposed convolution
    whose 4x4 kernel the upsample and the 3x3 kernel make together; the same function (to rounding), with no
    upsampled tensor and 16 instead of 36 multiply-adds per output value."""
    if not folded:
        return conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    k = _up_taps(_up_taps(conv.weight, 2), 3)
    return F.conv_transpose2d(x, k.transpose(0, 1), conv.bias, stride=2, padding=1)


def run_sequential(seq: nn.Sequential, h: torch.Tensor, folded: bool) -> torch.Tensor:
    """seq(h), with each upsample -> 3x3 conv pair computed by up_conv when folded."""
    mods, i = list(seq), 0
    while i < len(mods):
        if folded and i + 1 < len(mods) and foldable(mods[i], mods[i + 1]):
            h, i = up_conv(h, mods[i + 1], True), i + 2
        else:
            h, i = mods[i](h), i + 1
    return h


def _conv_geometry(g: nn.Module, image_size: int, num_classes: int, z_dim: int, width: int) -> int:
    """Sets the conv generators' shared attributes; returns the width of the label appended to z."""
    if image_size % 4:
        raise MepfError(f"the conv generator needs a size divisible by 4 (got {image_size})")
    if image_size > CONV_MAX_SIDE:  # its first layer alone would be (image_size / 4)^2 x 2 x width x (z + classes)
        raise MepfError(f"the conv generators draw up to {CONV_MAX_SIDE} px (got {image_size}); --generator resnet "
                        "draws larger images")
    g.s0 = image_size // 4
    g.num_classes, g.z_dim, g.width = num_classes, z_dim, width
    return num_classes if num_classes > 1 else 0


class ConvGenerator(nn.Module):
    """Small conditional conv generator for 28x28/32x32, 1 or 3 channels: FC to (S/4)x(S/4), two
    nearest-upsample + conv3x3 stages (resize-conv: no checkerboard artefacts), sigmoid."""

    def __init__(self, image_size: int, channels: int, num_classes: int, z_dim: int = Z_DIM,
                 width: int = WIDTHS["conv"]):
        super().__init__()
        cond = _conv_geometry(self, image_size, num_classes, z_dim, width)
        self.fc = nn.Sequential(nn.Linear(z_dim + cond, 2 * width * self.s0 ** 2),
                                nn.BatchNorm1d(2 * width * self.s0 ** 2),
                                nn.ReLU(True))
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2), nn.ReLU(True),
            nn.Conv2d(width // 2, channels, 3, padding=1), nn.Sigmoid())

    #: each upsample and the conv after it computed as one transposed conv (up_conv); set by training's plan
    upsample_folded = False

    def forward(self, z, y=None):
        h = self.fc(_condition(z, y, self.num_classes))
        return run_sequential(self.body, h.view(len(z), -1, self.s0, self.s0), self.upsample_folded)


class _ClassNorm(nn.Module):
    """Class-conditional batch norm: statistics over the batch, scale and shift per class (1 and 0 at
    the start), so each class can set its own contrast and brightness instead of sharing one affine map."""

    def __init__(self, features: int, num_classes: int, dims: int):
        super().__init__()
        self.bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(features, affine=False)
        self.scale, self.shift = nn.Embedding(num_classes, features), nn.Embedding(num_classes, features)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x, y):
        shape = (len(x), -1) + (1,) * (x.dim() - 2)
        return self.bn(x) * self.scale(y).view(shape) + self.shift(y).view(shape)


class ConvCBNGenerator(nn.Module):
    """ConvGenerator's layout with class-conditional batch norm in place of each batch norm (the label is
    also concatenated to z); on an unlabelled release it is ConvGenerator again."""

    upsample_folded = False  # as ConvGenerator's

    def __init__(self, image_size: int, channels: int, num_classes: int, z_dim: int = Z_DIM,
                 width: int = WIDTHS["conv-cbn"]):
        super().__init__()
        cond = _conv_geometry(self, image_size, num_classes, z_dim, width)
        k = max(num_classes, 1)
        self.fc, self.n0 = nn.Linear(z_dim + cond, 2 * width * self.s0 ** 2), _ClassNorm(2 * width * self.s0 ** 2, k, 1)
        self.conv1, self.n1 = nn.Conv2d(2 * width, width, 3, padding=1), _ClassNorm(width, k, 2)
        self.conv2, self.n2 = nn.Conv2d(width, width // 2, 3, padding=1), _ClassNorm(width // 2, k, 2)
        self.out = nn.Conv2d(width // 2, channels, 3, padding=1)

    def forward(self, z, y=None):
        if self.num_classes <= 1:  # unlabelled: one class, its scale and shift act as batch norm's own
            y = torch.zeros(len(z), dtype=torch.long, device=z.device)
        h = F.relu(self.n0(self.fc(_condition(z, y, self.num_classes)), y)).view(len(z), -1, self.s0, self.s0)
        h = F.relu(self.n1(up_conv(h, self.conv1, self.upsample_folded), y))
        h = F.relu(self.n2(up_conv(h, self.conv2, self.upsample_folded), y))
        return torch.sigmoid(self.out(h))


class _UpBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    upsample_folded = False  # set by ResNetGenerator

    def forward(self, x):
        h = self.conv2(F.relu(self.bn2(up_conv(F.relu(self.bn1(x)), self.conv1, self.upsample_folded))))
        if self.upsample_folded:  # a 1x1 conv commutes with the upsample: 4 x fewer multiply-adds before it
            return h + F.interpolate(self.skip(x), scale_factor=2, mode="nearest")
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResNetGenerator(nn.Module):
    """GFMN-style ResNet generator: a transposed conv from z to a start x start map (4 x 4 at powers of two; the
    smallest start of at least 4 whose doublings reach the size, e.g. 6 for 48 and 96 px, 7 for 224 px), one
    residual up-block per doubling, BN-ReLU-conv3x3 to the output channels, sigmoid."""

    def __init__(self, image_size: int, channels: int, num_classes: int, z_dim: int = Z_DIM,
                 width: int = WIDTHS["resnet"]):
        super().__init__()
        if (geometry := resnet_start(image_size)) is None:
            raise MepfError(f"the resnet generator draws sizes s x 2^k with 4 <= s <= {RESNET_MAX_START} and k >= 1 "
                            f"(got {image_size}); --generator conv takes any size divisible by 4 up to {CONV_MAX_SIDE}")
        start, ups = geometry
        self.num_classes, self.z_dim, self.width = num_classes, z_dim, width
        cond = num_classes if num_classes > 1 else 0
        self.start = nn.ConvTranspose2d(z_dim + cond, width, start)
        self.blocks = nn.Sequential(*[_UpBlock(width, width) for _ in range(ups)])
        self.out = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(True), nn.Conv2d(width, channels, 3, padding=1),
                                 nn.Sigmoid())

    def forward(self, z, y=None):
        h = _condition(z, y, self.num_classes)
        return self.out(self.blocks(self.start(h[:, :, None, None])))


def fold_upsampling(g: nn.Module, folded: bool = True) -> nn.Module:
    """In place: every nearest-upsample -> 3x3 conv of g (any of GENERATORS) computed as one transposed conv
    (up_conv), or again as written (folded False). The weights and the state dict are unchanged."""
    for m in g.modules():
        if hasattr(type(m), "upsample_folded"):
            m.upsample_folded = folded
    return g


def _condition(z, y, num_classes):
    if num_classes <= 1:
        return z
    return torch.cat([z, F.one_hot(y, num_classes).to(z.dtype)], dim=1)


GENERATORS = {"conv": ConvGenerator, "conv-cbn": ConvCBNGenerator, "resnet": ResNetGenerator}


def default_generator(image_size: int) -> str:
    """conv for small images (up to 32 px) and sizes no resnet draws (e.g. 68 or 136 px: 17 x 2^k), resnet above
    32 px wherever it draws (64, 128, ... px, and 48, 96, 224 ...)."""
    return "resnet" if image_size > 32 and resnet_start(image_size) is not None else "conv"


def build_generator(arch: dict) -> nn.Module:
    """arch: {name, image_size, channels, num_classes, z_dim, width}; stored in every checkpoint."""
    name = arch["name"]
    if name not in GENERATORS:
        raise MepfError(f"unknown generator {name!r}; choose one of {', '.join(GENERATORS)}")
    return GENERATORS[name](arch["image_size"], arch["channels"], arch["num_classes"], arch["z_dim"], arch["width"])
