"""The declared transform from stored records to the feature map's input: float (B, C, H, W) in [0, 1]."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mepf.artifacts.errors import MepfError

LUMA = (0.299, 0.587, 0.114)


class Transform:
    """uint8/255 (or float as stored), channel conversion (repeat grey / ITU-R 601 luma), bilinear
    antialiased resize to (H, W) when the record's size differs."""

    def __init__(self, image_size: tuple, channels: int):
        self.image_size, self.channels = tuple(image_size), channels

    def spec(self) -> dict:
        return {"image_size": list(self.image_size), "channels": self.channels,
                "scaling": "uint8 / 255 (float records as stored, must lie in [0,1])",
                "channel_conversion": "grey->RGB: repeat; RGB->grey: ITU-R 601 luma 0.299R+0.587G+0.114B",
                "resize": "torch bilinear, antialias=True, align_corners=False, when the size differs"}

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c != self.channels:
            if c == 1:
                x = x.expand(-1, 3, -1, -1)
            else:
                x = (x * torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(x.shape[2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        return x.contiguous()

    def __call__(self, images) -> torch.Tensor:
        if isinstance(images, list):
            return torch.cat([self(a[None]) for a in images])
        if images.ndim != 4:
            raise MepfError(f"records have shape {images.shape[1:]}; expected (H, W, C)")
        x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2)
        x = x.float() / 255.0 if images.dtype == np.uint8 else x.float()
        return self._one(x)
