"""Read a torch file as tensors and plain containers only (weights_only), for every file mepf did not make
itself: weights, generators and snapshots from others can carry no code. In embed, the lowest stage with
torch, so that artifacts (and `mepf audit`) stays free of it."""
from __future__ import annotations

import pickle
from collections.abc import Callable

import torch

from mepf.artifacts.errors import MepfError


def read_tensors(source, refuse: Callable[[str], str]):
    """torch.load(source, weights_only=True); any failure becomes one MepfError whose text is `refuse(reason)`."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, or holding objects other than tensors
        raise MepfError(refuse(_reason(e))) from None


def _reason(e: Exception) -> str:
    """One printable line: the loader's text can run to many lines, suggests turning weights_only off, and
    quotes names from inside the file (a hostile one can hold terminal control sequences)."""
    if isinstance(e, pickle.UnpicklingError):
        return "it holds objects other than tensors"
    lines = str(e).strip().splitlines()
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in (lines[0] if lines else ""))
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def is_state_dict(obj) -> bool:
    """A dict of tensors, as model.state_dict() gives."""
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())
