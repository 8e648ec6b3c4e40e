"""Read a torch file as tensors and plain containers only (weights_only), for every file mepf did not make
itself: weights, generators and snapshots from others can carry no code. In embed, the lowest stage with
torch, so that artifacts (and `mepf audit`) stays free of it."""
from __future__ import annotations

from collections.abc import Callable

import torch

from mepf.artifacts.errors import MepfError


def read_tensors(source, refuse: Callable[[str], str]):
    """torch.load(source, weights_only=True); any failure becomes one MepfError whose text is `refuse(reason)`,
    the reason being the first line of the loader's error (its full text runs to many lines)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, or holding objects other than tensors
        text = str(e).strip()
        raise MepfError(refuse(text.splitlines()[0][:160] if text else type(e).__name__)) from None


def is_state_dict(obj) -> bool:
    """A dict of tensors, as model.state_dict() gives."""
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())
