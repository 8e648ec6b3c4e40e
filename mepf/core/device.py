"""Choosing the torch device (auto: CUDA, then MPS, then CPU)."""
from __future__ import annotations

import torch

from mepf.artifacts.errors import MepfError

from .names import DEVICES


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise MepfError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MepfError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MepfError("--device mps: MPS is not available; use --device cpu or auto")
    return torch.device(device)
