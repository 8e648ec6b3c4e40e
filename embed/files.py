"""The user's own files: an image folder (PNG/JPEG, one subfolder per class or flat) and .npz/.h5 arrays.

Records reach the transform as stored (an image decoded to 8-bit grey or RGB at its own size, or, above
MAX_DECODED_PIXELS, by a fixed rule); the transform then converts every record to the declared geometry. No
record is refused for its size or mode, and no message or error names a number computed from the records.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import fd_sha256, no_hdf5_plugins
from mepf.artifacts.plain_file import address_space_left

from . import jpeg_scans
from .fingerprint import replaced_identity
from .sources import (
    Replaced,
    Source,
    check_listed,
    check_unchanged,
    files_digest,
    kept,
    listed_identities,
    open_listed,
    open_unchanged,
    stat_identity,
)

IMAGE_EXTS = {".png", ".jpg", ".jpeg"}
#: an error names at most this many files (and says there are others, never how many: a count of records)
MAX_SHOWN = 10
#: Pillow modes decoded as one channel; everything else (RGB, RGBA, P, CMYK, YCbCr, ...) as RGB, alpha dropped
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_WIDE_GREY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
#: the Pillow decoders an image file may reach; JPEG's may give an MPO (a JPEG with more frames, as cameras write)
PIL_FORMATS = ("PNG", "JPEG")
#: no image is decoded at more pixels than this (a 25 KB PNG can declare 200 M): a larger JPEG is decoded at 1/2,
#: 1/4 or 1/8 scale by its own DCT (a JPEG has at most 65,535 px a side; libjpeg refuses sides over 65,500, which
#: are then undecodable), a larger PNG is the record of one black pixel. A fixed rule in place of Pillow's
#: decompression-bomb refusal, whose outcome (no release) a single record chose
MAX_DECODED_PIXELS = 1 << 26
#: a PNG with a side longer than this (a JPEG's longest) is one black pixel, as one above MAX_DECODED_PIXELS: Pillow
#: refuses rows of more than 2^31 bits with a MemoryError before allocating anything (67,108,860 x 1 RGBA, 254 KB:
#: review 30), which must not read as the machine's memory; and the resize's first pass holds height x target width
#: floats (8 GB for a 489 KB PNG of 1 x 2^26 at 32 px: review 31)
MAX_PNG_SIDE = 65_535
#: libjpeg's limit on its whole-image buffers (JPEGMEM, in MB): a progressive JPEG, or one whose first scan holds
#: fewer than all its components, is decoded through the coefficients of the whole image at full size, whatever
#: scale is asked (a 557-byte file declaring 32,768 x 32,768 took 3.3 GB). 560 MB holds them for any JPEG within
#: MAX_DECODED_PIXELS (at worst 553 MB: 4 components at 4x4 sampling, review 30); one whose coefficients exceed it
#: fails to decode: one black pixel under --bad-records zero
JPEG_MEMORY_MB = 560
JPEGMEM = f"{JPEG_MEMORY_MB}M"
#: what decoding may take, besides the JPEG coefficients: per pixel decoded (Pillow's image, the array, tiles), and
#: once (the decoders' own state); checked against the address space left where an allocation can fail
DECODE_BYTES_PER_PIXEL, DECODE_BYTES_ONCE = 16, 32 << 20
#: an image is converted to its array in strips of rows of about this many bytes (_pixels)
STRIP_BYTES = 1 << 24


#: JPEG application segments (APP0-APP15: JFIF, EXIF, ICC, Photoshop, Adobe, MPF) and comments, whose contents
#: each application defines: Pillow's parsers of them refused valid JPEGs whose pixels libjpeg decodes (a short
#: Adobe or JFIF block, a 1-byte EXIF resolution); and quantization tables, which Pillow parsed in Python for
#: nothing mepf uses (32 MB of them took 1.7 s, and up to 4 GB fit the marker bound: review 36). Skipped by Pillow's
#: header parse; libjpeg still reads the stream whole, so no pixel changes (an MPO then opens as the JPEG of its
#: first frame, which it is)
JPEG_SKIPPED_MARKERS = (*range(0xFFE0, 0xFFF0), 0xFFFE, 0xFFDB)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


#: the PNG chunks Pillow parses before the image data (the image's own, IDAT and fdAT, go to its decoder): all short
#: by the PNG specification (PLTE at most 768 bytes); every other kind is skipped unheld (_skip_chunk), text and
#: profiles included (Pillow refused a zTXt, iTXt or iCCP past MAX_TEXT_CHUNK, 1 MB, decompressed, or all text
#: past MAX_TEXT_MEMORY: a valid 2 KB PNG stopped the release)
PNG_PARSED_CHUNKS = ("IHDR", "PLTE", "tRNS", "gAMA", "cHRM", "sRGB", "pHYs", "acTL", "fcTL")
#: a parsed chunk longer than this makes the file undecodable (an invalid file: libpng would drop the chunk)
PNG_SHORT_CHUNK = 4096


class _Skipped(bytes):
    """A skipped chunk's data as its handler returns it: nothing, and its CRC (read in blocks, never held)."""

    crc = 0


