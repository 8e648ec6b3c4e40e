"""The declared transform from stored records to the feature map's input: float (B, C, H, W) in [0, 1]."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mepf.artifacts.errors import MepfError

from . import options

LUMA = (0.299, 0.587, 0.114)
#: --crop: None or "none" (every record stretched to the geometry), "center"
CROPS = (None, *options.CROPS)


class Transform:
    """uint8/255 (or float as stored), channel conversion (repeat grey / ITU-R 601 luma), bilinear
    antialiased resize to (H, W) when the record's size differs. Every step is a function of the record
    alone: conversion is elementwise and resizing runs one record at a time, so a record's pixels never
    depend on the records that share its batch."""

    def __init__(self, image_size: tuple, channels: int, crop: str | None = None):
        if crop not in CROPS:
            raise MepfError(f"--crop must be one of {', '.join(c for c in CROPS if c)}")
        self.image_size, self.channels, self.crop = tuple(image_size), channels, (None if crop == "none" else crop)

    def spec(self) -> dict:
        out = {"image_size": list(self.image_size), "channels": self.channels,
               "scaling": "uint8 / 255 (float records as stored, must lie in [0,1])",
               "channel_conversion": "grey->RGB: repeat; RGB->grey: ITU-R 601 luma 0.299R+0.587G+0.114B",
               "resize": "torch bilinear, antialias=True, align_corners=False, when the size differs"}
        if self.crop:  # absent where no crop: files written before the option keep their bytes
            out["crop"] = "center: the largest centred window of the target's aspect ratio, before the resize"
        return out

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        """The centred window of the target's aspect ratio (a record of another shape is otherwise stretched)."""
        if not self.crop:
            return x
        h, w = x.shape[2:]
        th, tw = self.image_size
        if h * tw > w * th:  # too tall
            nh = max(1, round(w * th / tw))
            top = (h - nh) // 2
            return x[:, :, top:top + nh]
        nw = max(1, round(h * tw / th))
        left = (w - nw) // 2
        return x[:, :, :, left:left + nw]

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.channels:
            return x
        if x.shape[1] == 1:
            return x.expand(-1, 3, -1, -1)
        return x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2]

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) == self.image_size:
            return x
        return torch.cat([F.interpolate(x[i:i + 1], size=self.image_size, mode="bilinear", antialias=True,
                                        align_corners=False).clamp(0, 1) for i in range(len(x))])

    def __call__(self, records) -> torch.Tensor:
        if isinstance(records, list):
            return torch.cat([self(a[None]) for a in records])
        if records.ndim != 4 or records.shape[3] not in (1, 3):
            raise MepfError(f"records have shape {records.shape[1:]}; expected (H, W, C) with C 1 or 3")
        x = torch.from_numpy(np.require(records, requirements=["C", "W"])).permute(0, 3, 1, 2)
        x = x.float() / 255.0 if records.dtype == np.uint8 else x.float()
        return self._resize(self._crop(self._channels(x))).contiguous()
