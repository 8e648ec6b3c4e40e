"""The names and defaults the shared torch layer offers, without importing torch: the CLI builds its choices and
help from these, and tests/test_names.py checks them against the registries in features.py and device.py."""
from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda", "mps")
BACKBONE_NAMES = ("vgg19", "resnet18", "resnet50", "efficientnet-lite0", "efficientnet-lite1",
                  "efficientnet-lite2")
POOLINGS = ("none", "mean")
#: the factor on the 'pixels' layer when --pixel-weight is not given
DEFAULT_PIXEL_WEIGHT = 1.0