def _skip_chunk(fp, cid: bytes, length: int) -> _Skipped:
    import zlib

    crc, left = zlib.crc32(cid), length
    while left > 0:
        block = fp.read(min(left, 1 << 20))
        if not block:
            raise OSError("Truncated File Read")
        crc, left = zlib.crc32(block, crc), left - len(block)
    skipped = _Skipped()
    skipped.crc = crc
    return skipped


@contextlib.contextmanager
def _metadata_skipped():
    """While this holds (decoding runs in processes, never threads, so no other reader sees it), Pillow's PNG reader
    parses PNG_PARSED_CHUNKS (refusing one past PNG_SHORT_CHUNK), skips every other chunk before the image data in
    blocks, checking its CRC but holding none of it, and reads nothing after the image's rows; its JPEG reader skips
    JPEG_SKIPPED_MARKERS unparsed. Pillow read each chunk whole, twice over while joining its blocks, kept private
    ones, and read image data after the rows the same way: an 8 x 8 PNG with a 1 GB chunk took 2 GB (review 32), a
    13 x 11 one with 1 GB of empty deflate blocks after its rows 1.9 GB (review 33)."""
    from PIL import JpegImagePlugin, PngImagePlugin

    stream, image, markers = PngImagePlugin.PngStream, PngImagePlugin.PngImageFile, JpegImagePlugin.MARKER
    call, crc, load_end = stream.call, stream.crc, image.load_end

    def call_skipping(self, cid, pos, length):
        kind = cid.decode("ascii")  # as Pillow's call: UnicodeDecodeError for a type that is not ASCII
        if kind in ("IDAT", "fdAT", "IEND"):
            return call(self, cid, pos, length)
        if kind in PNG_PARSED_CHUNKS:
            if length > PNG_SHORT_CHUNK:
                raise SyntaxError("a PNG chunk longer than its kind allows")
            return call(self, cid, pos, length)
        return _skip_chunk(self.fp, cid, length)

    def crc_of_skipped(self, cid, data):
        if not isinstance(data, _Skipped):
            return crc(self, cid, data)
        stored = self.fp.read(4)
        if len(stored) < 4 or int.from_bytes(stored, "big") != data.crc:
            raise SyntaxError(f"broken PNG file (bad checksum in {cid!r})")

    def rows_only(self):  # mepf uses nothing after the rows, nor any later frame
        self._text = {}
        if self.png is not None:
            self.png.close()
            self.png = None

    saved_markers = {m: markers[m] for m in JPEG_SKIPPED_MARKERS}
    stream.call, stream.crc, image.load_end = call_skipping, crc_of_skipped, rows_only
    for m, (name, description, _) in saved_markers.items():
        markers[m] = (name, description, JpegImagePlugin.Skip)
    try:
        yield
    finally:
        stream.call, stream.crc, image.load_end = call, crc, load_end
        markers.update(saved_markers)


