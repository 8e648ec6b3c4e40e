"""Data sources stream the declared records with the declared label set."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from mepf.artifacts.errors import MepfError
from mepf.embed.datasets import DEBIAN_FASHION_DIRS, named_source
from mepf.embed.files import ArraySource, FolderSource
from mepf.embed.sources import open_source
from tests import npz_shards
from tests.conftest import fails_if_blocked, make_images


def collect(src, bs=7):
    xs, ys = [], []
    for x, y in src.batches(bs):
        assert len(x) <= bs
        xs.append(np.asarray(x))
        ys.append(y)
    return np.concatenate(xs), (np.concatenate(ys) if ys[0] is not None else None)


def test_npz_and_h5_stream_the_same_records(tmp_path, labelled_npz):
    path, x, y = labelled_npz
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"], f["labels"] = x, y
    for p in (path, tmp_path / "d.h5"):
        xs, ys = collect(ArraySource(p, ["a", "b", "c"]))
        np.testing.assert_array_equal(xs, x)
        np.testing.assert_array_equal(ys, y)
    np.savez_compressed(tmp_path / "c.npz", images=x[..., 0], labels=y)
    xs, _ = collect(ArraySource(tmp_path / "c.npz", ["a", "b", "c"]), bs=5)
    np.testing.assert_array_equal(xs, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_first_arrays_stream_the_records_channels_last_ones_do(tmp_path, channels):
    """(N, C, H, W), torch's layout and DPImageBench's gen.npz (x float32 in [0, 1]), was refused; it now reads as
    the same records, with the same hashes (so the release log sees one dataset whatever its layout). A shape
    whose last axis is 1 or 3 stays channels-last; a fourth axis that fits neither is refused."""
    from mepf.embed.fingerprint import record_hash

    x = make_images(12, seed=5, channels=channels)
    y = np.arange(12) % 3
    np.savez(tmp_path / "last.npz", images=x, labels=y)
    np.savez(tmp_path / "gen.npz", x=x.transpose(0, 3, 1, 2).astype(np.float32) / 255, y=y)
    with h5py.File(tmp_path / "first.h5", "w") as f:
        f["images"], f["labels"] = x.transpose(0, 3, 1, 2), y
    want, _ = collect(ArraySource(tmp_path / "last.npz", ["a", "b", "c"]))
    for p in ("gen.npz", "first.h5"):
        src = ArraySource(tmp_path / p, ["a", "b", "c"])
        assert src.geometry == (28, 28, channels)
        xs, ys = collect(src, bs=5)
        np.testing.assert_array_equal(ys, y)
        assert [record_hash(r) for r in xs] == [record_hash(r) for r in want]
    np.savez(tmp_path / "two.npz", images=np.zeros((2, 2, 28, 28), np.uint8))
    with pytest.raises(MepfError, match=r"\(N, 2, 28, 28\); expected \(N,H,W\), \(N,H,W,C\) or \(N,C,H,W\)"):
        ArraySource(tmp_path / "two.npz", None)
    np.savez(tmp_path / "last3.npz", images=np.zeros((2, 3, 28, 3), np.uint8))
    assert ArraySource(tmp_path / "last3.npz", None).geometry == (3, 28, 3)
    np.savez(tmp_path / "rgba.npz", images=np.zeros((2, 3, 28, 4), np.uint8))  # RGBA of height 3: refused, as before
    with pytest.raises(MepfError, match=r"\(N, 3, 28, 4\); expected"):
        ArraySource(tmp_path / "rgba.npz", None)


def test_each_shard_of_an_npz_reads_its_own_records_once(tmp_path):
    """Workers and ranks read an .npz in shards, skipping the others' blocks by seeking. Every block a shard keeps
    holds exactly its records and their labels, and the shards together hold every record once (stored and
    compressed, either member first): a seek in one member must not move where the other reads."""
    assert npz_shards.problems(tmp_path) == []


def test_npz_shards_under_a_newer_python(tmp_path):
    """The same under Python >= 3.12 (CI's scripts/test.sh makes one where it can: MEPF_NEWER_PYTHON), where
    zipfile's seek in a stored member moves the file position shared by the members of one ZipFile: with one
    ZipFile for both members, shards read other records' bytes (silently, labels stored first) or failed."""
    py = os.environ.get("MEPF_NEWER_PYTHON")
    if not py:
        pytest.skip("no MEPF_NEWER_PYTHON (a Python >= 3.12 with numpy, h5py, scipy and autodp; scripts/test.sh)")
    root = Path(__file__).resolve().parent.parent
    pkg = tmp_path / "tree" / "mepf"
    pkg.mkdir(parents=True)  # mepf as pyproject's package-dir assembles it, without installing it there
    for entry in (root / "mepf").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub in ("artifacts", "embed", "synthesize", "evaluate"):
        (pkg / sub).symlink_to(root / sub)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "tree"), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([py, str(root / "tests" / "npz_shards.py"), str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=300)
    version = r.stdout.removeprefix("ok (Python ").split(")")[0].split(".")
    assert r.returncode == 0 and r.stdout.startswith("ok ("), r.stdout + r.stderr
    assert tuple(map(int, version[:2])) >= (3, 12), f"MEPF_NEWER_PYTHON is Python {'.'.join(version)}, not >= 3.12"


def test_an_npz_members_are_read_through_separate_file_objects(tmp_path, monkeypatch):
    """What keeps the shards' reads apart on any Python: the images and the labels are read through a ZipFile
    each, on a file object each (with one ZipFile, Python >= 3.12 moves one member's position with the other's
    seek)."""
    import mepf.embed.files as files

    path, _, _ = npz_shards.write(tmp_path, compressed=False, labels_first=True)
    seen = {}
    real = files._npz_member

    def spy(zf, key, name):
        seen[key] = zf.fp
        return real(zf, key, name)

    monkeypatch.setattr(files, "_npz_member", spy)
    src = ArraySource(path, list("abcdefg"))
    seen.clear()
    list(src.blocks(10, keep=lambda b: b % 2 == 0))
    assert set(seen) == {"images", "labels"} and seen["images"] is not seen["labels"]


def _array_files(tmp_path):
    """The same records as .npz, .h5 and gzipped IDX files, each with its source."""
    import gzip

    x = np.arange(40, dtype=np.uint8).repeat(28 * 28).reshape(40, 28, 28)
    y = np.arange(40) % 3
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"], f["labels"] = x, y
    idx = tmp_path / "idx"
    idx.mkdir()
    with gzip.open(idx / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + np.array([40, 28, 28], ">u4").tobytes() + x.tobytes())
    with gzip.open(idx / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + np.array([40], ">u4").tobytes() + y.astype(np.uint8).tobytes())
    from mepf.embed.datasets import IdxSource

    return [(tmp_path / "d.npz", lambda: ArraySource(tmp_path / "d.npz", ["a", "b", "c"])),
            (tmp_path / "d.h5", lambda: ArraySource(tmp_path / "d.h5", ["a", "b", "c"])),
            (idx / "train-images-idx3-ubyte.gz", lambda: IdxSource(idx / "train-images-idx3-ubyte.gz",
                                                                    idx / "train-labels-idx1-ubyte.gz",
                                                                    ["a", "b", "c"], "idx"))]


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["npz", "h5", "idx-gz"])
@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_a_data_file_changed_between_the_plan_and_a_read_is_refused(tmp_path, kind, how):
    """Workers and ranks open a single-file source each on their own: a file replaced by a reordered copy (or
    rewritten in place, its mtime set back) after the source was made would have some shards read a record that
    another shard reads too. Every open, and the end of every pass, refuses a file that is not the one planned."""
    path, make = _array_files(tmp_path)[kind]
    src = make()
    data = path.read_bytes()
    st = path.stat()
    if how == "replaced":
        other = path.with_name("copy" + path.suffix)
        other.write_bytes(data)
        os.replace(other, path)
    else:
        with open(path, "r+b") as f:
            f.write(data[:1])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(MepfError, match="changed while it was read"):
        list(src.blocks(10, keep=lambda b: b % 2 == 0))


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["npz", "h5", "idx-gz"])
def test_a_fifo_put_in_a_data_files_place_is_refused_without_waiting(tmp_path, kind):
    """The reads and the node's digest open the file without blocking: a FIFO in its place is another file."""

    path, make = _array_files(tmp_path)[kind]
    src = make()
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(MepfError, match="not a plain file"):  # a FIFO named as the data file from the start
        make()
    with fails_if_blocked():
        with pytest.raises(MepfError, match="changed while it was read"):
            list(src.blocks(10))
        with pytest.raises(MepfError, match="changed while it was read"):
            src.listing_digest()


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["npz", "h5", "idx-gz"])
def test_a_data_file_rewritten_during_a_pass_is_refused_at_its_end(tmp_path, kind):
    path, make = _array_files(tmp_path)[kind]
    blocks = make().blocks(10)
    next(blocks)
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(path.read_bytes()[:1])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(MepfError, match="changed while it was read"):
        list(blocks)


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["npz", "h5", "idx-gz"])
def test_the_plan_digest_is_of_the_file_the_source_reads(tmp_path, kind):
    """The node's digest (listing_digest) is taken through the source's identity: a file swapped (or a link
    flipped) between the source's start and its digest cannot have the digest describe another file than the
    one every read of the source finds."""
    path, make = _array_files(tmp_path)[kind]
    src = make()
    before = src.listing_digest()
    assert make().listing_digest() == before == src.listing_digest()
    other = path.with_name("other" + path.suffix)
    other.write_bytes(path.read_bytes())
    os.replace(other, path)
    with pytest.raises(MepfError, match="changed while it was read"):
        src.listing_digest()


