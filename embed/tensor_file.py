"""Read a torch file as tensors and plain containers only (weights_only), for every file mepf did not make
itself: weights, generators and snapshots from others can carry no code. In embed, the lowest stage with
torch, so that artifacts (and `mepf audit`) stays free of it."""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable

import torch

from mepf.artifacts.errors import MepfError

#: a torch zip file holds at most this many members (a model's tensors; mepf's generators hold a few dozen)
MAX_MEMBERS = 100_000


def zip_problem(source, require_zip: bool = False) -> str | None:
    """Why a torch file would make torch.load allocate more than the file holds: a zip member that is
    compressed (torch.save stores them uncompressed; a deflated one can inflate a thousandfold), too many
    members, or declared sizes beyond the file. A file in torch's legacy (non-zip) format is refused where
    `require_zip` (what mepf writes)."""
    import zipfile

    try:
        if hasattr(source, "seek"):
            source.seek(0)
        if not zipfile.is_zipfile(source):
            return "it is not a torch zip file (torch.save's format)" if require_zip else None
        if hasattr(source, "seek"):
            source.seek(0, io.SEEK_END)
            size = source.tell()
            source.seek(0)
        else:
            size = os.path.getsize(source)
        with zipfile.ZipFile(source) as z:
            members = z.infolist()
            if len(members) > MAX_MEMBERS:
                return "it holds too many members"
            if any(m.compress_type != zipfile.ZIP_STORED for m in members):
                return "it holds compressed members, which torch.save never writes"
            if sum(m.file_size for m in members) > size:
                return "its members claim more bytes than the file holds"
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        return f"it is not a readable zip file ({type(e).__name__})"
    finally:
        if hasattr(source, "seek"):
            source.seek(0)
    return None


def read_tensors(source, refuse: Callable[[str], str], require_zip: bool = False):
    """torch.load(source, weights_only=True), after zip_problem; any failure becomes one MepfError whose text is
    `refuse(reason)`."""
    problem = zip_problem(source, require_zip)
    if problem:
        raise MepfError(refuse(problem))
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