class _Bounded:
    """An image file as Pillow reads it: no read asks for more than the file holds past the position (a read of n
    bytes allocates n before reading: 4 GB asked by a 352-byte PNG whose IDAT declared them, review 31)."""

    def __init__(self, f):
        self._f, self._size = f, os.fstat(f.fileno()).st_size

    def read(self, n=-1) -> bytes:
        left = max(0, self._size - self._f.tell())
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _replaced(path: Path, file=None) -> Replaced:
    """A record the pass embeds as one black pixel, counted by the repeat check as its file's bytes."""
    with contextlib.ExitStack() as stack:
        fd = file.fileno() if file is not None else stack.enter_context(open(path, "rb")).fileno()
        return Replaced(replaced_identity(file_bytes=bytes.fromhex(fd_sha256(fd))))


def _pixels(im) -> np.ndarray:
    """A loaded image's pixels as uint8 (H, W) grey (16-bit grey: its high byte) or (H, W, 3), converted a tile
    at a time (every conversion used is per pixel), so that a large image costs the array and not also Pillow's
    whole converted copy and its bytes (a 192 MB record took 900 MB above the array's size)."""
    w, h = im.size
    grey = im.mode in GREY_MODES
    out = np.empty((h, w) if grey else (h, w, 3), np.uint8)
    cols = min(w, max(1, STRIP_BYTES // 4))
    rows = max(1, STRIP_BYTES // (4 * cols))
    for top in range(0, h, rows):
        for left in range(0, w, cols):
            tile = im if rows >= h and cols >= w else im.crop((left, top, min(w, left + cols), min(h, top + rows)))
            if im.mode in _WIDE_GREY:
                wide = np.asarray(tile)  # uint16 as stored, or int32 for "I"
                part = (wide if wide.dtype.kind == "u" else np.clip(wide, 0, 65535)) >> 8
            else:
                part = np.asarray(tile.convert("L" if grey else "RGB"))
            out[top:top + rows, left:left + cols] = part
    return out


def decode_image(path: Path, file=None, zero: bool = False):
    """One image file (`path`, or `file` opened from it) as stored pixels: uint8 (H, W, 1) for grey modes (16-bit
    grey scaled to 8 bits), else uint8 (H, W, 3); above MAX_DECODED_PIXELS by its rule (a PNG: Replaced). An
    undecodable file is the one record that stops the pass (nothing is released), or with `zero` (--bad-records
    zero) is Replaced."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if os.environ.get("JPEGMEM") != JPEGMEM:  # read by libjpeg as each decoder is made; set once per process
        os.environ["JPEGMEM"] = JPEGMEM
    try:
        with warnings.catch_warnings(), _metadata_skipped():
            # Pillow's warnings print numbers from the record (pixel counts, EXIF tag sizes) or tell that it is odd
            warnings.simplefilter("ignore")
            Image.MAX_IMAGE_PIXELS = None  # its refusal of large images is replaced by MAX_DECODED_PIXELS' rule
            # by content Pillow would open ~40 formats, EPS through an external Ghostscript: PNG and JPEG only
            with contextlib.ExitStack() as stack:
                f = file if file is not None else stack.enter_context(open(path, "rb"))
                jpeg_scans.scans(f.fileno())  # a JPEG past its bounds: ValueError, before Pillow parses any of it
                im = stack.enter_context(Image.open(_Bounded(f), formats=PIL_FORMATS))
                if im.format not in (*PIL_FORMATS, "MPO"):
                    raise ValueError("not PNG or JPEG")
                w, h = im.size
                if im.format == "PNG" and (w * h > MAX_DECODED_PIXELS or max(w, h) > MAX_PNG_SIDE):
                    return _replaced(path, file)
                if w * h > MAX_DECODED_PIXELS:
                    k = next(k for k in (2, 4, 8) if _ceil_div(w, k) * _ceil_div(h, k) <= MAX_DECODED_PIXELS)
                    # Pillow takes the scale min(w // rw, h // rh) for a request (rw, rh): at least k for w // k
                    im.draft(im.mode, (w // k, h // k))
                    if im.size[0] * im.size[1] > MAX_DECODED_PIXELS:
                        raise ValueError("not reduced")
                left = address_space_left()
                if left is not None and left < _decode_bytes(im, w, h):
                    raise MemoryError  # a failed allocation inside libjpeg reads as a corrupt file: not tried
                im.load()
                arr = _pixels(im)
    except MemoryError:  # the machine's, not the record's: never the black image of --bad-records zero
        raise _out_of_memory(path) from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        if isinstance(e, OSError) and str(e).startswith(Image.core.getcodecstatus(-9)):  # a decoder's allocation
            raise _out_of_memory(path) from None
        if zero:
            try:
                return _replaced(path, file)
            except OSError:
                pass
        raise MepfError(f"cannot read image {path} ({type(e).__name__}); remove or replace it (or embed with "
                        "--bad-records zero)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return arr[:, :, None] if arr.ndim == 2 else arr


def _decode_bytes(im, w: int, h: int) -> int:
    """At most what decoding `im` (declared w x h, drafted to im.size) takes: its pixels, and for a JPEG the
    coefficients of the whole image at full size (each component padded to 32 px), up to libjpeg's limit."""
    need = DECODE_BYTES_PER_PIXEL * im.size[0] * im.size[1] + DECODE_BYTES_ONCE + 8 * h + 32 * w  # rows: pointers,
    # and the decoder's row buffers of up to 8 bytes a pixel
    if im.format != "PNG":
        components = len(getattr(im, "layer", None) or ()) or 4
        need += min(JPEG_MEMORY_MB * 10 ** 6, 2 * components * -(-w // 32) * 32 * -(-h // 32) * 32)
    return need


def _out_of_memory(path) -> MepfError:
    return MepfError(f"out of memory while decoding {path}; decoding one image may take up to 1.7 GB beside what "
                     "mepf holds (README, 'What can stop a run'): give the process more memory (ulimit -v), or fewer "
                     "--workers")


def decode_listed(path: Path, identity, zero: bool = False) -> np.ndarray:
    """decode_image of the file a listing found at `path` (`identity`: its listed_identities record), refused if
    another file is there now or it was rewritten in place while it was decoded."""
    with open_listed(path, identity) as f:
        image = decode_image(path, f, zero)
        check_listed(f.fileno(), identity, path)
        return image


# --------------------------------------------------------------------------- image folders

def _named(paths, others: str = "") -> str:
    """The first MAX_SHOWN paths, and that there are others (never how many: a count of records)."""
    more = f" and others{others}" if len(paths) > MAX_SHOWN else ""
    return ", ".join(str(p) for p in paths[:MAX_SHOWN]) + more


def _refuse_links(paths) -> None:
    """A symbolic link could list one image (or a whole class folder) twice, counting its person twice, or
    pull in files from outside the folder: the data folder holds the files themselves."""
    links = [p for p in paths if p.is_symlink()]
    if links:
        raise MepfError(f"symbolic links in the data folder: {_named(links)}; replace each with the file or folder it "
                        "names (a link could count an image twice)")


def _names_in(d: Path) -> list:
    """The names in class folder `d`, listed through a handle that follows no link: a class folder swapped for a
    link between the link check and its listing cannot bring in files from elsewhere."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MepfError(f"{d}: {e.strerror or e}; was the folder changed while mepf listed it? Run again when it is "
                        "settled") from None
    try:
        with os.scandir(fd) as entries:
            return [e.name for e in entries]
    finally:
        os.close(fd)


class FolderSource(Source):
    """A folder with one subfolder per class (labelled; class names are the sorted subfolder names)
    or a flat folder of images (unlabelled). PNG and JPEG; dotfiles are ignored. It fixes no geometry:
    `--image-size` and `--channels` declare it. Links are refused unless `links_ok` (non-private readers)."""

    def __init__(self, root, strict: bool = True, links_ok: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise MepfError(f"--data {root}: no such folder")
        self.root = root
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        refuse_links = (lambda paths: None) if links_ok else _refuse_links  # public images: counts mean nothing
        refuse_links(entries)
        dirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        if dirs and files:
            raise MepfError(f"--data {root} mixes files ({files[0].name}) and class folders ({dirs[0].name}); "
                            "use one subfolder per class, or a flat folder of images")
        if dirs:
            self.classes = [d.name for d in dirs]
            self.items = []
            for label, d in enumerate(dirs):
                names = [x.name for x in d.iterdir()] if links_ok else _names_in(d)
                inside = sorted(d / name for name in names if not name.startswith("."))
                refuse_links(inside)
                self.items.extend((p, label) for p in inside)
        else:
            self.classes = None
            self.items = [(p, -1) for p in files]
        #: files mepf cannot take (not a PNG or JPEG): all named in one error, or listed by `mepf embed --check`
        self.not_images = [p for p, _ in self.items if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS]
        if self.not_images and strict:
            shown = _named(self.not_images, " (mepf embed --check lists them all)")
            raise MepfError(f"not PNG or JPEG images: {shown}; remove them from the data folder")
        skip = set(self.not_images)
        self.items = [(p, y) for p, y in self.items if p not in skip]
        if not self.items:
            raise MepfError(f"--data {root} holds no images; put PNG/JPEG files in it (one subfolder per class)")
        #: each image's identity at listing (None for public images): every read must find that file at that name
        self._ids = None if links_ok else listed_identities([p for p, _ in self.items], root)
        self.description = "image folder" + (" (labelled)" if self.classes else " (unlabelled)")

    def _listing(self, h) -> None:
        for path, label in self.items:
            h.update(f"|{label}|{path.relative_to(self.root).as_posix()}".encode("utf-8", "surrogateescape"))

    def listing_digest(self) -> str:
        """The listing in order (each image's path below the folder and its label) and the images' bytes (each
        image checked to be the file the listing found)."""
        h = hashlib.sha256(b"mepf-folder-v2")
        self._listing(h)
        h.update(files_digest([p for p, _ in self.items], self._ids, listed=self._ids is not None).encode())
        return h.hexdigest()

    def file_identity(self) -> tuple | None:
        """A digest of the listing and of every image's identity: two ranks of a node that listed the folder
        before and after a change (a renamed, added or swapped image) differ here."""
        if self._ids is None:
            return None
        h = hashlib.sha256(b"mepf-folder-ids-v1")
        self._listing(h)
        h.update(self._ids.tobytes())
        return (h.hexdigest(),)

    def read_listed(self, i: int) -> np.ndarray:
        """The i-th listed image, decoded from the file the listing found at its name."""
        return self._read_image(self.items[i][0], None if self._ids is None else self._ids[i])

    def _read_image(self, path: Path, identity=None) -> np.ndarray:
        zero = self.bad_records == "zero"
        return decode_image(path, zero=zero) if identity is None else decode_listed(path, identity, zero)

    def __len__(self) -> int:
        return len(self.items)

    def blocks(self, block_size: int, keep=None):
        for b, start in enumerate(range(0, len(self.items), block_size)):
            if not kept(keep, b):
                continue
            chunk = self.items[start:start + block_size]
            images = [self.read_listed(i) for i in range(start, start + len(chunk))]
            labels = np.array([l for _, l in chunk], dtype=np.int64) if self.classes else None
            same = all(isinstance(a, np.ndarray) for a in images) and all(a.shape == images[0].shape for a in images)
            yield b, (np.stack(images) if same else images), labels


# --------------------------------------------------------------------------- arrays (.npz / .h5)

#: what a corrupt or crafted zip or .npy header raises while it is parsed
_NPZ_ERRORS = (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError, EOFError, OSError, OverflowError)


def _npz_member(zf, key, name: str, flag: str = "--data"):
    """Open an .npy member of a zip for streaming: (file object, shape, dtype). Its stored size must be exactly
    its header and its records: a member declared shorter or longer would be read past or short of its end."""
    import zipfile

    try:
        info = zf.getinfo(f"{key}.npy")
        f = zf.open(info)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        shape, header = tuple(int(d) for d in shape), f.tell()
        if any(d < 0 for d in shape):
            raise ValueError("a negative dimension")
    except (*_NPZ_ERRORS, zipfile.BadZipFile):
        raise MepfError(f"{flag} {name}: array '{key}' has an unreadable .npy header; save the arrays again with "
                        "np.savez") from None
    if fortran and len(shape) > 1:
        raise MepfError(f"array '{key}' is stored in Fortran order; save it with np.ascontiguousarray")
    if dtype.hasobject:
        raise MepfError(f"array '{key}' holds Python objects; store plain numbers")
    size = header + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if info.file_size != size or (info.compress_type == zipfile.ZIP_STORED and info.compress_size != size):
        raise MepfError(f"{flag} {name}: array '{key}' is stored with another length than its header declares (a "
                        "damaged or crafted file); save the arrays again with np.savez")
    return f, shape, dtype


#: filters HDF5 and h5py carry themselves (deflate, shuffle, fletcher32, szip, n-bit, scale-offset, LZF): any
#: other id makes HDF5 search its plugin folders (and $HDF5_PLUGIN_PATH) for a library to load on the first read
H5_BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})


def _stored_inside(h5, key: str, path: Path) -> None:
    """A dataset whose records are all inside this file, read by HDF5's own code: the bytes the ranks' plan
    hashes (embed/plan.py) are then the records; an external link, external raw storage or a virtual dataset
    would read another file, and a filter HDF5 lacks would load a plugin library (its ids are read from the
    dataset's description; nothing is loaded)."""
    import h5py

    link = h5.get(key, getlink=True)
    ds = h5[key] if isinstance(link, h5py.HardLink) else None
    if not isinstance(ds, h5py.Dataset) or ds.is_virtual or ds.external:
        raise MepfError(f"--data {path.name}: '{key}' is stored outside the file (a link, external storage or a "
                        "virtual dataset); store the arrays inside it, e.g. h5py's f.create_dataset(name, data=...)")
    plist = ds.id.get_create_plist()
    if any(plist.get_filter(i)[0] not in H5_BUILTIN_FILTERS for i in range(plist.get_nfilters())):
        raise MepfError(f"--data {path.name}: '{key}' is compressed by a filter HDF5 does not carry (a plugin "
                        "library); store it uncompressed or with gzip, e.g. f.create_dataset(name, data=...)")


class ArraySource(Source):
    """Images (N,H,W) or (N,H,W,C) uint8 (or float in [0,1]) with optional integer labels, from .npz or .h5;
    also (N,C,H,W), torch's layout and DPImageBench's gen.npz, where C is 1 or 3 and the last axis is not.

    Keys: images in 'images' or 'x', labels in 'labels' or 'y'. The label set is declared by `classes`.
    The constructor reads the headers only; `blocks` opens the file for each pass.
    """

    def __init__(self, path, classes: list | None):
        path = Path(path)
        if not path.is_file():
            raise MepfError(f"--data {path}: " + ("not a plain file; pass the data file itself" if path.exists()
                                                  else "no such file"))
        self.path, self.kind = path, path.suffix.lower()
        self._identity = stat_identity(path)  # before anything is read: every later open must find this file
        if self.kind == ".npz":
            import zipfile

            try:
                with open_unchanged(path, self._identity) as fz, zipfile.ZipFile(fz) as zf:
                    keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                    self._ikey = self._pick(keys, ("images", "x"), "images")
                    self._lkey = self._pick(keys, ("labels", "y"), None)
                    f, self._shape, self._dtype = _npz_member(zf, self._ikey, path.name)
                    f.close()
                    if self._lkey:
                        f, lshape, self._ldtype = _npz_member(zf, self._lkey, path.name)
                        f.close()
                        self._check_labels_meta(lshape, self._ldtype)
            except (*_NPZ_ERRORS, zipfile.BadZipFile):
                raise MepfError(f"--data {path} is not a valid .npz file") from None
        elif self.kind in (".h5", ".hdf5"):
            import h5py

            no_hdf5_plugins()
            try:
                # h5py opens by the file object, never the name: a FIFO put in the name's place would block its open
                with open_unchanged(path, self._identity) as fo, h5py.File(fo, "r") as h5:
                    keys = list(h5.keys())
                    self._ikey = self._pick(keys, ("images", "x"), "images")
                    self._lkey = self._pick(keys, ("labels", "y"), None)
                    for key in filter(None, (self._ikey, self._lkey)):
                        _stored_inside(h5, key, path)
                    self._shape, self._dtype = h5[self._ikey].shape, h5[self._ikey].dtype
                    if self._lkey:
                        self._check_labels_meta(h5[self._lkey].shape, h5[self._lkey].dtype)
            except (OSError, TypeError, ValueError, KeyError, RuntimeError):  # TypeError: a dtype numpy lacks
                raise MepfError(f"--data {path} is not a readable HDF5 file of images (and labels) numpy can "
                                "represent; write it with h5py from uint8 or float arrays") from None
        else:
            raise MepfError(f"--data {path}: unsupported file type {path.suffix}; use .npz, .h5 or an image folder")
        s = self._shape
        # images are at least 8 px a side: an RGBA array of height 1 or 3 is refused, not read as channels-first
        self._channels_first = len(s) == 4 and s[3] not in (1, 3) and s[1] in (1, 3) and min(s[2], s[3]) >= 8
        if len(s) not in (3, 4) or (len(s) == 4 and s[3] not in (1, 3) and not self._channels_first):
            raise MepfError(f"images in {path.name} have shape (N, {', '.join(map(str, s[1:]))}); expected "
                            "(N,H,W), (N,H,W,C) or (N,C,H,W) with C 1 or 3")
        if not (self._dtype == np.uint8 or np.issubdtype(self._dtype, np.floating)):
            raise MepfError(f"images in {path.name} have dtype {self._dtype}; expected uint8 (0-255) or float in [0,1]")
        if self._shape[0] == 0:
            raise MepfError(f"--data {path} holds no images")
        if self._lkey and classes is None:
            raise MepfError(f"{path.name} has labels; declare the label set with --classes (a count or "
                            f"comma-separated names)")
        if not self._lkey and classes is not None:
            raise MepfError(f"--classes given but {path.name} has no 'labels' or 'y' array")
        self.classes = classes
        self.description = "array file" + (" (labelled)" if classes else " (unlabelled)")

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
            raise MepfError("labels must be a 1-d array with one integer per image; store them so")
        if not np.issubdtype(dtype, np.integer):
            raise MepfError(f"labels have dtype {dtype}; expected integers 0..K-1")

    def listing_digest(self) -> str:
        return files_digest([self.path], [self._identity])

    def file_identity(self) -> tuple:
        return (self._identity,)

    @property
    def geometry(self) -> tuple:
        s = self._shape
        return (s[1], s[2], 1) if len(s) == 3 else (s[2], s[3], s[1]) if self._channels_first else tuple(s[1:])

    def __len__(self) -> int:
        return int(self._shape[0])

    def _raw_blocks(self, block_size, keep):
        n, rec = len(self), tuple(self._shape[1:])
        starts = list(enumerate(range(0, n, block_size)))
        if self.kind == ".npz":
            import zipfile

            # one ZipFile (one file handle) per member: from Python 3.12 a seek in a stored member moves the file
            # position that other open members of the same ZipFile read from, so skipped blocks shifted what the
            # labels (or images) read next: other records' bytes, silently, or an EOFError
            with open_unchanged(self.path, self._identity) as f1, open_unchanged(self.path, self._identity) as f2, \
                    zipfile.ZipFile(f1) as zf, zipfile.ZipFile(f2) as zl:
                fi, _, dt = _npz_member(zf, self._ikey, self.path.name)
                fl = _npz_member(zl, self._lkey, self.path.name) if self._lkey else None
                per = int(np.prod(rec)) * dt.itemsize
                for b, start in starts:
                    m = min(block_size, n - start)
                    if not kept(keep, b):  # skip without decoding (a seek; compressed members decompress)
                        fi.seek(per * m, 1)
                        if fl:
                            fl[0].seek(fl[2].itemsize * m, 1)
                        continue
                    x = np.frombuffer(fi.read(per * m), dtype=dt).reshape((m,) + rec)
                    y = np.frombuffer(fl[0].read(fl[2].itemsize * m), dtype=fl[2]) if fl else None
                    yield b, x, y
                fi.close()
                if fl:
                    fl[0].close()
                check_unchanged(f1.fileno(), self._identity, self.path)  # not rewritten in place while read
        else:
            import h5py

            no_hdf5_plugins()  # in each loader worker and rank too
            with open_unchanged(self.path, self._identity) as fo, h5py.File(fo, "r") as h5:
                fd = fo.fileno()
                for key in filter(None, (self._ikey, self._lkey)):
                    _stored_inside(h5, key, self.path)
                ds, ls = h5[self._ikey], (h5[self._lkey] if self._lkey else None)
                for b, start in starts:
                    if kept(keep, b):
                        part = slice(start, start + block_size)
                        yield b, ds[part], (ls[part] if ls is not None else None)
                check_unchanged(fd, self._identity, self.path)

    def blocks(self, block_size: int, keep=None):
        k = len(self.classes) if self.classes else None
        zero = self.bad_records == "zero"
        for b, x, y in self._raw_blocks(block_size, keep):
            replaced = None
            if x.dtype != np.uint8:
                with np.errstate(invalid="ignore"):
                    bad = (~np.isfinite(x) | (x < 0) | (x > 1)).reshape(len(x), -1).any(axis=1)
                if bad.any():
                    if not zero:
                        raise MepfError(f"an image in {self.path.name} has NaN, inf or values outside [0,1]; "
                                        "float images must be finite and in [0,1]: rescale them (x / 255 from "
                                        "0..255, (x + 1) / 2 from [-1,1]) or store uint8 (mepf embed: or "
                                        "--bad-records zero)")
                    # each such record as stored (its layout aside) identifies it; the pass embeds black
                    rows = x if x.ndim == 3 or not self._channels_first else x.transpose(0, 2, 3, 1)
                    replaced = {int(i): Replaced(replaced_identity(values=rows[i])) for i in np.flatnonzero(bad)}
                with np.errstate(over="ignore", invalid="ignore"):
                    x = x.astype(np.float32)
            if x.ndim == 3:
                x = x[..., None]
            elif self._channels_first:
                x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
            if y is not None:
                y = y.astype(np.int64)
                if not zero and ((y < 0) | (y >= k)).any():  # under zero, the pass drops such records
                    raise MepfError(f"a label in {self.path.name} is outside 0..{k - 1}, the {k} classes declared "
                                    "(by --classes, or the file's class_names); declare the full label set or fix "
                                    "the labels (mepf embed: or --bad-records zero, which drops such records)")
            yield b, (x if replaced is None else [replaced.get(i, r) for i, r in enumerate(x)]), y