def test_mnist5k_checks_its_file_too():
    """mnist-5k is one file whose records are positions in it: its identity is compared like an array file's."""
    from mepf.embed.datasets import Mnist5kSource

    src = Mnist5kSource("test")
    assert src.file_identity() is not None and len(list(src.blocks(100))) == 10
    src._id = src._id[:-1] + (src._id[-1] + 1,)  # as if it had been rewritten after the source was made
    with pytest.raises(MepfError, match="changed while it was read"):
        next(src.blocks(100))


def _stored_npz(tmp_path, images_npy: bytes, edit=None):
    import zipfile

    p = tmp_path / f"crafted{len(list(tmp_path.glob('crafted*')))}.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("images.npy", images_npy)
    if edit:
        data = bytearray(p.read_bytes())
        edit(data)
        p.write_bytes(bytes(data))
    return p


def test_crafted_npz_headers_and_member_sizes_are_one_line_errors(tmp_path):
    """A header Python's .npy reader rejects, and a member stored longer or shorter than its header declares (read
    past its end, into the bytes after it, by a sharded read on Python >= 3.12), are refused before any record is
    read, without the counts from the header in the message."""
    import io
    import struct

    bad_shape = (b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, 'shape': (1234567, 28, 28, 1, 'x'), }"
                 .ljust(128, b" ") + b"\n")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((40, 8, 8), np.uint8))
    raw = buf.getvalue()

    def short_central_size(data):
        cd = data.find(b"PK\x01\x02")
        struct.pack_into("<I", data, cd + 20, len(raw) - 3 * 64)

    negative = (b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, 'shape': (-2, 28, -28), }"
                .ljust(128, b" ") + b"\n" + bytes(2 * 28 * 28))
    for p, msg in [(_stored_npz(tmp_path, bad_shape), "unreadable .npy header"),
                   (_stored_npz(tmp_path, negative), "unreadable .npy header"),
                   (_stored_npz(tmp_path, raw + b"\xee" * 64), "another length than its header"),
                   (_stored_npz(tmp_path, raw[:-64]), "another length than its header"),
                   (_stored_npz(tmp_path, raw, short_central_size), "another length than its header|unreadable")]:
        with pytest.raises(MepfError, match=msg) as e:
            ArraySource(p, None)
        assert "1234567" not in str(e.value) and "\n" not in str(e.value)


