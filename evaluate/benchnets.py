"""The three downstream classifiers of DPImageBench's evaluator (evaluation/classifier/*.py there), rebuilt from
their definitions for (Fashion-)MNIST-sized input: WRN-40-4, ResNet-110 with basic blocks, ResNeXt-29 (8x64d).

Same layers, widths, initialisation and pooling as theirs, so that parameter counts (8.95 M, 1.73 M, 34.43 M for
grey 28 px and 10 classes) and the function computed match; the code is ours.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .options import BENCH_CLASSIFIERS  # noqa: F401 - in the order their evaluator trains and logs them

#: millions of parameters for grey 28 px and 10 classes, as DPImageBench's definitions give them
PARAMS_M = {"wrn": 8.95, "resnet": 1.73, "resnext": 34.43}
#: an epoch's relative cost (2-core CPU, 300 images, 2 epochs each: 4.5, 19.5, 129 s): what a first epoch of one
#: classifier is estimated from, given an epoch of another
EPOCH_COST = {"resnet": 1.0, "wrn": 4.3, "resnext": 28.7}


class _WideBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet; dropout between its two convolutions."""

    def __init__(self, cin, cout, stride, drop):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(a)))
        if self.drop > 0:
            out = F.dropout(out, p=self.drop, training=self.training)
        # an identity block adds its input; a projecting one projects the activated input, as theirs does
        return (x if self.shortcut is None else self.shortcut(a)) + self.conv2(out)


class WideResNet(nn.Module):
    def __init__(self, in_c=1, img_size=28, num_classes=10, depth=40, widen=4, drop=0.3):
        super().__init__()
        assert (depth - 4) % 6 == 0
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_c, widths[0], 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(*[
            _WideBlock(widths[g + (i > 0)], widths[g + 1], 1 if (g == 0 or i > 0) else 2, drop)
            for g in range(3) for i in range(n)])
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.pool = img_size // 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.avg_pool2d(out, self.pool).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (None if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """The CIFAR ResNet (He et al.): 16/32/64 channels, (depth - 2) / 6 basic blocks per stage."""

    def __init__(self, in_c=1, img_size=28, num_classes=10, depth=110):
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        self.conv1, self.bn1 = nn.Conv2d(in_c, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        layers, cin = [], 16
        for g, c in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(_BasicBlock(cin, c, 2 if (i == 0 and g > 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.pool = img_size // 4
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.avg_pool2d(x, self.pool).flatten(1))


class _NeXtBlock(nn.Module):
    """ResNeXt bottleneck, type C: 1x1 reduce, grouped 3x3, 1x1 expand; projection shortcut on a change."""

    def __init__(self, cin, cout, stride, cardinality, widen):
        super().__init__()
        d = cardinality * cout // widen
        self.conv_reduce, self.bn_reduce = nn.Conv2d(cin, d, 1, bias=False), nn.BatchNorm2d(d)
        self.conv_conv = nn.Conv2d(d, d, 3, stride, 1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(d)
        self.conv_expand, self.bn_expand = nn.Conv2d(d, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential() if cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn(self.conv_conv(out)))
        return F.relu(self.shortcut(x) + self.bn_expand(self.conv_expand(out)))


class ResNeXt(nn.Module):
    """ResNeXt-29 for CIFAR-sized input: stages of 256/512/1024 channels (widen 4), cardinality 8. Their
    constructor takes a dropout rate and never applies it; neither does this one."""

    def __init__(self, in_c=1, img_size=28, num_classes=10, depth=29, cardinality=8, widen=4):
        super().__init__()
        n = (depth - 2) // 9
        stages = [64, 64 * widen, 128 * widen, 256 * widen]
        self.conv1, self.bn1 = nn.Conv2d(in_c, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        blocks = []
        for g in range(3):
            for i in range(n):
                cin = stages[g] if i == 0 else stages[g + 1]
                blocks.append(_NeXtBlock(cin, stages[g + 1], (1 if g == 0 else 2) if i == 0 else 1, cardinality, widen))
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(stages[3], num_classes)
        self.pool = img_size // 4
        nn.init.kaiming_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.avg_pool2d(x, self.pool, 1).flatten(1))


def bench_classifier(kind: str, in_c: int, img_size: int, num_classes: int) -> nn.Module:
    """Their evaluator's network for non-CIFAR data: WRN-40-4 (dropout 0.3), ResNet-110, ResNeXt-29 8x64d."""
    if kind == "wrn":
        return WideResNet(in_c, img_size, num_classes, depth=40, widen=4, drop=0.3)
    if kind == "resnet":
        return ResNet(in_c, img_size, num_classes, depth=110)
    if kind == "resnext":
        return ResNeXt(in_c, img_size, num_classes, depth=29, cardinality=8, widen=4)
    raise ValueError(f"unknown classifier {kind!r}")
