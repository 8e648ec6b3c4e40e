"""Read a torch file as tensors and plain containers only (weights_only), for every file mepf did not make
itself: weights, generators and snapshots from others can carry no code. In the shared torch layer, so that
artifacts (and `mepf audit`) stays free of torch."""
from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from mepf.artifacts.errors import MepfError
from mepf.artifacts.plain_file import read_plain_file

#: a torch zip file holds at most this many members (a model's tensors; mepf's generators hold a few dozen)
MAX_MEMBERS = 100_000
#: the largest weights file mepf reads (VGG19's published weights, the largest it uses, are 575 MB): a larger
#: file is refused before it is read, not read into memory whole
MAX_BYTES = 4 << 30


def canonical_zip(source, require_zip: bool = False, limit: int | None = MAX_BYTES) -> tuple:
    """(problem, None) or (None, the file as torch should read it). A torch zip file is rebuilt in memory from
    the members Python's zipfile reads, stored and in order, so that torch.load reads exactly what was
    checked: torch's reader trusts other parts of a zip than Python's (two central directories once hid a
    deflated member that inflated a 2 MB file to 2.5 GB inside torch.load). Refused: a compressed member
    (torch.save stores them), too many members, sizes beyond the file. A file in torch's legacy (non-zip)
    format is passed on as it is, or refused where `require_zip` (what mepf writes)."""
    import zipfile

    if isinstance(source, io.BytesIO):
        data = source.getvalue()
    else:
        problem, data = read_plain_file(Path(source), limit=limit)
        if problem:
            return problem, None
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return ("it is not a torch zip file (torch.save's format)", None) if require_zip else (None, io.BytesIO(data))
    out = io.BytesIO()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = z.infolist()
            if len(members) > MAX_MEMBERS:
                return "it holds too many members", None
            if any(m.compress_type != zipfile.ZIP_STORED for m in members):
                return "it holds compressed members, which torch.save never writes", None
            if sum(m.file_size for m in members) > len(data):
                return "its members claim more bytes than the file holds", None
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
                for m in members:
                    w.writestr(m.filename, z.read(m))  # read checks each member's CRC and local header
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError) as e:
        return f"it is not a readable zip file ({type(e).__name__})", None
    out.seek(0)
    return None, out


#: the globals a file of tensors needs: what torch.save writes for tensors, parameters and state dicts. torch's
#: weights_only loader allows more, some of which allocate what the file declares inside torch.load
#: (bytearray(n), torch.FloatTensor(n), a cast of a stride-0 view to another dtype)
ALLOWED_GLOBALS = frozenset({"collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                             "torch._utils _rebuild_parameter"} |
                            {f"torch {t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int",
                                                           "Short", "Char", "Byte", "Bool")})
#: the opcodes of such a file (pickle protocol 2, as torch.save writes; strings, numbers, containers but sets)
ALLOWED_OPS = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 "
    "FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES "
    "SHORT_BINBYTES BINBYTES8 EMPTY_DICT DICT SETITEM SETITEMS EMPTY_LIST LIST APPEND APPENDS EMPTY_TUPLE TUPLE "
    "TUPLE1 TUPLE2 TUPLE3 GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE GLOBAL REDUCE BUILD BINPERSID".split())
#: pickles at the start of torch's legacy (non-zip) format: magic number, protocol, system info, object, keys
LEGACY_PICKLES = 5


def _pickle_problem(stream) -> str | None:
    """Why one pickle in `stream` (read up to its STOP) is not one torch.save writes for tensors: an opcode or
    a global outside the lists above."""
    import pickletools

    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name not in ALLOWED_OPS:
                return f"it holds objects other than tensors (a pickle opcode, {op.name}, no file of tensors needs)"
            if op.name == "GLOBAL" and arg not in ALLOWED_GLOBALS:
                return "it holds objects other than tensors (a function or class no file of tensors needs)"
    except (ValueError, EOFError, UnicodeDecodeError) as e:
        return f"its pickle is not readable ({type(e).__name__})"
    return None


def objects_problem(buf: io.BytesIO) -> str | None:
    """The pickles torch would read from a file (a zip's .pkl members, or the legacy format's first
    LEGACY_PICKLES), checked before any of them is unpickled; `buf` is left at its start."""
    import zipfile

    try:
        if zipfile.is_zipfile(buf):
            with zipfile.ZipFile(buf) as z:
                names = z.namelist()
                if len({n.lower() for n in names}) != len(names):  # torch finds its members by name, any case
                    return "it holds members whose names differ only in case"
                for name in names:
                    if name.lower().endswith(".pkl"):
                        problem = _pickle_problem(io.BytesIO(z.read(name)))
                        if problem:
                            return problem
            return None
        buf.seek(0)
        for _ in range(LEGACY_PICKLES):
            problem = _pickle_problem(buf)
            if problem:
                return problem
        return None
    finally:
        buf.seek(0)


#: containers of a loaded file nest at most this deep (a state dict in a checkpoint is 2-4 deep)
MAX_DEPTH = 64


