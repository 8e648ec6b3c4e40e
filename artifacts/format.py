"""The released HDF5 file: schema, atomic writing, checksum and a validating reader.

Documented field by field in docs/artifact-format.md.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MepfError
from .feature_spec import FeatureSpec
from .ledger import canonical_json
from .plain_file import memory_bytes, open_plain_file
from .schema import (
    MAX_CLASSES,
    MAX_NAME,
    MAX_TEXT,
    class_names_problem,
    data_spec_problem,
    feature_spec_problem,
    ledger_problem,
)

FORMAT_NAME = "mepf-release"
SCHEMA_VERSION = 1
ARRAY_NAMES = ("S1", "S2", "counts")
TEXT_NAMES = ("feature_spec", "data_spec", "ledger")
ROOT_ATTRS = ("format", "schema_version", "checksum_sha256", "checksum_covers", "description")
ALLOWED_FIELDS = set(ARRAY_NAMES) | set(TEXT_NAMES) | {"class_names"}
DESCRIPTION = "DP-MEPF release: noisy feature sums and class counts; see docs/artifact-format.md"
CHECKSUM_COVERS = ("SHA-256 over, in this order: for each of S1, S2, counts present: name, dtype, shape, "
                   "little-endian C-order bytes; then class_names, feature_spec, data_spec, ledger as UTF-8, "
                   "each prefixed by its name and byte length")


@dataclass
class Release:
    """A loaded released file. Arrays are the noisy releases; nothing in it is exact private data."""

    path: Path
    arrays: dict
    class_names: list
    feature_spec: dict
    data_spec: dict
    ledger: dict
    checksum: str
    file_sha256: str
    #: the size of the bytes read and hashed (the file may have changed since)
    file_bytes: int = 0

    @property
    def features(self) -> FeatureSpec:
        """The feature map, typed (feature_spec is the object as stored)."""
        return FeatureSpec.from_json(self.feature_spec)

    @property
    def private(self) -> bool:
        return self.ledger.get("private", True)

    @property
    def epsilon(self) -> float:
        """The achieved epsilon; inf for a non-private baseline."""
        eps = self.ledger["achieved"]["epsilon"]
        return float("inf") if eps is None else eps

    @property
    def delta(self) -> float:
        return self.ledger["achieved"]["delta"]

    @property
    def moments(self) -> list:
        return [n for n in ("S1", "S2") if n in self.arrays]

    @property
    def labelled(self) -> bool:
        return self.data_spec.get("labelled", False)

    def class_means(self) -> dict:
        """Stage-2 target per moment: S~[c] / max(n~[c], 1) (post-processing)."""
        denom = np.maximum(self.arrays["counts"].astype(np.float64), 1.0)[:, None]
        return {m: self.arrays[m].astype(np.float64) / denom for m in self.moments}

    def label_prior(self) -> np.ndarray:
        """Label prior proportional to max(n~[c], 0); uniform if every noisy count is <= 0."""
        c = np.maximum(self.arrays["counts"].astype(np.float64), 0.0)
        return c / c.sum() if c.sum() > 0 else np.full(len(c), 1.0 / len(c))


def content_checksum(arrays: dict, class_names, feature_spec: str, data_spec: str, ledger: str) -> str:
    h = hashlib.sha256()
    for name in ARRAY_NAMES:
        if name not in arrays:
            continue
        a = np.ascontiguousarray(arrays[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(f"{name}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    for name, text in (("class_names", canonical_json(list(class_names))), ("feature_spec", feature_spec),
                       ("data_spec", data_spec), ("ledger", ledger)):
        b = text.encode("utf-8")
        h.update(f"{name}|{len(b)}|".encode())
        h.update(b)
    return h.hexdigest()


def file_sha256(path) -> str:
    """SHA-256 of the plain file at `path`, opened without blocking (a FIFO at the name is an OSError, not a wait)."""
    problem, f = open_plain_file(path)
    if problem:
        raise OSError(f"{path}: {problem}")
    with f:
        return fd_sha256(f.fileno())


def fd_sha256(fd: int, limit: int | None = None) -> str:
    """SHA-256 of the open file itself, whatever its name now points to; OSError where it holds more than `limit`
    bytes (one that grew while it was read)."""
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
        if limit is not None and offset > limit:
            raise OSError(f"the file grew past {limit:,} bytes while it was read")
    return h.hexdigest()


def _open_regular(path: Path) -> int:
    """The release file itself, opened read-only without following a symbolic link at its name, and checked
    to be a regular file (not a FIFO that would block, not a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MepfError(f"{path} does not exist; pass the .h5 file written by `mepf embed`") from None
    except OSError as e:
        if os.path.islink(path):
            raise MepfError(f"{path} is a symbolic link; mepf reads a release only as the file itself: pass "
                            f"{os.path.realpath(path)} if that is the release you mean") from None
        raise MepfError(f"{path} cannot be read ({type(e).__name__}); pass the .h5 file written by `mepf embed`"
                        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MepfError(f"{path} is not a file; pass the .h5 file written by `mepf embed`")
    return fd


_ATTR_KINDS = {"format": "text", "schema_version": "int", "checksum_sha256": "text", "checksum_covers": "text",
               "description": "text"}


def _attr(f, name: str, path: Path):
    """A root attribute, checked to be a scalar of its kind before its value is read."""
    import h5py

    aid = f.attrs.get_id(name)
    dt = aid.dtype
    scalar = aid.shape == ()
    if _ATTR_KINDS[name] == "int":
        ok = scalar and dt.kind in "iu"
    else:
        info = h5py.check_string_dtype(dt)
        ok = scalar and info is not None and (info.length is None or info.length <= 65536)
    if not ok:
        raise MepfError(f"{path} is not an mepf release: its attribute {name} is not a scalar {_ATTR_KINDS[name]}; "
                        "pass a file written by `mepf embed`")
    value = f.attrs[name]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _dataset(f, name: str, path: Path, size: int):
    """The dataset `name`, checked to be stored inside this file as the writer stores it (no link other than
    a hard one, no external storage, no virtual dataset, no filter, no attribute, allocated storage that the
    file holds) before any of its data is read."""
    import h5py

    link = f.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise MepfError(f"{path} is not a plain mepf release: {name} is a {type(link).__name__}, which would read "
                        "another file; mepf reads only what is stored inside the file")
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise MepfError(f"{path} is not an mepf release: {name} is not a dataset")
    plist = obj.id.get_create_plist()
    if obj.is_virtual or obj.external or plist.get_nfilters() or plist.get_layout() not in (h5py.h5d.CONTIGUOUS,
                                                                                           h5py.h5d.COMPACT):
        raise MepfError(f"{path} is not a plain mepf release: {name} is stored virtually, externally, in chunks or "
                        "through filters, which mepf never writes; ask the data owner for the original file")
    if len(obj.attrs):
        raise MepfError(f"{path} is not an mepf release: {name} carries attributes, which mepf never writes")
    stored = obj.id.get_storage_size()
    if stored > size:
        raise MepfError(f"{path} is damaged: {name} claims more bytes than the file holds")
    return obj


def _numbers(f, name: str, path: Path, size: int, shape: tuple) -> np.ndarray:
    ds = _dataset(f, name, path, size)
    if ds.dtype.kind != "f" or ds.dtype.itemsize != 4 or ds.shape != shape:
        raise MepfError(f"{path} is not a valid mepf release: {name} is {ds.dtype} {list(ds.shape)}, the schema "
                        f"says float32 {list(shape)}; ask the data owner for the original file")
    if ds.id.get_storage_size() != int(np.prod(shape)) * 4:  # unallocated storage would read as fill values
        raise MepfError(f"{path} is damaged: {name} does not hold its data; ask the data owner for the original file")
    return ds[()]


def _text(f, name: str, path: Path, size: int) -> str:
    import h5py

    ds = _dataset(f, name, path, size)
    info = h5py.check_string_dtype(ds.dtype)
    if ds.shape != () or info is None or (info.length is not None and info.length > MAX_TEXT):
        raise MepfError(f"{path} is not a valid mepf release: {name} is not one text; ask the data owner for the "
                        "original file")
    text = ds.asstr()[()]
    if len(text) > MAX_TEXT:
        raise MepfError(f"{path} is not a valid mepf release: {name} is longer than {MAX_TEXT:,} characters")
    return text


def _names(f, path: Path, size: int) -> list:
    import h5py

    ds = _dataset(f, "class_names", path, size)
    info = h5py.check_string_dtype(ds.dtype)
    if len(ds.shape) != 1 or not 1 <= ds.shape[0] <= MAX_CLASSES or info is None or (
            info.length is not None and info.length > 4 * MAX_NAME):
        raise MepfError(f"{path} is not a valid mepf release: class_names is not a list of 1 to {MAX_CLASSES:,} texts")
    if ds.id.get_storage_size() == 0:
        raise MepfError(f"{path} is damaged: class_names does not hold its data")
    return [str(n) for n in ds.asstr()[()]]


def inspect_structure(f, path: Path, size: int) -> dict:
    """The file's structure checked against the schema, and the values stored as variable-length strings
    (root attributes, the three JSON texts, class names), which HDF5 allocates by their stored lengths before
    any bound can be applied: run only in a child process with a memory cap (`_inspect_in_child`)."""
    attrs = set(f.attrs.keys())
    if "format" not in attrs or _attr(f, "format", path) != FORMAT_NAME:
        raise MepfError(f"{path} is not an mepf release; pass a file written by `mepf embed`")
    version = int(_attr(f, "schema_version", path)) if "schema_version" in attrs else -1
    if version != SCHEMA_VERSION:
        raise MepfError(f"{path} has schema version {version}, this mepf reads version {SCHEMA_VERSION}; "
                        "use the mepf version that wrote it")
    extra = sorted(set(f.keys()) - ALLOWED_FIELDS) + [f"@{a}" for a in sorted(attrs - set(ROOT_ATTRS))]
    if extra:
        shown = ", ".join(printable(e) for e in extra[:5])
        raise MepfError(f"{path} holds {shown}, which is not in the schema of an mepf release; ask the data owner "
                        "for the original file")
    missing = [n for n in ("S1", "counts", "class_names", *TEXT_NAMES) if n not in f]
    if missing or "checksum_sha256" not in attrs:
        raise MepfError(f"{path} lacks {', '.join(missing) or 'its checksum'}; the file is incomplete, re-run "
                        "`mepf embed`")
    for name, text in (("description", DESCRIPTION), ("checksum_covers", CHECKSUM_COVERS)):
        # outside the checksum, and what h5dump shows a person: only the one text mepf writes
        if name not in attrs or _attr(f, name, path) != text:
            raise MepfError(f"{path}: its {name} attribute is not the text mepf writes (edited, so that a person "
                            "reading the file with HDF5 tools would read another claim than mepf checks); ask the "
                            "data owner for the original file")
    for name in ARRAY_NAMES:
        if name in f:
            _dataset(f, name, path, size)
    return {"checksum": str(_attr(f, "checksum_sha256", path)),
            "texts": {n: _text(f, n, path, size) for n in TEXT_NAMES},
            "class_names": _names(f, path, size)}


#: the child that reads a release's strings may use this much address space (bytes), and this much CPU time
INSPECT_MEMORY, INSPECT_SECONDS = 512 << 20, 120


def _inspect_in_child(fd: int, path: Path) -> dict:
    """inspect_structure in a fresh process whose address space is capped: a few kilobytes of file whose
    strings claim gigabytes make the child fail, not this process (which may hold a model, or the data)."""
    import subprocess
    import sys

    # -I: nothing from the working directory or the environment is imported (a folder named mepf beside a
    # release would otherwise be the mepf the child runs); this process's own import path is passed instead
    here = {"", ".", os.getcwd()}
    paths = [p for p in sys.path if p not in here and os.path.abspath(p) != os.getcwd()]
    boot = "import sys, json; sys.path[:] = json.loads(sys.argv[1]); from mepf.artifacts.inspect import main; main()"
    # one BLAS thread: each thread reserves address space, and the cap must be the file's, not the cores'
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2"}
    try:
        p = subprocess.run([sys.executable, "-I", "-c", boot, json.dumps(paths), str(fd), str(path)], pass_fds=(fd,),
                           capture_output=True, timeout=INSPECT_SECONDS * 2, stdin=subprocess.DEVNULL, env=env,
                           cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MepfError(f"{path} could not be inspected ({type(e).__name__}); ask the data owner for the original "
                        "file") from None
    try:
        out = json.loads(p.stdout.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        out = None
    if not isinstance(out, dict) or ("error" not in out and "ok" not in out):
        raise MepfError(f"{path} could not be read as an mepf release: reading it exceeded the bounds a release "
                        "needs (memory or time); ask the data owner for the original file")
    if "error" in out:
        raise MepfError(str(out["error"]))
    return out["ok"]


def _canonical_or_none(obj) -> str | None:
    try:
        return canonical_json(obj)
    except (ValueError, TypeError, RecursionError):  # NaN or Infinity, which the writer never writes
        return None


def _read_checked(f, path: Path, size: int, meta: dict) -> tuple:
    """The strings (read by the child), checked against the schema; then the arrays, whose shapes, types and
    storage are checked before they are read."""
    texts, class_names = meta["texts"], meta["class_names"]
    if not (isinstance(texts, dict) and set(texts) == set(TEXT_NAMES)
            and all(isinstance(t, str) for t in texts.values()) and isinstance(class_names, list)):
        raise MepfError(f"{path} could not be read as an mepf release; ask the data owner for the original file")
    try:
        specs = {n: json.loads(t) for n, t in texts.items()}
    except (json.JSONDecodeError, RecursionError) as e:
        raise MepfError(f"{path}: a JSON field is corrupt ({type(e).__name__}); the file cannot be trusted") from None
    # the writer's one form: a text with a key twice (or other spacing or spelling) reads one way to json.loads (the
    # last value) and another to a person or a tool reading the stored text (the first)
    bent = [n for n, t in texts.items() if _canonical_or_none(specs[n]) != t]
    if bent:
        raise MepfError(f"{path}: its {bent[0]} is not the JSON text mepf writes (a key given twice, say, which "
                        "readers take differently); the file cannot be trusted: ask the data owner for the original "
                        "file")
    problem = (class_names_problem(class_names) or feature_spec_problem(specs["feature_spec"])
               or data_spec_problem(specs["data_spec"], len(class_names), specs["feature_spec"])
               or ledger_problem(specs["ledger"]))
    if problem:
        raise MepfError(f"{path} is not a valid mepf release: it holds {problem}; ask the data owner for the "
                        "original file")
    k, d = len(class_names), specs["feature_spec"]["dim"]
    arrays = {"counts": _numbers(f, "counts", path, size, (k,))}
    for name in ("S1", "S2"):
        if name in f:
            arrays[name] = _numbers(f, name, path, size, (k, d))
    return arrays, class_names, texts, specs, str(meta["checksum"])


def printable(text: str, longest: int = 60) -> str:
    """A name from a file, safe to print on one line."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= longest else text[:longest] + "..."


def no_hdf5_plugins() -> None:
    """Empty HDF5's plugin search path in this process (its folders and $HDF5_PLUGIN_PATH): no file read after
    it can make HDF5 load a library (a filter it lacks, on a dataset or on a group's link storage, fails)."""
    from h5py import h5pl

    while h5pl.size():
        h5pl.remove(0)


def _other_kind(head: bytes) -> str | None:
    """What a file given where a release is expected is, from its first bytes, if it is one mepf writes."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a generator.pt or an .npz of images), not a release"
    if head.lstrip()[:1] == b"{":
        return "a JSON text (a release log, or a run's options or stats), not a release"
    return None


@contextlib.contextmanager
def _h5(fd: int, path: Path):
    """h5py on the open file `fd` (never on its name), with no HDF5 plugin loadable."""
    import h5py

    no_hdf5_plugins()
    with os.fdopen(os.dup(fd), "rb") as fo:
        try:
            f = h5py.File(fo, "r")
        except Exception as e:  # noqa: BLE001 - h5py raises OSError and others for non-HDF5 bytes
            what = _other_kind(os.pread(fd, 8, 0)) or \
                f"not a readable HDF5 file (truncated or corrupt?) ({type(e).__name__})"
            raise MepfError(f"{path} is {what}; pass the .h5 file written by `mepf embed`") from None
        with f:
            yield f


def inspect_fd(fd: int, path: Path) -> dict:
    """What the child of _inspect_in_child runs on the inherited descriptor."""
    with _h5(fd, path) as f:
        return inspect_structure(f, path, os.fstat(fd).st_size)


#: times a release is copied whole while only its inode's change time moves, before it is refused
READ_TRIES = 3


def _private_file(path: Path) -> tuple:
    """(descriptor, whether it is sealable memory): a new file no name leads to (sealable memory on Linux, an
    unlinked temporary file elsewhere), to copy the release at `path` into."""
    if hasattr(os, "memfd_create") and hasattr(os, "MFD_ALLOW_SEALING"):
        import fcntl

        with contextlib.suppress(OSError):  # a kernel or sandbox without it
            fd = os.memfd_create("mepf-release", getattr(os, "MFD_CLOEXEC", 0) | os.MFD_ALLOW_SEALING)
            try:
                if fcntl.fcntl(fd, fcntl.F_GET_SEALS) == 0:  # sealable: else the fallback below
                    return fd, True
            except OSError:
                pass
            os.close(fd)
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix="mepf-release-")
    except OSError as e:
        raise MepfError(f"{path} could not be read: no private copy of it could be made under {tempfile.gettempdir()} "
                        f"({e.strerror or type(e).__name__}); set TMPDIR to a writable folder") from None
    try:
        os.unlink(name)
    except OSError:
        os.close(fd)
        raise
    return fd, False


#: the copy leaves out runs of zero bytes this long, aligned (a filesystem's block, a memory page)
HOLE = 4096


def _copy(src: int, dst: int, most: int) -> int:
    """The bytes of `src`, at most `most` of them, written at the same offsets of the empty file `dst`; the number
    copied. Aligned blocks of HOLE zeros are left as holes (which read as zeros and take no memory): a file padded
    with a hole, or with zeros, costs what it holds on disk at most, not the size it claims."""
    offset, zeros = 0, bytes(1 << 20)
    while offset < most and (chunk := os.pread(src, min(1 << 20, most - offset), offset)):
        if chunk == zeros[:len(chunk)]:  # a hole, or zeros: nothing written
            offset += len(chunk)
            continue
        data = np.frombuffer(chunk, dtype=np.uint8)
        pages, whole = -(-len(chunk) // HOLE), len(chunk) // HOLE
        kept = np.empty(pages, dtype=bool)
        kept[:whole] = data[:whole * HOLE].view(np.uint64).reshape(whole, HOLE // 8).any(axis=1)
        if pages > whole:
            kept[whole] = data[whole * HOLE:].any()
        # runs of kept blocks: [start, end) in blocks
        edges = np.flatnonzero(np.diff(np.concatenate(([False], kept, [False])).astype(np.int8)))
        view = memoryview(chunk)
        for start, end in zip(edges[::2], edges[1::2]):
            part, at = view[start * HOLE:min(end * HOLE, len(chunk))], offset + start * HOLE
            while part:
                n = os.pwrite(dst, part, at)
                part, at = part[n:], at + n
        offset += len(chunk)
    os.ftruncate(dst, offset)
    return offset


def _seal(snap: int, sealable: bool, path: Path) -> None:
    """No process, this one's children or another of the same user (through /proc/PID/fd), can write the copy after
    it was made: what is parsed is what is hashed. A memory file that cannot be sealed (another process mapped it
    for writing, or sealed it, while it was made) is refused; the fallback's temporary file is made read-only,
    which closes it to new openers only (where there is no memfd_create there is usually no /proc to open it
    through either)."""
    if not sealable:
        os.fchmod(snap, 0o400)
        return
    import fcntl

    needed = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
    with contextlib.suppress(OSError):
        fcntl.fcntl(snap, fcntl.F_ADD_SEALS, needed | fcntl.F_SEAL_SEAL)
    try:
        seals = fcntl.fcntl(snap, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & needed != needed:  # another process sealed it partly first (then it can still resize it), or mapped it
        raise MepfError(f"{path}: the private copy it is read from could not be sealed (another process mapped or "
                        "sealed it while it was made); read it again, and find what opens mepf's files")


_ROOM = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT)


def _snapshot(fd: int, path: Path) -> int:
    """A private copy of the open release, sealed, which everything after reads (the child's strings, the arrays,
    the hash): what is parsed is what is hashed, even where a rewrite leaves the file's times as they were (1 s
    timestamps). A copy during which the file changed is refused, or made again where only its inode changed; a
    file larger than half the memory is refused before a byte is copied."""
    memory = memory_bytes()
    for _ in range(READ_TRIES):
        before = os.fstat(fd)
        if memory and before.st_size > memory // 2:
            raise MepfError(f"{path} has {before.st_size:,} bytes, more than half of the memory this process may use "
                            f"({memory:,} bytes), and reading a release takes about twice its size; read it on a "
                            "machine with more memory")
        snap, sealable = _private_file(path)
        try:
            copied = _copy(fd, snap, before.st_size + 1)  # one byte more shows a file that grew
            _seal(snap, sealable, path)
        except OSError as e:
            os.close(snap)
            if e.errno in _ROOM:
                raise MepfError(f"{path}: no room for the private copy it is read from ({before.st_size:,} bytes, in "
                                "memory, or under $TMPDIR where memory files are missing); free some and try again"
                                ) from None
            raise MepfError(f"{path} could not be read: copying it failed ({e.strerror or type(e).__name__}); read it "
                            "again, or from another disk") from None
        except BaseException:  # Ctrl-C, MemoryError: the copy, up to half the memory, must not outlive the read
            os.close(snap)
            raise
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or copied != after.st_size:
            os.close(snap)
            raise MepfError(f"{path} was modified while it was read; read it again once nothing writes to it")
        if after.st_ctime_ns == before.st_ctime_ns:  # utime cannot set ctime: nothing was rewritten
            return snap
        # only the inode changed (a link made or removed, a chmod: a backup tool), or a rewrite put its mtime
        # back: the copy may mix two versions, so it is made again
        os.close(snap)
    raise MepfError(f"{path} changed (its inode: a link, a chmod, or a rewrite with its time put back) each of "
                    f"{READ_TRIES} times it was read; read it again once nothing touches it")


def read_raw(path) -> Release:
    """Read every field without verifying the checksum (the audit reports that itself). The file's structure,
    types and bounds are enforced before any data is read (docs/artifact-format.md, "What a reader
    enforces"): a hostile file is refused in one line, never followed to another file or allowed to make
    this process allocate more than the file holds."""

    path = Path(path)
    fd = _open_regular(path)
    snap = None
    try:
        snap = _snapshot(fd, path)
        os.close(fd)
        fd = None
        size = os.fstat(snap).st_size
        meta = _inspect_in_child(snap, path)  # the strings, in a process of bounded memory
        with _h5(snap, path) as f:
            arrays, class_names, texts, specs, checksum = _read_checked(f, path, size, meta)
        sha = fd_sha256(snap)
    except MepfError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure of a reader on a hostile file is one line
        raise MepfError(f"{path} could not be read as an mepf release (truncated or corrupt?) ({type(e).__name__}); "
                        "ask the data owner for the original file") from None
    finally:
        for d in (fd, snap):
            if d is not None:
                os.close(d)
    release = Release(path=path, arrays=arrays, class_names=class_names, feature_spec=specs["feature_spec"],
                      data_spec=specs["data_spec"], ledger=specs["ledger"], checksum=checksum, file_sha256=sha,
                      file_bytes=size)
    release._texts = texts
    return release


def recompute_checksum(release: Release) -> str:
    t = release._texts
    return content_checksum(release.arrays, release.class_names, t["feature_spec"], t["data_spec"], t["ledger"])


def moments_match(release: Release) -> bool:
    """The arrays are the data spec's moments: S1 always, S2 exactly when the moments are not the mean alone."""
    return "S1" in release.arrays and (release.data_spec.get("moments") == "mean") != ("S2" in release.arrays)


def load(path, verify: bool = True) -> Release:
    """Load a released file, validating its schema and (by default) its checksum."""
    release = read_raw(path)
    if verify and recompute_checksum(release) != release.checksum:
        raise MepfError(f"{path}: checksum mismatch: the arrays or ledger were altered after release; "
                        "do not use this file, ask the data owner for the original")
    bad = [n for n, a in release.arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise MepfError(f"{path}: {', '.join(bad)} hold NaN or infinite values, which no release has; do not use "
                        "this file, ask the data owner for the original")
    led = {r["name"]: r.get("shape") for r in release.ledger["releases"]}
    if not moments_match(release) or set(led) != set(release.arrays) or any(
            led[n] != list(a.shape) for n, a in release.arrays.items()):
        raise MepfError(f"{path}: its ledger accounts for {', '.join(sorted(led))}, it holds "
                        f"{', '.join(sorted(release.arrays))} ({printable(release.data_spec.get('moments'))}): what "
                        "the ledger does not cover "
                        "has no guarantee; do not use this file, ask the data owner for the original (mepf audit "
                        "shows the mismatch)")
    from .guarantee import problem  # here: guarantee imports this module

    wrong = problem(release)
    if wrong:
        raise MepfError(f"{path}: its ledger states a guarantee its own numbers do not give ({printable(wrong, 300)}); "
                        "do not use this file, ask the data owner for the original (mepf audit shows every check)")
    return release
