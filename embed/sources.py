"""Private data sources: what a source is, and which one `--data` names.

A source streams (records, labels) batches and is never loaded whole: records as a uint8 (or float
in [0, 1]) (B, H, W, C) array, or a list of (H, W, C) arrays when they differ in size or channels;
labels as int64 (B,) or None. Each source declares its label set before reading, and the geometry of
the release comes from declared options alone (see `declared_geometry`): the shape of what is released
never depends on the records. The user's own files are in files.py, named public datasets in datasets.py.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import printable


class Source:
    """Base: `classes` (None when unlabelled), `description` (never a path), `geometry`."""

    classes: list | None = None
    description: str = ""

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
        """The identities (`file_identity`) of the files whose byte positions are the records (an array file, IDX
        or CIFAR batch files), taken when the source was made; None where each record is a file of its own. The
        ranks of one node compare them before any record is read (embed/plan.py)."""
        return None

    def batches(self, batch_size: int) -> Iterator:
        for _, records, labels in self.blocks(batch_size):
            yield records, labels


def files_digest(paths, identities=None) -> str:
    """SHA-256 over the bytes of `paths`, in order (a read of the files, no decoding). With `identities` (a
    single-file source's, taken when it was made), each file must be that one before and after it is hashed: the
    digest then describes the bytes every later read of the source finds."""
    h = hashlib.sha256(b"mepf-files-v1")
    for i, path in enumerate(paths):
        try:
            with (open_unchanged(path, identities[i]) if identities else open(path, "rb")) as f:
                h.update(f"|{os.fstat(f.fileno()).st_size}|".encode())
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                if identities:
                    check_unchanged(f.fileno(), identities[i], path)
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
        with open(path, "rb") as f:
            return file_identity(os.fstat(f.fileno()))
    except OSError as e:
        raise MepfError(f"cannot read {path} ({type(e).__name__}); check that it exists and is readable") from None


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
        f = open(path, "rb")
    except OSError as e:
        raise MepfError(f"cannot read {path} ({type(e).__name__}); fix its permissions") from None
    try:
        check_unchanged(f.fileno(), identity, path)
    except MepfError:
        f.close()
        raise
    return f


def kept(keep, b: int) -> bool:
    return keep is None or keep(b)


def declared_geometry(source: Source, image_size, channels) -> tuple:
    """((H, W), C) of the release: the options where given, else the container's fixed geometry. An image
    folder fixes none, so both options are required for it: the size and mode of any one image never
    decide the release's shape."""
    fixed = source.geometry
    if fixed is None and (image_size is None or channels is None):
        raise MepfError("an image folder needs its geometry declared: pass --image-size (N or HxW) and --channels "
                        "(1 or 3); every image is converted and resized to it, whatever its own size and mode")
    size = tuple(image_size) if image_size is not None else tuple(fixed[:2])
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
