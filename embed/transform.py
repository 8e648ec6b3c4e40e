"""The declared transform from stored records to the feature map's input: float (B, C, H, W) in [0, 1]."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mepf.artifacts.errors import MepfError

from . import options

LUMA = (0.299, 0.587, 0.114)
#: --crop: None or "none" (every record stretched to the geometry), "center"
CROPS = (None, *options.CROPS)
#: a record whose float copy is larger than this is converted a channel at a time (Transform._lean)
LEAN_BYTES = 1 << 24


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

    def _window(self, h: int, w: int) -> tuple:
        """The rows and columns --crop keeps of an (h, w) record: with center, the centred window of the target's
        aspect ratio (a record of another shape is otherwise stretched)."""
        if not self.crop:
            return slice(None), slice(None)
        th, tw = self.image_size
        if h * tw > w * th:  # too tall
            nh = max(1, round(w * th / tw))
            top = (h - nh) // 2
            return slice(top, top + nh), slice(None)
        nw = max(1, round(h * tw / th))
        left = (w - nw) // 2
        return slice(None), slice(left, left + nw)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self._window(*x.shape[2:])
        return x[:, :, rows, cols]

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

    def _plane(self, record: np.ndarray, channel: int) -> torch.Tensor:
        """One channel of one stored record as float (1, 1, H, W), scaled as `__call__` scales it."""
        x = torch.from_numpy(np.array(record[:, :, channel], dtype=np.float32, order="C"))[None, None]  # a copy
        return x.div_(255.0) if record.dtype == np.uint8 else x

    def _lean(self, record: np.ndarray) -> torch.Tensor:
        """`__call__` of one large record (H, W, C), a float plane at a time: the same numbers (the same elementwise
        operations in the same order; bilinear resizing treats each plane alone) at a fraction of the peak memory
        (a record at MAX_DECODED_PIXELS, 192 MB stored, took 1.9 GB through `__call__`'s whole-record copies)."""
        record = record[self._window(*record.shape[:2])]  # a view
        cin = record.shape[2]
        if cin == self.channels or cin == 1:
            planes = [self._resize(self._plane(record, c)) for c in range(cin)]
        else:  # luma, accumulated in __call__'s order: (R * l0 + G * l1) + B * l2
            y = self._plane(record, 0).mul_(LUMA[0])
            y.add_(self._plane(record, 1).mul_(LUMA[1]))
            planes = [self._resize(y.add_(self._plane(record, 2).mul_(LUMA[2])))]
        if len(planes) < self.channels:
            planes = planes * self.channels
        return torch.cat(planes, 1)

    def __call__(self, records) -> torch.Tensor:
        if isinstance(records, list):
            return torch.cat([self(a[None]) for a in records])
        records = np.asarray(records)  # a CPU tensor too: its memory, not a copy
        if records.ndim != 4 or records.shape[3] not in (1, 3):
            raise MepfError(f"records have shape {records.shape[1:]}; expected (H, W, C) with C 1 or 3")
        if math.prod(records.shape[1:]) * 4 > LEAN_BYTES:
            return torch.cat([self._lean(r) for r in records])
        x = torch.from_numpy(np.require(records, requirements=["C", "W"])).permute(0, 3, 1, 2)
        x = x.float() / 255.0 if records.dtype == np.uint8 else x.float()
        return self._resize(self._crop(self._channels(x))).contiguous()
