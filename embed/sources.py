"""Private data sources: what a source is, and which one `--data` names.

A source streams (records, labels) batches and is never loaded whole: records as a uint8 (or float
in [0, 1]) (B, H, W, C) array, or a list of (H, W, C) arrays when they differ in size or channels;
labels as int64 (B,) or None. Each source declares its label set before reading, and the geometry of
the release comes from declared options alone (see `declared_geometry`): the shape of what is released
never depends on the records. The user's own files are in files.py, named public datasets in datasets.py.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import printable
from mepf.artifacts.plain_file import open_nonblocking
from mepf.artifacts.schema import trainable_geometry_problem


class Replaced:
    """What a source yields in place of a record it cannot give as it is (under --bad-records zero an image that
    cannot be decoded or a float record with a value outside [0,1]; in either mode a PNG above the decoding cap):
    the pass embeds the black image for it (pixels_of), and the fingerprint counts it as `identity`
    (fingerprint.replaced_identity: that record's own), so that such records are told apart as any others are."""

    __slots__ = ("identity",)

    def __init__(self, identity: bytes):
        self.identity = identity


#: what a Replaced record is embedded as: one black pixel, resized and converted like any record
BLACK = np.zeros((1, 1, 1), np.uint8)


def pixels_of(records):
    """`records` as the transform takes them: each Replaced one as BLACK (a block holding one is a list)."""
    if isinstance(records, list) and any(isinstance(r, Replaced) for r in records):
        return [BLACK if isinstance(r, Replaced) else r for r in records]
    return records


class Source:
    """Base: `classes` (None when unlabelled), `description` (never a path), `geometry`, and `bad_records`: under
    "stop" a record that cannot be embedded as it is raises; under "zero" it is yielded as Replaced, and a label
    outside the declared set as it is stored (loader.py and release.py apply the fixed rules)."""

    classes: list | None = None
    description: str = ""
    bad_records: str = "stop"

    @property
    def geometry(self) -> tuple | None:
        """(H, W, C) that the container fixes for every record (an array's shape, a named dataset's
        declaration); None where records may differ (an image folder): the user must then declare it."""
        return None

    def __len__(self) -> int:
        """The number of records, known before any is read (files listed, an array's length)."""
        raise NotImplementedError

    def blocks(self, block_size: int, keep=None) -> Iterator:
        """(block index, records, labels) for each block of `block_size` consecutive records, in a fixed
        order; a block for which keep(index) is false is skipped without decoding its records. Opens its
        files itself, so that a copy of the source in another process (a DataLoader worker) works."""
        raise NotImplementedError

    def listing_digest(self) -> str:
        """SHA-256 of what decides which record is where: the listing (names, labels, sizes) or the bytes of
        the files the source reads. Ranks compare it before any record is read (embed/plan.py)."""
        raise NotImplementedError

    def file_identity(self) -> tuple | None:
        """The identities (`file_identity`) of the files the records are read from, taken when the source was made:
        an array file's, IDX or CIFAR batch files'; for an image folder a digest of its listing and every image's
        identity. The ranks of one node compare them before any record is read (embed/plan.py)."""
        return None

    def batches(self, batch_size: int) -> Iterator:
        for _, records, labels in self.blocks(batch_size):
            yield records, labels


def files_digest(paths, identities=None, listed: bool = False) -> str:
    """SHA-256 over the bytes of `paths`, in order (a read of the files, no decoding). With `identities` (a
    single-file source's, taken when it was made; or, `listed`, a folder's images' `listed_identities`), each file
    must be that one before and after it is hashed: the digest then describes the bytes every later read of the
    source finds."""
    h = hashlib.sha256(b"mepf-files-v1")
    opener, check = (open_listed, check_listed) if listed else (open_unchanged, check_unchanged)
    for i, path in enumerate(paths):
        try:
            with (opener(path, identities[i]) if identities is not None else open(path, "rb")) as f:
                h.update(f"|{os.fstat(f.fileno()).st_size}|".encode())
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                if identities is not None:
                    check(f.fileno(), identities[i], path)
        except OSError as e:
            raise MepfError(f"cannot read {path} ({type(e).__name__}); fix its permissions") from None
    return h.hexdigest()


def file_identity(st: os.stat_result) -> tuple:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime and ctime (which no one can
    set back without the clock)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stat_identity(path) -> tuple:
    """The identity of the file at `path`, from an open handle (as every later check takes it: on some overlay
    filesystems stat of a path and fstat of its handle name different inodes)."""
    try:
        with open_nonblocking(path) as f:
            st = os.fstat(f.fileno())
    except OSError as e:
        raise MepfError(f"cannot read {path} ({type(e).__name__}); check that it exists and is readable") from None
    if not stat.S_ISREG(st.st_mode):
        raise MepfError(f"{path} is not a plain file (a FIFO, device or folder); pass the data file itself")
    return file_identity(st)


def check_unchanged(fd: int, identity: tuple, path) -> None:
    """A single-file source's records are its byte positions, read by several workers and ranks each through its
    own handle: a file replaced by a reordered copy, or rewritten, between their opens would make them read one
    record twice and another not at all, at the same record count. Every open and the end of every pass check
    that the file is the one the plan was made of."""
    if file_identity(os.fstat(fd)) != identity:
        raise MepfError(f"--data {printable(Path(path).name)} changed while it was read (replaced or rewritten); "
                        "nothing was released; run again on data that is not being modified")


def open_unchanged(path, identity: tuple):
    """The file opened for reading, checked to be the one `identity` was taken of."""
    try:
        f = open_nonblocking(path)
    except OSError as e:
        raise MepfError(f"cannot read {path} ({type(e).__name__}); fix its permissions") from None
    return _checked(f, check_unchanged, identity, path)


def _checked(f, check, identity, path):
    """`f`, once check(its fd, identity, path) passes; closed if it does not."""
    try:
        check(f.fileno(), identity, path)
    except MepfError:
        f.close()
        raise
    return f


#: a folder's image as listed, one numpy record each (a folder may list hundreds of thousands, and every DataLoader
#: worker holds a copy): device and inode (to find second names), and a hash of the whole `file_identity` (whose
#: times may lie outside int64's nanoseconds: ext4 stores dates from 1901 to 2446)
IDENTITY = [("dev", "<u8"), ("ino", "<u8"), ("h0", "<u8"), ("h1", "<u8")]


def _identity_record(st: os.stat_result) -> tuple:
    d = hashlib.blake2b(repr(file_identity(st)).encode(), digest_size=16).digest()
    return (st.st_dev, st.st_ino, int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little"))


def listed_identities(paths, root):
    """The identity of each listed file (each a record), from an open handle as every later read takes it (no link
    followed, a FIFO not waited on): what every read must find at that name. Refused: a name that is not a plain
    file; a file on another filesystem than the data folder `root` (two mounts of one share, or two overlays of one
    folder, would show one file under two names with different device numbers); a file with two names."""
    import numpy as np

    try:
        device = os.stat(root).st_dev
    except OSError as e:
        raise MepfError(f"--data {root}: {e.strerror or e}") from None
    out = np.empty(len(paths), dtype=IDENTITY)
    seen = {}
    for i, p in enumerate(paths):
        try:
            with open_nonblocking(p, follow=False) as f:
                st = os.fstat(f.fileno())
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise MepfError(f"symbolic link in the data folder: {p}; replace it with the file it names (a link "
                                "could count an image twice)") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise MepfError(f"cannot read image {p} ({type(e).__name__}); fix its permissions") from None
            raise MepfError(f"{p}: {e.strerror or e}; was the folder changed while mepf listed it? Run again when "
                            "it is settled") from None
        if not stat.S_ISREG(st.st_mode):
            raise MepfError(f"{p} is not a plain file (a special file put in its place while mepf listed the "
                            "folder); replace it with the image itself")
        if st.st_dev != device:
            raise MepfError(f"{p} is on another filesystem than the data folder (a mount inside it could show one "
                            "file under two names); copy the data into one filesystem")
        first = seen.setdefault((st.st_dev, st.st_ino), p)
        if first is not p:
            raise MepfError(f"{p} and {first} are one file (hard links); keep one name: mepf would count its image "
                            "twice")
        out[i] = _identity_record(st)
    return out


def _changed(path, how: str) -> MepfError:
    path = Path(path)  # its class folder and name: a long path would be cut before the name
    return MepfError(f"image {printable(f'{path.parent.name}/{path.name}')} changed while it was read ({how}); nothing "
                     "was released; run again on data that is not being modified")


def check_listed(fd: int, identity, path) -> None:
    """The file open at `fd` is the one the listing found at `path` (`identity`: its `listed_identities` record,
    a numpy record whose item() is `_identity_record`'s tuple)."""
    if _identity_record(os.fstat(fd)) != identity.item():
        raise _changed(path, "replaced, renamed, rewritten, or its permissions changed")


def open_listed(path, identity):
    """An image of a folder opened for reading, checked to be the file the listing found at that name: a folder
    whose images were swapped, renamed or replaced by links after the listing would have workers and ranks read
    one record twice and another never, at the same count. Links are not followed; a FIFO does not block."""
    try:
        f = open_nonblocking(path, follow=False)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _changed(path, "replaced by a link") from None
        raise MepfError(f"cannot read image {printable(str(path))} ({type(e).__name__}); was the folder changed "
                        "while mepf read it? Run again when it is settled") from None
    return _checked(f, check_listed, identity, path)


def kept(keep, b: int) -> bool:
    return keep is None or keep(b)


def refuse_untrainable(size) -> None:
    """A once-only release at a geometry no mepf generator draws would spend the budget on nothing: refused."""
    if (problem := trainable_geometry_problem(*size)) is not None:
        raise MepfError(f"{problem}: no generator could be trained from this release; pass --image-size N of a size "
                        "one draws (e.g. 28, 32, 64 or 256) to resize the images")


def declared_geometry(source: Source, image_size, channels) -> tuple:
    """((H, W), C) of the release: the options where given, else the container's fixed geometry. An image
    folder fixes none, so both options are required for it: the size and mode of any one image never
    decide the release's shape."""
    fixed = source.geometry
    if fixed is None and (image_size is None or channels is None):
        given = [v is not None for v in (image_size, channels)]
        missing = [w for w, g in zip(("--image-size (N or HxW)", "--channels (1 or 3)"), given) if not g]
        raise MepfError(f"an image folder needs its geometry declared: pass {' and '.join(missing)}"
                        f"{' too' if any(given) else ''}; every image is converted and resized to it, whatever its "
                        "own size and mode")
    size = tuple(image_size) if image_size is not None else tuple(fixed[:2])
    if min(size) < 8 or max(size) > 1024:  # --image-size is ranged so; an array's own size is not
        raise MepfError(f"the images are {size[0]} x {size[1]} and mepf embeds 8 to 1024 px a side; pass "
                        "--image-size N (or HxW) to resize them")
    refuse_untrainable(size)
    return size, int(channels) if channels is not None else int(fixed[2])


def open_source(data: str, classes=None, data_root=None, strict: bool = True, private: bool = True) -> Source:
    """--data: a folder, an .npz/.h5 file, or a named dataset. strict=False: a folder's files that are not
    images are kept aside (`not_images`) instead of refused, for `mepf embed --check`. private=False (evaluate's
    public images): a folder may hold links, since counting an image twice there breaks no guarantee."""
    from .datasets import named_source
    from .files import ArraySource, FolderSource
    from .options import DATASETS

    p = Path(data)
    if p.is_dir():
        if classes is not None:
            raise MepfError("--classes is for .npz/.h5 data; an image folder declares its classes by its subfolders")
        return FolderSource(p, strict=strict, links_ok=not private)
    if p.suffix.lower() in (".npz", ".h5", ".hdf5"):
        return ArraySource(p, classes)
    if data.partition(":")[0] in DATASETS:
        if classes is not None:
            raise MepfError(f"--classes is for .npz/.h5 data; {data} declares its own classes")
        return named_source(data, data_root)
    if p.exists() or p.is_symlink():
        raise MepfError(f"--data {data}: a single file that is not an .npz or .h5 is no dataset; pass the folder "
                        "that holds the images (one subfolder per class), or an .npz/.h5 of them")
    if os.sep in data or p.suffix:
        raise MepfError(f"--data {data}: no such file or folder")
    raise MepfError(f"--data {data}: not a folder, .npz/.h5 file or known dataset ({', '.join(DATASETS)})")


def parse_classes(text: str | None) -> list | None:
    """--classes: a count ('10') or comma-separated names ('cat,dog')."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        k = int(text)
        if k < 1:
            raise MepfError("--classes must be at least 1")
        return [str(i) for i in range(k)]
    names = [s.strip() for s in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise MepfError(f"--classes {text!r}: give a count or distinct, non-empty comma-separated names")
    return names