def _tensors(obj) -> tuple:
    """(problem, tensors): the tensors of a loaded object, dict keys included, each as often as it appears,
    each container walked once (a pickle's memo can put one container in many places, or inside itself);
    a problem where containers nest deeper than MAX_DEPTH."""
    seen, out, stack = set(), [], [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (dict, list, tuple)) and id(o) not in seen:
            if depth >= MAX_DEPTH:
                return "it nests containers too deeply", []
            seen.add(id(o))
            stack.extend((v, depth + 1) for v in ([*o.keys(), *o.values()] if isinstance(o, dict) else o))
    return None, out


def _ordinary(t: torch.Tensor) -> bool:
    """Dense, real, holding data on the CPU, as torch.save writes a model's weights (a sparse, meta, quantized or
    complex tensor would slip past the finiteness checks or fail inside them with a traceback)."""
    return t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized and not t.is_complex()


def declared_bytes_problem(obj, size: int) -> str | None:
    """Why the tensors torch.load gave declare more bytes than the file holds (views repeat a storage's bytes:
    a stride-0 view of one number declares any size), or are not ordinary dense CPU tensors."""
    problem, tensors = _tensors(obj)
    if problem:
        return problem
    total = 0
    for t in tensors:
        if not _ordinary(t):
            return "it holds a tensor that is not an ordinary dense one"
        total += t.numel() * t.element_size()
        if total > size:
            return "its tensors declare more bytes than the file holds (views of one storage)"
    return None


def state_dict_of(state: dict) -> OrderedDict:
    """A loaded state dict as load_state_dict should see it: its `_metadata` (per-module versions, set by the
    pickle's BUILD, so anything a hostile file chooses) kept only where it is a dict of {name: int} dicts."""
    out = OrderedDict(state.items())
    meta = getattr(state, "_metadata", None)
    if isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, dict) and all(
            isinstance(a, str) and type(b) is int for a, b in v.items()) for k, v in meta.items()):
        out._metadata = meta
    return out


def read_tensors(source, refuse: Callable[[str], str], require_zip: bool = False, limit: int | None = MAX_BYTES):
    """torch.load(weights_only=True) of the file canonical_zip rebuilds, after its pickles are checked to call
    nothing but tensor rebuilding and before its tensors are used, checked to declare no more bytes than the
    file holds; any failure becomes one MepfError whose text is `refuse(reason)`. `limit`: the largest file
    read (None: any; generators and snapshots scale with the options that made them)."""
    problem, canonical = canonical_zip(source, require_zip, limit)
    if problem:
        raise MepfError(refuse(problem))
    size = canonical.getbuffer().nbytes
    problem = objects_problem(canonical)
    if problem:
        raise MepfError(refuse(problem))
    try:
        obj = torch.load(canonical, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, or holding objects other than tensors
        raise MepfError(refuse(_reason(e))) from None
    problem = declared_bytes_problem(obj, size)
    if problem:
        raise MepfError(refuse(problem))
    return obj


def _reason(e: Exception) -> str:
    """One printable line: the loader's text can run to many lines, suggests turning weights_only off, and
    quotes names from inside the file (a hostile one can hold terminal control sequences)."""
    if isinstance(e, pickle.UnpicklingError):
        return "it holds objects other than tensors"
    lines = str(e).strip().splitlines()
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in (lines[0] if lines else ""))
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def is_state_dict(obj) -> bool:
    """A dict of ordinary tensors under names, as model.state_dict() gives."""
    return isinstance(obj, dict) and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) and _ordinary(v) for v in obj.values())


def stored_in_full_problem(obj) -> str | None:
    """Why the tensors of a loaded file are not each stored in full in a storage of its own: torch.save keeps
    views, so a few kilobytes could declare gigabytes (a stride-0 view of one element, or one storage under many
    names) that checks and load_state_dict then allocate. None if every tensor is dense, at offset 0, alone in its
    storage, so that what the file declares is bounded by its size."""
    problem, tensors = _tensors(obj)
    if problem:
        return problem
    seen = set()
    for t in tensors:
        if t.numel() == 0:
            continue
        st = t.untyped_storage()
        if t.storage_offset() != 0 or st.nbytes() != t.numel() * t.element_size():
            return "a tensor in it is a view, not stored in full (mepf writes every tensor whole)"
        if st.data_ptr() in seen:
            return "two tensors in it share one storage (mepf writes every tensor whole)"
        seen.add(st.data_ptr())
    return None


def save(obj, path, shown=None) -> None:
    """torch.save to `path` through a Python file, so that a failed write (a full disk, a quota) raises its own
    OSError naming `shown` (default `path`): torch's writer says only "unexpected pos" or "iostream error"."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except (RuntimeError, OSError) as e:
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(shown or path)) from e


def save_atomic(obj, path) -> None:
    """save() to a temporary beside `path`, then renamed over it: `path` holds the old file or the whole new one."""
    from mepf.artifacts.staging import atomic_path

    with atomic_path(path) as tmp:
        save(obj, tmp, shown=path)
