"""Sample grids as PNG: one row per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mepf.artifacts.staging import atomic_path


def save_grid(images: torch.Tensor, rows: int, path: Path, pad: int = 2, row_labels: list | None = None) -> None:
    """images (N, C, H, W) in [0, 1], N = rows * cols, row-major; written atomically. `row_labels`: a name
    written left of each row (the class)."""
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
    if row_labels:
        img = _label_rows(img.convert("RGB"), row_labels, rows)
    with atomic_path(path, ".png") as tmp:
        img.save(tmp)


def _label_rows(img: Image.Image, labels: list, rows: int) -> Image.Image:
    """The grid with a white margin on the left holding each row's label (printable, cut to 24 characters)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    texts = ["".join(c if c.isprintable() else "?" for c in str(t))[:24] for t in labels[:rows]]
    draw = ImageDraw.Draw(img)
    width = max(int(draw.textlength(t, font=font)) for t in texts) + 8
    out = Image.new("RGB", (img.width + width, img.height), "white")
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    row_h = img.height / rows
    for r, t in enumerate(texts):
        draw.text((4, int(r * row_h + row_h / 2 - 5)), t, fill="black", font=font)
    return out
