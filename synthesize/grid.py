"""Sample grids as PNG: one row per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, rows: int, path: Path, pad: int = 2) -> None:
    """images (N, C, H, W) in [0, 1], N = rows * cols, row-major; written atomically."""
    n, c, h, w = images.shape
    cols = n // rows
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    img = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)
    scale = max(1, 256 // max(h, w) // 2)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    img.save(tmp)
    tmp.replace(path)