def _same_size_folder(tmp_path, n=12):
    """A labelled folder of uncompressed PNGs of one geometry: every image has the same size, and images written
    in one go may share their timestamps (coarse clocks), so only the file itself tells two of them apart."""
    from PIL import Image

    root = tmp_path / "data"
    x = make_images(n, seed=5)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, :, :, 0]).save(d / f"{i:02d}.png", compress_level=0)
    assert len({p.stat().st_size for p in root.rglob("*.png")}) == 1
    return root


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(".swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def _hard_link_over(a: Path, b: Path) -> None:
    """`a` becomes a second name of `b` (made after the listing, so the listing's hard-link check saw none)."""
    tmp = a.with_name(".link")
    os.link(b, tmp)
    os.replace(tmp, a)


def _symlink_over(a: Path, b: Path) -> None:
    tmp = a.with_name(".link")
    os.symlink(b, tmp)
    os.replace(tmp, a)


@pytest.mark.parametrize("change", [_swap, _hard_link_over, _symlink_over], ids=["swapped", "hard-link", "symlink"])
def test_a_folder_changed_after_its_listing_is_refused_at_the_read(tmp_path, change):
    """Workers and ranks read a folder's images by name from a listing made once: two same-size images swapped
    (or one replaced by a link to another) after the listing would have a shard read a record that another shard
    reads too, at the same count. Every read finds the file the listing found at that name, or refuses."""
    root = _same_size_folder(tmp_path)
    src = FolderSource(root)
    assert sum(len(x) for _, x, _ in src.blocks(4)) == 12
    change(root / "c0" / "00.png", root / "c1" / "11.png")  # blocks of 4 in listing order: c0/00 in 0, c1/11 in 2
    assert sum(len(x) for _, x, _ in src.blocks(4, keep=lambda b: b == 1)) == 4  # a block of untouched files reads
    how = "replaced by a link" if change is _symlink_over else "changed while it was read"  # the link not followed
    with pytest.raises(MepfError, match=how):
        list(src.blocks(4, keep=lambda b: b == 0))
    with pytest.raises(MepfError, match="changed while it was read"):
        src.listing_digest()  # the node's digest describes only the files the reads will find


def test_an_image_rewritten_in_place_while_it_is_decoded_is_refused(tmp_path, monkeypatch):
    """A copy over an image keeps its inode and name (cp, rsync --inplace): one landing between the open's check
    and the decode is caught by the check after the decode."""
    import time

    from mepf.embed import files

    root = _same_size_folder(tmp_path)
    src = FolderSource(root)
    time.sleep(0.1)  # past a coarse clock's tick: the rewrite's times differ from the listing's
    a, b = root / "c0" / "00.png", root / "c1" / "11.png"
    decode = files.decode_image

    def rewrite_then_decode(path, f=None, *rest):
        if path == a:
            with open(a, "r+b") as out:
                out.write(b.read_bytes())
        return decode(path, f, *rest)

    monkeypatch.setattr(files, "decode_image", rewrite_then_decode)
    with pytest.raises(MepfError, match="changed while it was read"):
        list(src.blocks(4, keep=lambda b: b == 0))


def _fifo_over(a: Path) -> None:
    a.unlink()
    os.mkfifo(a)


def test_a_fifo_put_in_an_images_place_is_refused_without_waiting(tmp_path, monkeypatch):
    """Nothing writes to a FIFO put in an image's place after the listing: the read, the node's digest and
    `mepf embed --check` refuse it at once instead of blocking forever (the other ranks would wait on the node)."""

    from mepf.embed import files
    from mepf.embed.check import check_data

    with fails_if_blocked():
        root = _same_size_folder(tmp_path)
        src = FolderSource(root)
        _fifo_over(root / "c0" / "00.png")
        with pytest.raises(MepfError, match="changed while it was read"):
            list(src.blocks(4, keep=lambda b: b == 0))
        with pytest.raises(MepfError, match="changed while it was read"):
            src.listing_digest()
        os.unlink(root / "c0" / "00.png")
        root = _same_size_folder(tmp_path / "again")
        listed = files.listed_identities

        def fifo_after_listing(*args):
            ids = listed(*args)
            _fifo_over(root / "c1" / "11.png")
            return ids

        monkeypatch.setattr(files, "listed_identities", fifo_after_listing)
        problems = check_data(str(root), show_progress=False)
        assert len(problems) == 1 and "image c1/11.png changed while it was read" in problems[0], problems


def test_images_dated_after_2262_are_read(tmp_path):
    """A camera's wrong clock can date a file past int64 nanoseconds (ext4 goes to 2446): no overflow."""
    root = _same_size_folder(tmp_path)
    ns = 10_000_000_000 * 10**9  # the year 2286
    os.utime(root / "c0" / "00.png", ns=(ns, ns))
    if os.stat(root / "c0" / "00.png").st_mtime_ns != ns:
        pytest.skip("this filesystem does not store such dates")
    assert collect(FolderSource(root))[0].shape == (12, 28, 28, 1)


_TWO_MOUNTS = """
import sys
from mepf.artifacts.errors import MepfError
from mepf.embed.files import FolderSource
try:
    FolderSource(sys.argv[1])
    print("listed")
except MepfError as e:
    print("refused:", e)
"""


def test_a_class_folder_on_another_filesystem_is_refused(tmp_path):
    """Two mounts of one share (or two overlays of one folder) as two class folders show one file under two
    names and labels, with different device numbers: the hard-link check cannot see it, so every image must be on
    the data folder's own filesystem. Here a tmpfs mounted on one class folder, in a user namespace."""
    import shutil
    import sys

    root = _same_size_folder(tmp_path)
    moved = tmp_path / "c1-files"
    shutil.move(root / "c1", moved)
    (root / "c1").mkdir()
    script = tmp_path / "list.py"
    script.write_text(_TWO_MOUNTS)
    shell = (f'mount -t tmpfs none "{root / "c1"}" && cp "{moved}"/*.png "{root / "c1"}"/ && '
             f'"{sys.executable}" "{script}" "{root}"')
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if "mount" in r.stderr or r.returncode != 0 and not r.stdout:
        pytest.skip(f"no user namespaces here: {r.stderr.strip()[:80]}")
    assert r.stdout.startswith("refused:") and "another filesystem than the data folder" in r.stdout, r.stdout
    shutil.rmtree(root / "c1")
    shutil.move(moved, root / "c1")
    assert len(FolderSource(root)) == 12  # the same images on one filesystem are listed


def test_ranks_that_list_a_folder_before_and_after_a_change_state_different_identities(tmp_path):
    """The ranks of one node each list the folder; agree_on_files compares these identities before any read.
    Two same-size images swapped between two listings have the same names, labels and sizes: only the files'
    identities tell them apart."""
    root = _same_size_folder(tmp_path)
    first = FolderSource(root).file_identity()
    assert FolderSource(root).file_identity() == first
    _swap(root / "c0" / "02.png", root / "c0" / "08.png")
    assert FolderSource(root).file_identity() != first


def test_public_folders_keep_links_and_are_not_identity_checked(tmp_path):
    """Evaluate's public images may hold links (counting one twice breaks no guarantee); no identities there."""
    root = _same_size_folder(tmp_path)
    os.symlink("00.png", root / "c0" / "99.png")
    src = open_source(str(root), private=False)
    assert src.file_identity() is None and len(collect(src)[0]) == 13
    with pytest.raises(MepfError, match="symbolic links"):
        open_source(str(root))


def test_folder_labelled_and_flat(tmp_path, image_folder):
    src = FolderSource(image_folder)
    assert src.classes == ["cats", "dogs"] and len(src) == 12 and src.geometry is None
    xs, ys = collect(src, bs=5)
    assert xs.shape == (12, 28, 28, 1) and sorted(np.bincount(ys)) == [6, 6]
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (image_folder / "cats").iterdir():
        (flat / p.name).write_bytes(p.read_bytes())
    src = open_source(str(flat))
    assert src.classes is None and collect(src)[1] is None


def test_mnist5k_splits_are_fixed_and_disjoint():
    tr, te = named_source("mnist-5k:train"), named_source("mnist-5k")
    assert te.split == "train"
    xtr, ytr = collect(tr, 500)
    xte, yte = collect(named_source("mnist-5k:test"), 500)
    assert xtr.shape == (4000, 28, 28, 1) and xte.shape == (1000, 28, 28, 1)
    assert list(np.bincount(ytr)) == [400] * 10 and list(np.bincount(yte)) == [100] * 10
    train_rows = {r.tobytes() for r in xtr}
    assert sum(r.tobytes() in train_rows for r in xte) <= 5  # the subset has a few duplicate digits at most


@pytest.mark.skipif(not any(Path(d).is_dir() for d in DEBIAN_FASHION_DIRS),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_package(tmp_path):
    src = named_source("fashion-mnist:test", data_root=tmp_path, download=False)
    assert len(src) == 10000 and src.geometry == (28, 28, 1) and len(src.classes) == 10
    x, y = next(src.batches(256))
    assert x.shape == (256, 28, 28, 1) and x.dtype == np.uint8 and y.max() <= 9


@pytest.mark.skipif(not any(Path(d).is_dir() for d in DEBIAN_FASHION_DIRS),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_dpimagebench_holdout_split(tmp_path):
    """:train-55k and :val-5k partition the training images as DPImageBench's loader does (torch.manual_seed(0),
    random_split into 55,000 and 5,000, on the files' order); every rank's blocks together are the 55,000 once."""
    import torch

    from mepf.embed.datasets import holdout_indices

    whole = np.concatenate([x for x, _ in named_source("fashion-mnist:train", tmp_path, download=False).batches(5000)])
    priv = named_source("fashion-mnist:train-55k", tmp_path, download=False)
    val = named_source("fashion-mnist:val-5k", tmp_path, download=False)
    assert (len(priv), len(val)) == (55000, 5000) and priv.listing_digest() != val.listing_digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, theirs = torch.utils.data.random_split(range(60000), [55000, 5000])
    assert sorted(theirs.indices) == holdout_indices().tolist()
    held = np.zeros(60000, dtype=bool)
    held[theirs.indices] = True
    for bs in (1000, 777):
        blocks = list(priv.blocks(bs))
        assert [b for b, _, _ in blocks] == list(range(len(blocks)))
        assert all(len(x) == bs for _, x, _ in blocks[:-1]) and len(blocks[-1][1]) == 55000 - bs * (len(blocks) - 1)
        assert (np.concatenate([x for _, x, _ in blocks]) == whole[~held]).all()
        assert (np.concatenate([x for _, x, _ in val.blocks(bs)]) == whole[held]).all()
    world = 3
    shards = [np.concatenate([x for _, x, _ in priv.blocks(1000, lambda b, r=r: b % world == r)]) for r in range(world)]
    assert sum(map(len, shards)) == 55000
    assert {r.tobytes() for s in shards for r in s} == {r.tobytes() for r in whole[~held]}
    with pytest.raises(MepfError, match="unknown split"):
        named_source("cifar10:val-5k", tmp_path, download=False)


def _celeba(tmp_path, monkeypatch, n=6):
    """CelebASource over a folder laid out as CelebA's: its partition index (the published one's MD5 pinned in
    mepf) is made here with this folder's MD5, as the real CelebA cannot be had on these machines."""
    import hashlib

    from PIL import Image

    from mepf.embed import datasets
    from mepf.embed.datasets import CelebASource

    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    names = [f"{i:06d}.png" for i in range(n)]
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / name, compress_level=0)
    index = "".join(f"{name} 0\n" for name in names) + "999999.png 2\n"  # a test-split image: not listed
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(index)
    monkeypatch.setattr(datasets, "CELEBA_PARTITION",
                        ("list_eval_partition.txt", hashlib.md5(index.encode()).hexdigest()))
    return folder, lambda: CelebASource(tmp_path, "train", False)


def test_celeba_partition_index_is_read_without_waiting_and_checked(tmp_path, monkeypatch):
    """The partition index names the images: another file there is refused by its MD5, a FIFO in its place at once."""

    folder, make = _celeba(tmp_path, monkeypatch)
    assert len(make()) == 6
    index = folder.parent / "list_eval_partition.txt"
    index.write_text(index.read_text().replace(" 2\n", " 0\n"))  # the test image moved into train
    with pytest.raises(MepfError, match="not CelebA's published partition index"):
        make()
    index.unlink()
    os.mkfifo(index)

    with fails_if_blocked():
        with pytest.raises(MepfError, match="celeba not found|not a plain file"):
            make()


def test_celeba_images_are_read_as_listed(tmp_path, monkeypatch):
    """CelebA's images are files of one folder read by name, like an image folder's, and checked the same way."""
    folder, make = _celeba(tmp_path, monkeypatch)
    src = make()
    assert collect(src, bs=4)[0].shape == (6, 178, 178, 3) and src.file_identity() == make().file_identity()
    _swap(folder / "000000.png", folder / "000005.png")
    assert make().file_identity() != src.file_identity()
    with pytest.raises(MepfError, match="changed while it was read"):
        list(src.blocks(4, keep=lambda b: b == 0))
    with pytest.raises(MepfError, match="changed while it was read"):
        src.listing_digest()
    _symlink_over(folder / "000001.png", folder / "000002.png")
    with pytest.raises(MepfError, match="symbolic link"):
        make()
    (folder / "000001.png").unlink()
    os.link(folder / "000002.png", folder / "000001.png")
    with pytest.raises(MepfError, match="hard links"):
        make()


def test_a_class_folder_swapped_for_a_link_while_it_is_listed_lists_nothing_from_elsewhere(tmp_path, monkeypatch):
    """Between the link check of the class folders and their listing, one swapped for a link to a folder elsewhere
    (on the same filesystem) is refused: its names are listed through a handle that follows no link."""
    from mepf.embed import files

    root = _same_size_folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes((root / "c0" / "00.png").read_bytes())
    check = files._refuse_links

    def swap_after_check(paths):
        check(paths)
        if root / "c1" in paths:
            os.rename(root / "c1", tmp_path / "c1-away")
            os.symlink(elsewhere, root / "c1")

    monkeypatch.setattr(files, "_refuse_links", swap_after_check)
    with pytest.raises(MepfError, match="c1: .*changed while mepf listed it"):
        FolderSource(root)


def test_h5_files_numpy_cannot_read_or_damaged_are_one_line(tmp_path):
    """An .h5 whose images or labels have an HDF5 type numpy lacks (24-bit integers) is refused in one line; one
    with a damaged compressed chunk is listed by `mepf embed --check` in one line, as the pass would stop."""
    from mepf.embed.check import check_data

    for key in ("images", "labels"):
        path = tmp_path / f"int24-{key}.h5"
        with h5py.File(path, "w") as f:
            t = h5py.h5t.STD_I32LE.copy()
            t.set_size(3)
            h5py.h5d.create(f.id, key.encode(), t, h5py.h5s.create_simple((4, 8, 8) if key == "images" else (4,)))
            if key == "labels":
                f["images"] = np.zeros((4, 8, 8), np.uint8)
        with pytest.raises(MepfError, match="not a readable HDF5 file of images"):
            ArraySource(path, ["0", "1"] if key == "labels" else None)
    path = tmp_path / "damaged.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("images", data=np.random.default_rng(0).integers(0, 4, (64, 8, 8), dtype=np.uint8),
                              chunks=(64, 8, 8), compression="gzip")
        chunk = ds.id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    middle = chunk.byte_offset + chunk.size // 2
    data[middle:middle + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    problems = check_data(str(path), show_progress=False)
    assert len(problems) == 1 and "reading it failed" in problems[0] and "\n" not in problems[0]


def test_an_h5_filter_hdf5_lacks_is_refused_before_a_plugin_could_load(tmp_path):
    """A data .h5 whose images (or labels) declare a filter HDF5 does not carry would make HDF5 search its plugin
    folders and $HDF5_PLUGIN_PATH for a library to load, in the process that holds the private data, on the first
    read: refused in one line before any read (by `mepf embed --check` too), the plugin path emptied whenever a
    data .h5 is opened; gzip and LZF, which HDF5 and h5py carry, still read."""
    from mepf.embed.check import check_data

    x = make_images(8)
    for key in ("images", "labels"):
        path = tmp_path / f"plugin-{key}.h5"
        with h5py.File(path, "w") as f:
            data = x if key == "images" else np.arange(8, dtype=np.int64) % 2
            ds = f.create_dataset(key, shape=data.shape, dtype=data.dtype, chunks=(8,) + data.shape[1:],
                                  compression=32004, allow_unknown_filter=True)
            ds.id.write_direct_chunk((0,) * data.ndim, data.tobytes())
            if key == "labels":
                f["images"] = x
        with pytest.raises(MepfError, match="a filter HDF5 does not carry") as e:
            ArraySource(path, ["0", "1"] if key == "labels" else None)
        assert "\n" not in str(e.value)
        with pytest.raises(MepfError, match="a filter HDF5 does not carry"):  # --check: the same one line
            check_data(str(path), classes="2" if key == "labels" else None, show_progress=False)
    for compression in ("gzip", "lzf"):
        path = tmp_path / f"{compression}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=x, chunks=(4,) + x.shape[1:], compression=compression)
        got, _ = collect(ArraySource(path, None), bs=3)
        assert np.array_equal(got, x.reshape(got.shape))
    # a fresh process whose HDF5 was given a plugin folder: opening a data file empties its search path
    code = ("import h5py.h5pl as p; from mepf.embed.files import ArraySource; n = p.size(); "
            f"ArraySource({str(tmp_path / 'gzip.h5')!r}, None); print(n, p.size())")
    r = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HDF5_PLUGIN_PATH": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.split() == ["1", "0"], r.stderr


def test_a_folder_at_a_files_name_is_refused_without_leaking_its_descriptor(tmp_path):
    """open_nonblocking and open_plain_file on a folder: an error or a problem, and no descriptor left open."""
    from mepf.artifacts.plain_file import open_nonblocking, open_plain_file

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(OSError):
            open_nonblocking(tmp_path)
        assert open_plain_file(tmp_path) == ("it is not a plain file", None)
    assert len(os.listdir("/proc/self/fd")) == before
