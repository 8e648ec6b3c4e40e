"""What someone who controls one record, one file in the folder or the weights file can make stage 1 do.
Each test is written from the attacker's side and runs the real command line on real files."""
from __future__ import annotations

import hashlib
import math
import re
import shutil
import stat

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mepf.artifacts import load
from mepf.artifacts.errors import MepfError
from mepf.cli import main
from mepf.core.features import BACKBONES, _effnet_pretrained, build_feature_map
from mepf.embed import release_log
from mepf.embed.files import FolderSource
from mepf.embed.transform import Transform
from tests.conftest import Payload, fails_if_blocked, make_images

TINY = ["--backbone", "resnet18", "--weights", "random", "--layers", "pixels"]  # a map that costs microseconds


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def embed(data, out, log, *extra):
    return cli("embed", "--data", data, "--out", out, "--epsilon", "1", "--delta", "1e-6", "--release-log", log,
               "--quiet", *extra)


# --------------------------------------------------------------------------- the weights file

def overflowing_weights(path):
    """EfficientNet-Lite0's real weights with one channel of block0's last batch norm scaled so that its
    activations overflow float32 for some images (+inf, -inf) and stay finite for others."""
    state = torch.load(_effnet_pretrained("efficientnet-lite0")[0], map_location="cpu", weights_only=True)
    w = state["_blocks.0._bn2.weight"].clone()
    w[7] *= 1.94e37
    torch.save({**state, "_blocks.0._bn2.weight": w}, path)
    return path


@pytest.mark.parametrize("layers", ["stem,block0", "stem,block0,block1"])  # +-inf alone; then NaN from inf - inf
def test_overflowing_weights_file_cannot_break_the_bound(tmp_path, layers):
    weights = overflowing_weights(tmp_path / "hostile.pt")
    x = np.concatenate([make_images(10, seed=1), np.full((1, 28, 28, 1), 255, np.uint8), np.zeros((1, 28, 28, 1),
                                                                                                  np.uint8)])
    y = np.arange(12)  # one record per class: two -2**63 entries in one sum would wrap back and hide a bad row
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    ex, _ = build_feature_map("efficientnet-lite0", str(weights), layers.split(","), image_size=(28, 28), channels=1)
    with torch.no_grad():
        f = ex(Transform((28, 28), 1)(x))
    finite = torch.isfinite(f).all(1)
    assert 0 < int(finite.sum()) < 12 and bool(torch.isinf(f).any())  # a real mix of finite and overflowing rows
    assert bool(torch.isnan(f).any()) == ("block1" in layers)
    r = cli("embed", "--data", tmp_path / "d.npz", "--classes", "12", "--out", tmp_path / "x.h5", "--epsilon", "inf",
            "--delta", "1e-5", "--weights", weights, "--layers", layers, "--release-log",
            tmp_path / "log.jsonl", "--quiet")
    assert r.exit_code == 0, r.output + r.stderr
    rel = load(tmp_path / "x.h5")  # eps = inf: the file holds the exact sums
    counts = rel.arrays["counts"]
    np.testing.assert_array_equal(counts, np.ones(12))
    for m, c in (("S1", 1.0), ("S2", 1.0)):
        norms = np.linalg.norm(rel.arrays[m].astype(np.float64), axis=1)
        assert (norms <= counts * c * (1 + 1e-6)).all(), (m, norms, counts)
    norms = np.linalg.norm(rel.arrays["S1"].astype(np.float64), axis=1)
    assert (norms[finite.numpy()] > 0.999).all() and (norms[~finite.numpy()] == 0).all()  # the fixed rule, exactly


def test_weights_file_with_non_finite_values_is_refused(tmp_path, labelled_npz):
    state = torch.load(_effnet_pretrained("efficientnet-lite0")[0], map_location="cpu", weights_only=True)
    bad = state["_blocks.0._project_conv.weight"].clone()
    bad[0, 0, 0, 0] = float("nan")
    torch.save({**state, "_blocks.0._project_conv.weight": bad}, tmp_path / "nan.pt")
    r = cli("embed", "--data", labelled_npz[0], "--classes", "3", "--out", tmp_path / "x.h5", "--epsilon", "1",
            "--delta", "1e-5", "--weights", tmp_path / "nan.pt", "--release-log", tmp_path / "log.jsonl", "--quiet")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "NaN or infinite" in r.stderr
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "log.jsonl").exists()


def test_a_weights_file_of_views_declaring_gigabytes_is_one_line(tmp_path, labelled_npz):
    """47 MB of weights with an unused key declaring 16 GB as a stride-0 view: the finiteness check allocated it
    (killed for memory); a file's tensors may now declare no more bytes than it holds."""
    import resource
    import subprocess
    import sys

    state = torch.load(_effnet_pretrained("efficientnet-lite0")[0], map_location="cpu", weights_only=True)
    torch.save({**state, "junk": torch.zeros(()).expand(1 << 32)}, tmp_path / "views.pt")

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    p = subprocess.run([sys.executable, "-m", "mepf", "embed", "--data", str(labelled_npz[0]), "--classes", "3",
                        "--out", str(tmp_path / "x.h5"), "--epsilon", "1", "--delta", "1e-5", "--weights",
                        str(tmp_path / "views.pt"), "--release-log", str(tmp_path / "log.jsonl"), "--quiet"],
                       capture_output=True, text=True, preexec_fn=cap, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "declare more bytes" in p.stderr, p.stderr
    assert not (tmp_path / "x.h5").exists()


# --------------------------------------------------------------------------- files that could run code

def test_planted_hub_weights_file_is_refused_unread(tmp_path, monkeypatch, labelled_npz):
    """A file put under torch's hub cache with the published name is refused by its hash, never unpickled."""
    import torchvision

    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({**state, "note": Payload(marker)}, tmp_path / "hub" / "checkpoints" / name)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    r = cli("embed", "--data", labelled_npz[0], "--classes", "3", "--out", tmp_path / "x.h5", "--epsilon", "1",
            "--delta", "1e-5", "--backbone", "resnet18", "--layers", "stem", "--release-log", tmp_path / "log.jsonl",
            "--quiet")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output + r.stderr
    assert "is not the published resnet18 weights file" in r.stderr and "delete it" in r.stderr
    assert not marker.exists() and not (tmp_path / "x.h5").exists()
    # a file whose hash does match its published name is what gets loaded (a name made for this file here)
    import hashlib
    from types import SimpleNamespace

    from mepf.core import features

    torch.save(state, tmp_path / "w.pth")
    digest = hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    made = f"resnet18-{digest[:8]}.pth"
    (tmp_path / "w.pth").rename(tmp_path / "hub" / "checkpoints" / made)
    monkeypatch.setattr(features, "_torchvision_weights",
                        lambda b: SimpleNamespace(url=f"https://example.org/{made}"))
    # a name torchvision might use one day, with no published full hash here: refused, never read
    with pytest.raises(MepfError, match="does not know"):
        build_feature_map("resnet18", "pretrained", ["stem"], image_size=(28, 28), channels=1)
    # the file matches its name's 8-hex prefix but not the published full hash: refused (a 32-bit prefix can be
    # matched by a planted file; only the full SHA-256 counts)
    size = (tmp_path / "hub" / "checkpoints" / made).stat().st_size
    wrong = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]
    monkeypatch.setitem(features._HUB_PUBLISHED, made, (wrong, size))
    with pytest.raises(MepfError, match="is not the published resnet18 weights file .its SHA-256"):
        build_feature_map("resnet18", "pretrained", ["stem"], image_size=(28, 28), channels=1)
    monkeypatch.setitem(features._HUB_PUBLISHED, made, (digest, size + 1))  # refused by its size, before it is read
    with pytest.raises(MepfError, match=f"is not the published resnet18 weights file .it has {size} bytes"):
        build_feature_map("resnet18", "pretrained", ["stem"], image_size=(28, 28), channels=1)
    monkeypatch.setitem(features._HUB_PUBLISHED, made, (digest, size))
    ex, _ = build_feature_map("resnet18", "pretrained", ["stem"], image_size=(28, 28), channels=1)
    loaded = [t for n, t in ex.state_dict().items() if n.endswith("weight") and t.dim() == 4][0]
    assert torch.equal(loaded, state["conv1.weight"])


def test_weights_files_that_are_not_plain_or_too_large_are_refused_unread(tmp_path, monkeypatch):
    """A FIFO given as --weights, or put at the published name in torch's hub cache, is refused at once (never
    waited on); a file larger than any weights mepf reads is refused by its size, not read into memory."""
    import os

    from mepf.core import tensor_file

    os.mkfifo(tmp_path / "fifo.pt")
    with open(tmp_path / "big.pt", "wb") as f:
        f.truncate(tensor_file.MAX_BYTES + 1)  # sparse: no disk used
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    os.mkfifo(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    with fails_if_blocked(30):
        for weights, why in ((tmp_path / "fifo.pt", "not a plain file"),
                             (tmp_path / "big.pt", "more than the 4,294,967,296 mepf reads")):
            with pytest.raises(MepfError, match=why):
                build_feature_map("efficientnet-lite0", str(weights), ["stem"], image_size=(28, 28), channels=1)
        with pytest.raises(MepfError, match="not the published resnet18 weights file .it is not a plain file"):
            build_feature_map("resnet18", "pretrained", ["stem"], image_size=(28, 28), channels=1)


def test_hub_weights_table_names_torchvisions_files():
    """Every torchvision backbone's published file has a full SHA-256 here, consistent with its name's prefix."""
    from mepf.core import features, tensor_file

    hub = [b for b in BACKBONES if b not in features._EFFNET_BLOCKS]
    assert hub, "no torchvision backbone to check"
    for backbone in hub:
        name = features._torchvision_weights(backbone).url.rsplit("/", 1)[-1]
        full, size = features._HUB_PUBLISHED[name]
        assert re.fullmatch(r"[0-9a-f]{64}", full) and full.startswith(re.search(r"-([0-9a-f]{8})\.", name).group(1))
        assert 10 << 20 < size < tensor_file.MAX_BYTES


def tensor_file_naming(path, name: str):
    """A real torch zip file whose one storage is looked up under `name`: torch's error quotes the name."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as out:
        for entry in zin.namelist():
            data = zin.read(entry)
            if entry.endswith("data.pkl"):  # protocol 2: the storage key '0' is BINUNICODE of length 1
                key, new = b"X\x01\x00\x00\x000", name.encode()
                assert data.count(key) == 1
                data = data.replace(key, b"X" + len(new).to_bytes(4, "little") + new)
            out.writestr(entry, data)
    return path


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet-lite0"])
@pytest.mark.parametrize("hostile", ["code", "escapes"])
def test_given_weights_file_runs_nothing_and_is_refused_in_one_plain_line(tmp_path, labelled_npz, backbone, hostile):
    """--weights PATH from someone else: loaded as tensors only; the loader's many-line text, and the terminal
    control sequences a file can make it quote, become one printable line that says what to pass instead."""
    import torchvision

    marker = tmp_path / "pwned"
    if hostile == "code":
        state = torchvision.models.resnet18(weights=None).state_dict()
        torch.save({**state, "note": Payload(marker)}, tmp_path / "w.pt")
    else:
        tensor_file_naming(tmp_path / "w.pt", "\x1b]0;owned\x07\x1b[2J\x1b[8m\u202e")
    r = cli("embed", "--data", labelled_npz[0], "--classes", "3", "--out", tmp_path / "x.h5", "--epsilon", "1",
            "--delta", "1e-5", "--backbone", backbone, "--weights", tmp_path / "w.pt", "--layers",
            "stem" if backbone == "resnet18" else "block0", "--release-log", tmp_path / "log.jsonl", "--quiet")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output + r.stderr
    assert r.stderr.strip().isprintable() and r.stderr.isascii(), repr(r.stderr)
    assert "cannot read weights file" in r.stderr and "w.pt" in r.stderr and "torch.save(model.state_dict()" in r.stderr
    assert ("objects other than tensors" in r.stderr) == (hostile == "code")
    assert not marker.exists() and not (tmp_path / "x.h5").exists()


def test_a_log_or_key_readable_by_others_is_narrowed_and_a_key_that_cannot_be_is_named(tmp_path, monkeypatch):
    """Log and key readable by others are narrowed to 0600 and reported. A key that embed cannot narrow (e.g.
    restored by another user) is named in the error, not the log, whose advice (a new log) would break
    composition. Run as root here, so chmod itself is made to fail: root can narrow any file."""
    import os
    log = tmp_path / "log.jsonl"
    key, narrowed, created = release_log.prepare(log, [])
    assert created
    assert narrowed == []
    for p in (log, release_log.key_path(log)):
        p.chmod(0o644)
    assert release_log.prepare(log, []) == (key, [str(log), str(release_log.key_path(log))], False)  # narrowed
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (log, release_log.key_path(log)))
    release_log.key_path(log).chmod(0o644)

    def refused(*_):
        raise PermissionError("not the owner")

    monkeypatch.setattr(os, "chmod", refused)
    with pytest.raises(MepfError, match=r"release log key .*log\.jsonl\.key is readable by others .*chmod 600"):
        release_log.prepare(log, [])


def cifar_folder(root, images, labels, extra=None):
    """torchvision's cifar-10-batches-py with one test batch (a Python pickle of a dict, as published)."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    d = {"batch_label": "testing batch 1 of 1", "labels": labels, "data": images,
         "filenames": [f"img_{i}.png" for i in range(len(labels))], **(extra or {})}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(d, f, protocol=2)
    return root


def test_cifar_batches_are_read_as_arrays_and_a_planted_one_runs_nothing(tmp_path):
    from mepf.embed.datasets import named_source

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (10000, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, 10000)]
    good = named_source("cifar10:test", cifar_folder(tmp_path / "good", x, y), download=False)
    blocks = list(good.blocks(4096))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]),
                                  x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]), y)
    marker = tmp_path / "pwned"
    for extra in ({"note": Payload(marker)}, {"data": [Payload(marker)]}):
        root = cifar_folder(tmp_path / f"bad{len(list(tmp_path.iterdir()))}", x, y, extra)
        r = embed("cifar10:test", tmp_path / "x.h5", tmp_path / "log.jsonl", "--data-root", root, *TINY)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output + r.stderr
        assert "is not a CIFAR-10 batch file" in r.stderr
        assert not marker.exists() and not (tmp_path / "x.h5").exists()


def test_a_negative_label_in_a_named_dataset_is_refused_not_counted_in_class_0(tmp_path):
    rng = np.random.default_rng(1)
    y = [int(v) for v in rng.integers(0, 10, 10000)]
    y[5000] = -1
    root = cifar_folder(tmp_path, rng.integers(0, 256, (10000, 3072), dtype=np.uint8), y)
    r = embed("cifar10:test", tmp_path / "x.h5", tmp_path / "log.jsonl", "--data-root", root, *TINY)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output + r.stderr
    assert "a label is outside the 10 declared classes" in r.stderr and not (tmp_path / "x.h5").exists()


def test_a_huge_record_prints_no_pixel_count(tmp_path, monkeypatch):
    """Pillow warns about large images with their pixel count; a 28 x 28 record is 'large' here."""
    import warnings

    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)  # warns above 500 pixels, refuses above 1,000
    root = tmp_path / "D" / "a"
    root.mkdir(parents=True)
    for i, im in enumerate(make_images(3, seed=4)):
        PILImage.fromarray(im[:, :, 0]).save(root / f"{i}.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = embed(tmp_path / "D", tmp_path / "x.h5", tmp_path / "log.jsonl", "--workers", "0", *TINY, "--force",
                  "--image-size", "28", "--channels", "1")
    assert r.exit_code == 0, r.output + r.stderr
    assert not [w for w in seen if issubclass(w.category, PILImage.DecompressionBombWarning)]
    assert "784 pixels" not in r.output + r.stderr and "exceeds limit" not in r.output + r.stderr


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_1bit(path, w, h):
    """A valid 1-bit black PNG of w x h pixels, a few KB however large (deflate of zero rows)."""
    import struct
    import zlib

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (w + 7) // 8)
    data = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data)
                     + png_chunk(b"IEND", b""))


def released_shapes(tmp_path, name, extra=None, *options) -> dict:
    """The shapes of the release (--out tmp_path/name.h5) of a folder of 3 small images and, if given, the file
    `extra` as one more image: D and D plus one record must give the same."""
    root = tmp_path / name / "a"
    root.mkdir(parents=True)
    for i, im in enumerate(make_images(3, seed=4)):
        Image.fromarray(im[:, :, 0]).save(root / f"{i}.png")
    if extra is not None:
        shutil.copy(extra, root / f"z{extra.suffix}")
    r = embed(tmp_path / name, tmp_path / f"{name}.h5", tmp_path / f"{name}.jsonl", "--workers", "0", *TINY,
              "--force", "--image-size", "28", "--channels", "1", *options)
    assert r.exit_code == 0, r.output + r.stderr
    return {k: v.shape for k, v in load(tmp_path / f"{name}.h5").arrays.items()}


def test_a_record_larger_than_any_decoder_allows_does_not_choose_the_outcome(tmp_path):
    """A 25 KB PNG declaring 200 M pixels made Pillow refuse it (DecompressionBombError) and so stopped the
    release: D gave a file, D plus that one record an error. Now a fixed rule: a PNG above MAX_DECODED_PIXELS is
    one black pixel, a JPEG is decoded at its DCT's 1/2, 1/4 or 1/8 scale; both embed, with the same shapes."""
    from PIL import Image as PILImage

    from mepf.embed.files import MAX_DECODED_PIXELS, decode_image
    from mepf.embed.fingerprint import replaced_identity
    from mepf.embed.sources import Replaced

    limit = PILImage.MAX_IMAGE_PIXELS
    png_1bit(tmp_path / "huge.png", 20000, 10000)
    assert (tmp_path / "huge.png").stat().st_size < 100_000
    got = decode_image(tmp_path / "huge.png")  # embedded as one black pixel; to the repeat check its own bytes
    assert isinstance(got, Replaced) and got.identity == replaced_identity(file_bytes=hashlib.sha256(
        (tmp_path / "huge.png").read_bytes()).digest())
    big = PILImage.new("L", (8200, 8200), 0)  # 67.2 M pixels, just above the cap
    big.paste(255, (0, 0, 4100, 4100))
    big.save(tmp_path / "big.jpg", quality=50)
    del big
    got = decode_image(tmp_path / "big.jpg")
    assert got.shape == (4100, 4100, 1) and got.size <= MAX_DECODED_PIXELS  # half scale, the content kept
    assert got[:2000, :2000].min() > 200 and got[2100:, 2100:].max() < 50
    # sides that k does not divide (odd, 1 mod 4, 1 mod 8), and a quarter scale
    for (w, h), want in (((8193, 8193), (4097, 4097)), ((9001, 8000), (4000, 4501)), ((16385, 16385), (4097, 4097))):
        PILImage.new("L", (w, h), 128).save(tmp_path / "odd.jpg", quality=50)
        got = decode_image(tmp_path / "odd.jpg")
        assert got.shape[:2] == want and got.size <= MAX_DECODED_PIXELS, (w, h, got.shape)
    assert PILImage.MAX_IMAGE_PIXELS == limit  # Pillow's own limit is back for every other reader
    assert (released_shapes(tmp_path, "D") == released_shapes(tmp_path, "D_png", tmp_path / "huge.png")
            == released_shapes(tmp_path, "D_jpg", tmp_path / "big.jpg"))


def test_a_tiny_progressive_jpeg_declaring_a_huge_image_is_one_black_pixel(tmp_path, monkeypatch):
    """libjpeg decodes a progressive JPEG through the coefficients of the whole image at full size, whatever scale
    is asked: a 557-byte file declaring 32,768 x 32,768 took 3.3 GB, and 65,535 x 65,535 would take 13 (review 29's
    cap-sized PNG, found again in JPEG). Its whole-image buffers are now capped (JPEGMEM), so such a file is one
    black pixel under --bad-records zero, an undecodable image otherwise; every JPEG within the decoding cap,
    progressive and four components included, still decodes; the caller's JPEGMEM does not decide."""
    import io
    import os
    import struct

    from mepf.embed.files import decode_image
    from mepf.embed.fingerprint import replaced_identity
    from mepf.embed.sources import Replaced

    b = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(b, "JPEG", progressive=True, quality=80)
    data = bytearray(b.getvalue())
    sof = data.find(b"\xff\xc2")  # SOF2: length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = struct.pack(">HH", 32768, 32768)
    (tmp_path / "huge.jpg").write_bytes(bytes(data))
    monkeypatch.setenv("JPEGMEM", "99999M")  # the caller's own: not what decides
    got = decode_image(tmp_path / "huge.jpg", zero=True)
    assert isinstance(got, Replaced) and got.identity == replaced_identity(file_bytes=hashlib.sha256(data).digest())
    with pytest.raises(MepfError, match="cannot read image"):
        decode_image(tmp_path / "huge.jpg")
    assert os.environ["JPEGMEM"] == "560M"  # mepf's, for the rest of its process
    for mode, colour in (("RGB", (1, 2, 3)), ("CMYK", (0, 50, 100, 150))):  # at the cap, 4:4:4, 4 components
        Image.new(mode, (8192, 8192), colour).save(tmp_path / "cap.jpg", quality=95, progressive=True, subsampling=0)
        got = decode_image(tmp_path / "cap.jpg")
        with Image.open(tmp_path / "cap.jpg") as im:
            want = np.asarray(im.convert("RGB").crop((0, 0, 64, 64)))
        assert got.shape == (8192, 8192, 3) and np.array_equal(got[:64, :64], want), mode
        del got
    assert (released_shapes(tmp_path, "D", None, "--bad-records", "zero")
            == released_shapes(tmp_path, "D_huge", tmp_path / "huge.jpg", "--bad-records", "zero"))


def test_pixels_converted_in_tiles_are_pillows_whole_conversion(tmp_path, monkeypatch):
    """A record at the cap cost 900 MB above its array in Pillow's whole converted copy and its bytes (review 29);
    images are converted in tiles now. Tiles of 4 x 4 pixels here (and a whole row wider than a tile) give what
    Pillow's conversion of the whole image gives, for every mode PNG and JPEG decode to."""
    from mepf.embed import files

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (13, 11, 3), np.uint8)
    p = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=7)
    p.info["transparency"] = 2
    made = {"RGB": Image.fromarray(rgb), "RGBA": Image.fromarray(rgb).convert("RGBA"), "P": p,
            "L": Image.fromarray(rgb[..., 0]), "LA": Image.fromarray(rgb).convert("LA"),
            "1": Image.fromarray(rgb[..., 1]).convert("1"),
            "I;16": Image.fromarray(rng.integers(0, 65536, (13, 11), np.uint16))}
    for mode, im in made.items():
        im.save(tmp_path / f"{mode.replace(';', '')}.png", **({"transparency": 2} if mode == "P" else {}))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    Image.fromarray(rgb[..., 2]).save(tmp_path / "grey.jpg", quality=90)
    whole = {}
    for f in sorted(tmp_path.iterdir()):
        with Image.open(f) as im:
            im.load()
            if im.mode == "I;16":
                want = (np.asarray(im) >> 8).astype(np.uint8)
            else:
                want = np.asarray(im.convert("L" if im.mode in files.GREY_MODES else "RGB"))
        whole[f.name] = (im.mode, want if want.ndim == 3 else want[:, :, None])
    assert {m for m, _ in whole.values()} >= {"RGB", "RGBA", "P", "L", "LA", "1", "I;16", "CMYK"}
    for strip in (64, 16):  # tiles of 16 pixels (rows of 11 then a tile of 4 rows); tiles of 4 x 1
        monkeypatch.setattr(files, "STRIP_BYTES", strip)
        for name, (mode, want) in whole.items():
            got = files.decode_image(tmp_path / name)
            assert got.dtype == np.uint8 and np.array_equal(got, want), (strip, mode)


def png_of_zeros(path, w, h, colour=2, depth=8):
    """A valid PNG of w x h zero pixels (colour type 0, 2, 4 or 6), streamed through zlib: a few hundred KB at most."""
    import struct
    import zlib

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + w * {0: 1, 2: 3, 4: 2, 6: 4}[colour] * depth // 8)
    data = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
                     + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))
    return path


def decode_under_limit(paths, spare_mb: int, zero: bool = True) -> list:
    """decode_image of each file in a fresh process whose address space (RLIMIT_AS) leaves `spare_mb` MB beyond
    what it holds after its imports: one line each, 'ndarray SHAPE SUM', the class of another result, or the
    start of a MepfError's text."""
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "import PIL.Image, PIL.PngImagePlugin, PIL.JpegImagePlugin  # imported before the limit\n"
        "from mepf.embed.files import decode_image\n"
        "from mepf.artifacts.errors import MepfError\n"
        "vm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')][0] * 1024\n"
        "hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (int(sys.argv[1]) << 20), hard))\n"
        "for name in sys.argv[3:]:\n"
        "    try:\n"
        "        a = decode_image(Path(name), zero=sys.argv[2] == '1')\n"
        "        print(f'ndarray {a.shape} {int(a.sum())}' if isinstance(a, np.ndarray) else type(a).__name__)\n"
        "    except MepfError as e:\n"
        "        print(str(e)[:28])\n")
    r = subprocess.run([sys.executable, "-c", script, str(spare_mb), "1" if zero else "0", *map(str, paths)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


def test_a_machine_out_of_memory_is_said_never_a_black_record(tmp_path):
    """Under --bad-records zero a MemoryError while decoding made the record the black image, a rule of the free
    memory (review 29); and where libjpeg's or zlib's own allocation failed (an OSError, as a corrupt file gives) it
    still did (review 30: a valid progressive JPEG was black under `ulimit -v 4 GB`, decoded under 6). Now, under
    address-space limits from too little to enough, each image is decoded or the run is told it is out of memory,
    never the black image; an 8 x 8 image decodes under every one of them."""
    png_of_zeros(tmp_path / "cap.png", 4096, 4096)
    Image.new("CMYK", (2048, 2048), (0, 50, 100, 150)).save(tmp_path / "prog.jpg", quality=90, progressive=True,
                                                           subsampling=0)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "small.png")
    for name in ("cap.png", "prog.jpg"):
        seen = set()
        for extra in (40, 80, 120, 160, 200, 250, 300, 400, 700):
            got, small = decode_under_limit([tmp_path / name, tmp_path / "small.png"], extra)
            assert small.startswith("ndarray"), (name, extra, small)
            got = got.split(" (")[0]
            assert got == "ndarray" or got.startswith("out of memory while decoding"), (name, extra, got)
            seen.add(got)
        assert len(seen) == 2, (name, seen)  # both sides of the limit were reached


def test_a_png_with_a_side_past_a_jpegs_is_one_black_pixel_whatever_the_memory(tmp_path):
    """Pillow raises MemoryError, allocating nothing, for a PNG row of more than 2^31 bits: 67,108,860 x 1 RGBA (a
    254 KB file, within 2^26 pixels) or 16-bit RGB over 44.7 M wide (review 30: read as the machine's memory, D plus
    that one record gave an error where D gave a file); and a valid 489 KB PNG of 1 x 2^26 took 8 GB in the resize's
    first pass (review 31). A PNG with a side over 65,535 (a JPEG's longest) is now one black pixel, by its header."""
    from mepf.embed.files import MAX_PNG_SIDE, decode_image
    from mepf.embed.sources import Replaced

    for w, h, colour, depth in ((67_108_860, 1, 6, 8), (50_000_000, 1, 2, 16), (MAX_PNG_SIDE + 1, 1, 0, 1),
                                (1, MAX_PNG_SIDE + 1, 0, 1)):
        path = png_of_zeros(tmp_path / "long.png", w, h, colour, depth)
        assert isinstance(decode_image(path), Replaced) and isinstance(decode_image(path, zero=True), Replaced)
    for w, h in ((MAX_PNG_SIDE, 1), (1, MAX_PNG_SIDE)):
        assert decode_image(png_of_zeros(tmp_path / "ok.png", w, h, 0, 8)).shape == (h, w, 1)
    png_of_zeros(tmp_path / "wide.png", 67_108_860, 1, 6, 8)
    assert released_shapes(tmp_path, "D") == released_shapes(tmp_path, "D_wide", tmp_path / "wide.png")


def test_no_read_of_an_image_asks_for_what_its_header_declares(tmp_path):
    """Pillow skips the rest of a PNG's IDAT chunk with one read of its declared length, which Python allocates
    before reading: a valid 28 x 28 PNG whose IDAT declares 4 GB asked for 4 GB, so under an address-space limit
    it was 'out of memory' and the run stopped, D plus it an error (review 31). Reads are now bounded by the bytes
    the file holds (it decodes, in a process with 1 GB to spare), and nothing after the rows is read (a 100 MB tail
    there, which a valid PNG may hold: review 32)."""
    import struct
    import zlib

    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    stream = zlib.compress(b"".join(b"\x00" + pixels[r].tobytes() for r in range(28)))
    crafted = tmp_path / "idat4g.png"
    crafted.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
                        + struct.pack(">I", 0xFFFFFFFF) + b"IDAT" + stream)
    want = f"ndarray (28, 28, 1) {int(pixels.sum())}"
    assert [*decode_under_limit([crafted], 1024, zero=False), *decode_under_limit([crafted], 1024)] == [want] * 2
    with open(crafted, "r+b") as f:  # a sparse tail the IDAT's declared length covers: 100 MB, no disk
        f.truncate(100 << 20)
    assert [*decode_under_limit([crafted], 80, zero=False), *decode_under_limit([crafted], 80)] == [want] * 2


def test_a_pngs_other_chunks_are_skipped_unheld_and_a_short_kind_cannot_be_long(tmp_path):
    """Pillow read every chunk whole, and twice over while joining its blocks, and kept the private ones: an 8 x 8
    PNG with a 1 GB chunk took 2 GB, so under a limit D released and D plus it was 'out of memory' (review 32).
    Chunks mepf does not use are now read in blocks, their CRC checked, nothing held, and nothing after the rows is
    read: a 300 MB text chunk, a 300 MB private one and 300 MB of image data after the rows decode with 80 MB to
    spare; a bad CRC is still undecodable; so is a PLTE (at most 768 bytes by the PNG specification) of 5,000."""
    import struct
    import zlib

    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + pixels[r].tobytes() for r in range(8))))

    def png(path, *chunks):
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + png_chunk(b"IEND", b""))
        return str(path)

    big = b"\x00" * (300 << 20)
    files = [png(tmp_path / "text.png", png_chunk(b"tEXt", big)),
             png(tmp_path / "private.png", png_chunk(b"prVt", big))]
    del big
    bad = bytearray(png_chunk(b"prVt", b"x" * 100))
    bad[-1] ^= 1
    files += [png(tmp_path / "badcrc.png", bytes(bad)), png(tmp_path / "plte.png", png_chunk(b"PLTE", bytes(5000)))]
    trailing = tmp_path / "trailing.png"  # image data after the rows: a sparse 300 MB IDAT (review 33)
    trailing.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat + struct.pack(">I", 300 << 20) + b"IDAT")
    with open(trailing, "r+b") as f:
        f.truncate(trailing.stat().st_size + (300 << 20) + 4)
    files.insert(2, str(trailing))
    assert decode_under_limit(files, 80) == [f"ndarray (8, 8, 1) {int(pixels.sum())}"] * 3 + ["Replaced"] * 2


def test_a_failure_of_the_pass_is_told_out_of_memory_from_the_exceptions_the_machine_raises():
    from mepf.embed.release import out_of_memory

    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2 ** 50, dtype=torch.uint8)
    with pytest.raises(MemoryError) as host:
        np.empty(2 ** 50)
    from mepf.embed.release import GPU_OUT_OF_MEMORY, OUT_OF_MEMORY

    assert out_of_memory(cpu.value) == out_of_memory(host.value) == OUT_OF_MEMORY
    assert out_of_memory(RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed. ")) == OUT_OF_MEMORY
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == GPU_OUT_OF_MEMORY
    assert out_of_memory(RuntimeError("DataLoader worker (pid 12) is killed by signal: Segmentation fault.")) is None
    assert out_of_memory(ValueError("out of memory")) is None and out_of_memory(OSError("broken data stream")) is None


def test_png_text_and_profiles_cannot_stop_the_release(tmp_path, monkeypatch):
    """Pillow refuses a PNG whose zTXt, iTXt or iCCP decompresses past 1 MB (MAX_TEXT_CHUNK) or whose text
    totals past MAX_TEXT_MEMORY: a valid 2 KB image stopped the release. Those chunks are skipped unread (before
    or after the pixels); the pixels are those of the same PNG without them, and Pillow's handlers are back after."""
    import struct
    import zlib

    from PIL import PngImagePlugin

    from mepf.embed.files import decode_image

    chunk = png_chunk
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels)))
    end = chunk(b"IEND", b"")
    big = zlib.compress(b"a" * (2 << 20), 9)
    extras = {"ztxt": chunk(b"zTXt", b"Comment\x00\x00" + big),
              "itxt": chunk(b"iTXt", b"Comment\x00\x01\x00\x00\x00" + big),
              "iccp": chunk(b"iCCP", b"icc\x00\x00" + big), "text": chunk(b"tEXt", b"Comment\x00" + b"b" * 100)}
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 50)  # the 100-byte tEXt stands for 64 MB of text
    handlers = dict(vars(PngImagePlugin.PngStream)), dict(vars(PngImagePlugin.PngImageFile))
    for name, extra in extras.items():
        for where, data in (("before", head + extra + idat + end), ("after", head + idat + extra + end)):
            (tmp_path / f"{name}-{where}.png").write_bytes(data)
            assert len(data) < 3000
            got = decode_image(tmp_path / f"{name}-{where}.png")
            assert np.array_equal(got[:, :, 0], pixels), (name, where)
    assert (dict(vars(PngImagePlugin.PngStream)), dict(vars(PngImagePlugin.PngImageFile))) == handlers


def test_jpeg_application_segments_cannot_stop_the_release(tmp_path):
    """What an APPn segment holds is each application's (JFIF, EXIF, ICC, Photoshop, Adobe): Pillow's parsers of
    them refused valid JPEGs whose pixels libjpeg decodes. Skipped by Pillow's header parse: the pixels are those
    of the same JPEG without the segment, and common JPEGs (CMYK, EXIF + ICC + comment, progressive, MPO)
    decode exactly as Pillow decodes them alone; Pillow's marker table is back after."""
    import io
    import struct

    from PIL import JpegImagePlugin

    from mepf.embed.files import GREY_MODES, decode_image

    buf = io.BytesIO()
    Image.new("L", (16, 16), 77).save(buf, "JPEG")
    base = buf.getvalue()
    (tmp_path / "plain.jpg").write_bytes(base)
    plain = decode_image(tmp_path / "plain.jpg")

    def with_app(marker, payload):
        return base[:2] + struct.pack(">HH", marker, len(payload) + 2) + payload + base[2:]

    exif = (b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2)
            + struct.pack("<HHI", 0x011A, 7, 1) + b"\x05\x00\x00\x00" + struct.pack("<HHI", 0x0128, 3, 1)
            + b"\x02\x00\x00\x00" + struct.pack("<I", 0))
    cases = {"exif": with_app(0xFFE1, exif), "icc": with_app(0xFFE2, b"ICC_PROFILE\x00"),
             "photoshop": with_app(0xFFED, b"Photoshop 3.0\x00" + b"8BIM" + b"\x04\x04"),
             "adobe": with_app(0xFFEE, b"Adobe"), "jfif": with_app(0xFFE0, b"JFIF\x00")}
    markers = dict(JpegImagePlugin.MARKER)
    for name, data in cases.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        assert np.array_equal(decode_image(tmp_path / f"{name}.jpg"), plain), name
    assert JpegImagePlugin.MARKER == markers
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    exif_tags = Image.Exif()
    exif_tags[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "tags.jpg", exif=exif_tags, comment=b"hello")
    Image.fromarray(rgb).save(tmp_path / "prog.jpg", progressive=True)
    Image.fromarray(rgb).save(tmp_path / "two.mpo", save_all=True, append_images=[Image.fromarray(rgb[::-1].copy())],
                              format="MPO")
    for name in ("cmyk.jpg", "tags.jpg", "prog.jpg", "two.mpo"):
        with Image.open(tmp_path / name) as im:
            im.load()
            alone = np.asarray(im.convert("L" if im.mode in GREY_MODES else "RGB"))
        assert np.array_equal(decode_image(tmp_path / name), alone), name


def test_embed_leaves_no_core_file_to_crash_into(tmp_path):
    """A core file of a crashed `mepf embed` would hold the exact sums and the noise drawn for them: the process
    (and the loader workers it starts) runs with no core file allowed."""
    import resource

    np.savez(tmp_path / "d.npz", images=make_images(6, seed=2))
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
        r = embed(tmp_path / "d.npz", tmp_path / "x.h5", tmp_path / "log.jsonl", *TINY, "--force")
        assert r.exit_code == 0, r.output + r.stderr
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


# --------------------------------------------------------------------------- the geometry

MODES = ["L", "RGB", "RGBA", "P", "1", "LA", "I;16", "CMYK"]


def save_record(path, mode, w, h, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = path.with_suffix(".jpg" if fmt == "JPEG" else ".png")
    im.save(path, fmt)
    return path


def release_outcome(root, out, log, declared):
    r = embed(root, out, log, *TINY, *declared)
    if r.exit_code != 0:
        return ("error", r.stderr)
    rel = load(out)
    return ("file", rel.feature_spec, rel.data_spec, rel.ledger, {k: v.shape for k, v in rel.arrays.items()},
            rel.class_names)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 4), base_mode=st.sampled_from(["L", "RGB"]), base_size=st.integers(8, 40),
       mode=st.sampled_from(MODES), w=st.integers(1, 64), h=st.integers(1, 64), where=st.sampled_from(["0", "m", "~"]),
       cls=st.integers(0, 1), declare_size=st.booleans(), declare_channels=st.booleans(), seed=st.integers(0, 999))
def test_property_one_added_record_of_any_mode_or_size_changes_no_shape(tmp_path_factory, n, base_mode, base_size,
                                                                          mode, w, h, where, cls, declare_size,
                                                                          declare_channels, seed):
    tmp = tmp_path_factory.mktemp("geom")
    d = tmp / "D"
    for k in range(2):
        (d / f"class{k}").mkdir(parents=True)
        for i in range(n):
            save_record(d / f"class{k}" / f"img{i}", base_mode, base_size, base_size, seed + 10 * k + i)
    d2 = tmp / "D2"
    shutil.copytree(d, d2)
    save_record(d2 / f"class{cls}" / f"{where}added", mode, w, h, seed + 99)  # sorts first, in the middle or last
    declared = (["--image-size", "28"] if declare_size else []) + (["--channels", "1"] if declare_channels else [])
    a = release_outcome(d, tmp / "a.h5", tmp / "la.jsonl", declared)
    b = release_outcome(d2, tmp / "b.h5", tmp / "lb.jsonl", declared)
    assert a == b
    assert a[0] == ("file" if declare_size and declare_channels else "error")


def test_every_mode_and_size_is_converted_never_refused(tmp_path):
    root = tmp_path / "zoo" / "all"
    root.mkdir(parents=True)
    for i, mode in enumerate(MODES):
        for j, (w, h) in enumerate(((1, 1), (3, 100), (64, 64))):
            save_record(root / f"{i}-{j}", mode, w, h, i * 3 + j)
    for channels in ("1", "3"):
        out = tmp_path / f"zoo{channels}.h5"
        r = embed(tmp_path / "zoo", out, tmp_path / f"l{channels}.jsonl", *TINY, "--image-size", "16",
                  "--channels", channels)
        assert r.exit_code == 0, r.stderr
        rel = load(out)
        assert rel.feature_spec["input"]["channels"] == int(channels)
        assert rel.arrays["S1"].shape == (1, 16 * 16 * int(channels))


# --------------------------------------------------------------------------- numbers that could leave

def test_nothing_printed_is_computed_from_the_records(tmp_path):
    n = 4099
    np.savez(tmp_path / "d.npz", images=np.random.default_rng(8).integers(0, 256, (n, 8, 8), dtype=np.uint8),
             labels=np.arange(n) % 3)
    r = cli("embed", "--data", tmp_path / "d.npz", "--classes", "3", "--out", tmp_path / "x.h5", "--epsilon", "2",
            "--delta", "1e-6", "--release-log", tmp_path / "log.jsonl", *TINY, "--batch-size", "64")  # progress shown
    assert r.exit_code == 0, r.stderr
    text = r.output.replace(str(tmp_path / "x.h5"), "OUT").replace(str(tmp_path), "TMP")  # stdout and stderr
    assert "embed:" in r.stderr  # the progress display was drawn
    sha = load(tmp_path / "x.h5").file_sha256
    text = text.replace(f"sha256 {sha[:16]}", "SHA")
    text = re.sub(r"\d\d:\d\d", "TIME", text)  # elapsed and remaining times of the progress display
    for declared in ("(2, 1e-06)-DP", "D=64", "resnet18"):
        assert declared in text
        text = text.replace(declared, "")
    assert not re.search(r"\d", text), repr(text)  # no count, rate, percentage or statistic


def counting_folder():
    """A FolderSource class counting the images it decodes (`decoded`): what is refused before the pass reads none."""
    class Counting(FolderSource):
        decoded = 0

        def _read_image(self, path, *identity):
            type(self).decoded += 1
            return super()._read_image(path, *identity)
    return Counting


def test_delta_refusal_reads_nothing_and_names_no_number(tmp_path, image_folder):
    Counting = counting_folder()

    from mepf.embed.release import embed_to_file

    ex, spec = build_feature_map("resnet18", "random", ["pixels"], image_size=(28, 28), channels=1)
    with pytest.raises(Exception) as e:
        embed_to_file(Counting(image_folder), Transform((28, 28), 1), ex, spec, out=tmp_path / "x.h5", epsilon=1.0,
                      delta=0.25, release_log_path=tmp_path / "log.jsonl", progress=False)
    assert "not below 1/n" in str(e.value) and Counting.decoded == 0
    assert not re.search(r"\d", str(e.value).replace("0.25", "").replace("1/n", "").replace("1/(10 n)", ""))
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "log.jsonl").exists()


def test_a_source_listing_more_records_than_the_exact_sums_hold_is_refused_before_reading(tmp_path, image_folder):
    """A class's exact sum is int64 and each record adds at most 2^QUANT_BITS to an entry: past 2^31 records it
    could wrap, and one record could then move it by anything (review 29). Refused before any record is read."""
    from mepf.core.features import QUANT_BITS
    from mepf.embed.release import MAX_RECORDS, embed_to_file

    assert MAX_RECORDS * 2 ** QUANT_BITS <= 2 ** 63 - 1 < (MAX_RECORDS + 1) * 2 ** QUANT_BITS

    class Huge(counting_folder()):
        def __len__(self):
            return MAX_RECORDS + 1

    ex, spec = build_feature_map("resnet18", "random", ["pixels"], image_size=(28, 28), channels=1)
    with pytest.raises(MepfError, match="lists 2\\^31 records or more") as e:
        embed_to_file(Huge(image_folder), Transform((28, 28), 1), ex, spec, out=tmp_path / "x.h5", epsilon=1.0,
                      delta=1e-12, release_log_path=tmp_path / "log.jsonl", progress=False, force=True)
    assert Huge.decoded == 0 and not re.search(r"\d", str(e.value).replace("2^31", ""))
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "log.jsonl").exists()


# --------------------------------------------------------------------------- the repeat-release refusal

def test_repeat_release_is_recognised_whatever_the_container_names_order_or_transform(tmp_path):
    x = make_images(12, seed=11)
    y = np.arange(12) % 2
    first = tmp_path / "first"
    for i in range(12):
        (first / f"c{y[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, :, :, 0]).save(first / f"c{y[i]}" / f"patient_{i}.png")
    log = tmp_path / "log.jsonl"
    geometry = ["--image-size", "28", "--channels", "1"]
    assert embed(first, tmp_path / "r0.h5", log, *TINY, *geometry).exit_code == 0

    renamed = tmp_path / "renamed"
    for i in range(12):
        (renamed / f"class_{y[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, :, :, 0]).save(renamed / f"class_{y[i]}" / f"{(7 * i) % 12:03d}_x.png")
    perm = np.random.default_rng(0).permutation(12)
    np.savez(tmp_path / "same.npz", images=x[perm], labels=y[perm])
    np.savez(tmp_path / "superset.npz", images=np.concatenate([x, make_images(2, seed=99)]), labels=np.append(y, [0,
                                                                                                                  1]))
    np.savez(tmp_path / "subset.npz", images=x[:5], labels=y[:5])
    np.savez(tmp_path / "relabelled.npz", images=x, labels=1 - y)
    attempts = {
        "renamed folder": (renamed, geometry),
        "as .npz, reordered": (tmp_path / "same.npz", ["--classes", "2"]),
        "read as RGB at 32 px": (tmp_path / "same.npz", ["--classes", "2", "--channels", "3", "--image-size", "32"]),
        "superset": (tmp_path / "superset.npz", ["--classes", "2"]),
        "subset": (tmp_path / "subset.npz", ["--classes", "2"]),
        "relabelled": (tmp_path / "relabelled.npz", ["--classes", "2"]),
    }
    for i, (name, (data, opts)) in enumerate(attempts.items()):
        r = embed(data, tmp_path / f"r{i + 1}.h5", log, *TINY, *opts)
        assert r.exit_code == 2 and ("already released" in r.stderr or "shares most" in r.stderr), (name, r.stderr)
        assert not (tmp_path / f"r{i + 1}.h5").exists(), name
    assert len(release_log.read_log(log)) == 1

    np.savez(tmp_path / "one_shared.npz", images=np.concatenate([x[:1], make_images(11, seed=50)]),
             labels=np.arange(12) % 2)
    r = embed(tmp_path / "one_shared.npz", tmp_path / "shared.h5", log, *TINY, "--classes", "2")
    assert r.exit_code == 0 and "WARNING: some records of this dataset were in 1 earlier release" in r.stderr
    a = cli("audit", tmp_path / "shared.h5", "--json", "--release-log", log)
    import json

    assert json.loads(a.output)["composed"]["releases"] == 2  # its shared record carries both budgets

    r = embed(tmp_path / "same.npz", tmp_path / "again.h5", log, *TINY, "--classes", "2", "--allow-repeat")
    assert r.exit_code == 0
    assert json.loads(cli("audit", tmp_path / "again.h5", "--json", "--release-log",
                          log).output)["composed"]["releases"] == 3


def test_the_same_unchanged_files_again_are_refused_before_any_record_is_read(tmp_path, image_folder, labelled_npz):
    """A plain re-run (the same command, say) was refused only after the whole pass had read every record: hours on
    a large folder. The log now keeps, under its key, what identifies the files read; the same files, unchanged and
    read the same way, are refused before the pass. Anything else (a file rewritten with the same bytes, other
    classes) is left to the pass's fingerprint, which still refuses it: the early check only ever refuses earlier."""
    import json
    import os

    from mepf.embed.files import ArraySource
    from mepf.embed.release import embed_to_file

    Counting = counting_folder()

    ex, spec = build_feature_map("resnet18", "random", ["pixels"], image_size=(28, 28), channels=1)
    log = tmp_path / "log.jsonl"

    def run(source, name, **kw):
        return embed_to_file(source, Transform((28, 28), 1), ex, spec, out=tmp_path / name, epsilon=1.0, delta=1e-3,
                             release_log_path=log, progress=False, force=True, **kw)

    run(Counting(image_folder), "first.h5")
    assert Counting.decoded == 12 and json.loads(log.read_text())["files"].startswith("f1:")
    Counting.decoded = 0
    with pytest.raises(MepfError, match="already released: these files, unchanged") as e:
        run(Counting(image_folder), "again.h5")
    assert Counting.decoded == 0 and not (tmp_path / "again.h5").exists() and len(release_log.read_log(log)) == 1
    assert "1 release(s) from them" in str(e.value) and "first.h5" in str(e.value)
    one = next(image_folder.rglob("*.png"))
    one.write_bytes(one.read_bytes())  # the same bytes, but no longer provably the same file
    with pytest.raises(MepfError, match="this dataset was already released"):
        run(Counting(image_folder), "again.h5")
    assert Counting.decoded == 12  # found by the pass, as before
    Counting.decoded = 0
    run(Counting(image_folder), "allowed.h5", allow_repeat=True)
    assert Counting.decoded == 12 and len(release_log.read_log(log)) == 2

    path, x, y = labelled_npz
    run(ArraySource(path, ["0", "1", "2"]), "npz.h5")
    with pytest.raises(MepfError, match="already released: these files, unchanged"):
        run(ArraySource(path, ["0", "1", "2"]), "npz2.h5")
    later = tmp_path / "later.npz"
    os.link(path, later)  # a second name moves the file's ctime: left to the pass, which finds it
    with pytest.raises(MepfError, match="this dataset was already released"):
        run(ArraySource(later, ["0", "1", "2"]), "npz3.h5")
    entries = release_log.read_log(log)
    assert len(entries) == 3 and len({e["files"] for e in entries}) == 3  # the allowed run read a rewritten file
    key = release_log.read_key(log)
    assert release_log.files_key(key, "x") != release_log.files_key(bytes(32), "x")  # no guess without the key
    # an edited entry holding another text is no match, not a traceback (review 32: compare_digest refused non-ASCII)
    assert release_log.same_files([{"files": "f1:é"}, {"files": "f1:\udcff"}, {"files": 7}], key, "x") == []

    # a release of no record repeats no one's data (review 32: the early check refused it again)
    np.savez(tmp_path / "none.npz", images=x[:4], labels=np.full(4, 7))
    for name in ("none1.h5", "none2.h5"):
        run(ArraySource(tmp_path / "none.npz", ["0", "1", "2"]), name, bad_records="zero")
    assert "files" not in release_log.read_log(log)[-1]


def test_release_log_is_owner_only_keyed_and_checked_before_the_pass(tmp_path, labelled_npz):
    """The log and its key are readable by the owner alone; what the log holds cannot test an image for
    membership without the key; a log that cannot take the entry, or a lost key, stops the run before it reads."""
    import base64
    import json

    from mepf.embed.fingerprint import SEALED_BYTES, Fingerprint, open_sketch, record_hash

    log = tmp_path / "owner" / "log.jsonl"
    x = labelled_npz[1]
    assert embed(labelled_npz[0], tmp_path / "a.h5", log, *TINY, "--classes", "3").exit_code == 0
    for path in (log, release_log.key_path(log)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    text = log.read_text()
    raw = base64.b64decode(json.loads(text)["sketch"]["box"])
    assert len(raw) == SEALED_BYTES  # 37 records, sealed in the size of 4,096: none as its plain hash or tag
    key = bytes.fromhex(release_log.key_path(log).read_text())
    assert len(open_sketch(key, json.loads(text)["sketch"]).hashes) == len(x)  # every one sampled, inside the seal
    for r in x:
        assert record_hash(r)[:16] not in raw and base64.b64encode(record_hash(r)[:16]).decode()[:12] not in text
    plain = Fingerprint()
    plain.update(x, labelled_npz[2])
    assert plain.hexdigest() not in text  # the whole-dataset digest is keyed too

    key = release_log.key_path(log).read_bytes()
    release_log.key_path(log).unlink()
    r = embed(labelled_npz[0], tmp_path / "b.h5", log, *TINY, "--classes", "3", "--allow-repeat")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "key" in r.stderr and "is missing" in r.stderr
    assert not (tmp_path / "b.h5").exists() and len(release_log.read_log(log)) == 1
    release_log.key_path(log).write_text(bytes(range(32)).hex())  # a key, but not this log's
    r = embed(labelled_npz[0], tmp_path / "b.h5", log, *TINY, "--classes", "3", "--allow-repeat")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "does not belong to this log" in r.stderr
    release_log.key_path(log).write_bytes(key)
    release_log.key_path(log).chmod(0o644)  # restored from a backup with the umask's mode
    assert cli("audit", tmp_path / "a.h5", "--release-log", log).exit_code == 0
    assert stat.S_IMODE(release_log.key_path(log).stat().st_mode) == 0o644  # reading it changes nothing
    r = embed(labelled_npz[0], tmp_path / "b.h5", log, *TINY, "--classes", "3", "--allow-repeat")
    assert r.exit_code == 0 and stat.S_IMODE(release_log.key_path(log).stat().st_mode) == 0o600  # narrowed
    assert f"WARNING: {release_log.key_path(log)} could be read by others" in r.stderr  # the key, not the log
    assert f"{log} and" not in r.stderr
    release_log.key_path(log).rename(tmp_path / "elsewhere.key")  # an auditor shown the log alone
    a = cli("audit", tmp_path / "b.h5", "--json", "--release-log", log)
    assert json.loads(a.output)["composed"]["releases"] == 2
    release_log.key_path(log).write_bytes(key)

    (tmp_path / "file").write_text("not a folder")
    r = embed(labelled_npz[0], tmp_path / "c.h5", tmp_path / "file" / "log.jsonl", *TINY, "--classes", "3")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "cannot be written" in r.stderr, r.stderr
    assert not (tmp_path / "c.h5").exists()


def test_private_reference_is_flagged_in_another_container(tmp_path, image_folder, capsys):
    from mepf.evaluate.data import load_reference
    from mepf.evaluate.evaluation import private_reference_warning

    log = tmp_path / "log.jsonl"
    assert embed(image_folder, tmp_path / "r.h5", log, *TINY, "--image-size", "28", "--channels", "1").exit_code == 0
    items = sorted(p for p in image_folder.rglob("*.png"))
    xs = np.stack([np.asarray(Image.open(p)) for p in items])
    ys = np.array([sorted(d.name for d in image_folder.iterdir()).index(p.parent.name) for p in items])
    np.savez(tmp_path / "copy.npz", images=xs[::-1], labels=ys[::-1])  # another container, another order
    warning = private_reference_warning(load_reference(str(tmp_path / "copy.npz")), log)
    assert warning and "NOT for publication" in warning
    np.savez(tmp_path / "public.npz", images=make_images(12, seed=77), labels=np.arange(12) % 2)
    assert private_reference_warning(load_reference(str(tmp_path / "public.npz")), log) is None
    np.savez(tmp_path / "part.npz", images=xs[:8], labels=ys[:8])  # a subset: found only record by record
    release_log.key_path(log).chmod(0o644)  # evaluate reads the key as audit does: it changes nothing
    assert private_reference_warning(load_reference(str(tmp_path / "part.npz")), log)
    assert stat.S_IMODE(release_log.key_path(log).stat().st_mode) == 0o644
    release_log.key_path(log).unlink()
    assert private_reference_warning(load_reference(str(tmp_path / "part.npz")), log) is None
    assert "is missing: the reference was compared" in capsys.readouterr().err  # said, not silent


# --------------------------------------------------------------------------- files that are not what they say

def test_an_image_file_of_another_format_runs_no_decoder_but_pngs_and_jpegs(tmp_path, monkeypatch):
    """By content Pillow would open EPS through an external Ghostscript (and ~40 other decoders): a `.png`
    holding PostScript is refused by name, and the `gs` on PATH (a stand-in that leaves a mark) never runs."""
    import os

    from mepf.embed.files import decode_image

    bin_dir, mark = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho ran >> {mark}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root = tmp_path / "D" / "a"
    root.mkdir(parents=True)
    for i, im in enumerate(make_images(2, seed=5)):
        Image.fromarray(im[:, :, 0]).save(root / f"{i}.png")
    planted = root / "x.png"
    planted.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    with pytest.raises(MepfError, match="cannot read image .*x.png"):
        decode_image(planted)
    Image.fromarray(make_images(1, seed=6)[0][:, :, 0]).save(tmp_path / "g.gif")
    planted.write_bytes((tmp_path / "g.gif").read_bytes())  # a decodable GIF under a PNG name: refused too
    with pytest.raises(MepfError, match="UnidentifiedImageError"):
        decode_image(planted)
    r = embed(tmp_path / "D", tmp_path / "x.h5", tmp_path / "log.jsonl", *TINY, "--image-size", "28", "--channels", "1")
    assert r.exit_code == 2 and "x.png" in r.stderr and not (tmp_path / "x.h5").exists()
    assert not mark.exists()
    rgb = make_images(1, seed=7)[0].repeat(3, axis=2)  # a camera's MPO (JPEG with a second frame) is a JPEG
    Image.fromarray(rgb).save(tmp_path / "m.jpg", "MPO", save_all=True, append_images=[Image.fromarray(rgb)])
    assert decode_image(tmp_path / "m.jpg").shape == rgb.shape


def test_no_warning_from_a_record_reaches_the_terminal(tmp_path):
    """A JPEG's EXIF can make Pillow warn with numbers read from the record ("... had too many entries: 37")."""
    import io
    import struct
    import warnings

    from mepf.embed.files import decode_image

    count, n = 37, 2
    ifd = struct.pack("<H", n) + struct.pack("<HHLHH", 0x0128, 3, 1, 2, 0) \
        + struct.pack("<HHLL", 0x011A, 5, count, 8 + 2 + 12 * n + 4) + struct.pack("<L", 0)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<L", 8) + ifd + struct.pack("<LL", 72, 1) * count
    buf = io.BytesIO()
    Image.fromarray(make_images(1, seed=8)[0].repeat(3, axis=2)).save(buf, "JPEG", exif=exif)
    path = tmp_path / "r.jpg"
    path.write_bytes(buf.getvalue())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Image.open(path).getexif()  # the record does make Pillow warn, with its number
    assert any("37" in str(w.message) for w in seen)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert decode_image(path).shape == (28, 28, 3)
    assert not seen


@pytest.mark.parametrize("how", ["class folder", "image", "hard link"])
def test_a_link_in_the_data_folder_cannot_count_a_record_twice(tmp_path, how):
    """One planted name (a class folder linked to another, an image linked to another, or a second hard link)
    would put one person's images in the sums twice, at twice the sensitivity the ledger states."""
    import os

    d = tmp_path / "D"
    for c in ("cat", "dog") if how != "class folder" else ("cat",):
        (d / c).mkdir(parents=True)
        for i, im in enumerate(make_images(2, seed=9)):
            Image.fromarray(im[:, :, 0]).save(d / c / f"{i}.png")
    if how == "class folder":
        (d / "dog").symlink_to(d / "cat")
    elif how == "image":
        (d / "dog" / "z.png").symlink_to(d / "cat" / "0.png")
    else:
        os.link(d / "cat" / "0.png", d / "dog" / "z.png")
    with pytest.raises(MepfError, match="symbolic link|hard link"):
        FolderSource(d)
    r = embed(d, tmp_path / "x.h5", tmp_path / "log.jsonl", *TINY, "--image-size", "28", "--channels", "1")
    assert r.exit_code == 2 and "link" in r.stderr and not (tmp_path / "x.h5").exists()
    assert release_log.read_log(tmp_path / "log.jsonl") == []
    from mepf.embed.sources import open_source

    public = open_source(str(d), private=False)  # evaluate's public images: a link there counts nothing private
    assert len(public) == {"class folder": 4, "image": 5, "hard link": 5}[how]


def test_an_image_removed_while_the_folder_is_listed_is_a_one_line_error(tmp_path):
    """The listing stats every listed image (its identity, then the hard-link check); one deleted between the
    listing and that stat (a writer racing the owner's run) is a MepfError naming it, not an OSError traceback."""
    from mepf.embed.sources import listed_identities

    kept = tmp_path / "a.png"
    Image.fromarray(make_images(1, seed=3)[0][:, :, 0]).save(kept)
    with pytest.raises(MepfError, match=r"gone\.png: .*changed while mepf listed it"):
        listed_identities([kept, tmp_path / "gone.png"], tmp_path)


def test_a_file_name_with_terminal_escapes_is_printed_inert(tmp_path):
    """A name from the data (or from a hostile release) holding ESC sequences could erase lines and print a
    fake result: every error the CLI prints, and every line of --check, shows it with the escapes replaced."""
    root = tmp_path / "D" / "a"
    root.mkdir(parents=True)
    Image.fromarray(make_images(1, seed=10)[0][:, :, 0]).save(root / "ok.png")
    # click strips CSI sequences (ESC [) off a non-terminal, not a carriage return or an OSC sequence (ESC ])
    (root / "x\rwrote fake.h5 (1, 1e-06)-DP\x1b]0;t\x07\x1b[8m.png").write_bytes(b"not an image")
    inert = lambda text: not any(c in text for c in "\r\x1b\x07")  # noqa: E731
    r = embed(tmp_path / "D", tmp_path / "x.h5", tmp_path / "log.jsonl", *TINY, "--image-size", "28", "--channels", "1")
    assert r.exit_code == 2 and "cannot read image" in r.stderr and inert(r.output + r.stderr)
    c = cli("embed", "--data", tmp_path / "D", "--check", "--quiet")
    assert c.exit_code == 2 and "wrote fake.h5" in c.output and inert(c.output + c.stderr)


@pytest.mark.parametrize("mu", [float("nan"), "nan", -1.0, True, 10 ** 400])
def test_an_edited_release_log_cannot_lower_the_composed_guarantee(tmp_path, labelled_npz, mu):
    """One appended line (no key needed) linked to a real release used to compose a NaN mu into eps = 0, and
    the log's copy of the audited file's own mu was believed over its verified ledger."""
    import json

    log, out = tmp_path / "log.jsonl", tmp_path / "x.h5"
    assert embed(labelled_npz[0], out, log, "--classes", "3", *TINY).exit_code == 0
    honest = json.loads(cli("audit", out, "--json", "--release-log", log).output)["composed"]
    assert honest["releases"] == 1 and honest["epsilon"] == pytest.approx(1.0, rel=1e-6)
    mine = release_log.read_log(log)[0]
    lines = log.read_text().splitlines()
    lowered = {**mine, "mu": mine["mu"] / 100}  # the log's copy of this file's mu, edited down
    log.write_text("\n".join([json.dumps(lowered, sort_keys=True), *lines[1:]]) + "\n")
    composed = json.loads(cli("audit", out, "--json", "--release-log", log).output)["composed"]
    assert composed["epsilon"] == pytest.approx(honest["epsilon"], rel=1e-9)  # from the ledger, not the log
    forged = {"output_sha256": "0" * 64, "composes_with": [mine["output_sha256"]], "mu": mu, "delta": 1e-6,
              "epsilon": 1.0, "data": "x", "dataset": "x", "output": "/x", "time": "t"}
    with open(log, "a") as f:
        f.write(json.dumps(forged) + "\n")
    r = cli("audit", out, "--release-log", log)
    assert r.exit_code == 2 and "no valid mu" in r.stderr and "restore it" in r.stderr
    assert "(0, " not in r.output
    listed = json.loads(cli("releases", "--release-log", log, "--json").output)["releases"]
    assert [row["composed_epsilon"] for row in listed] == [None, None]  # not composable: no number rather than 0
    with open(log, "a") as f:  # numbers the listing formats, edited into strings: shown as '?', no traceback
        f.write(json.dumps({**forged, "output_sha256": "1" * 64, "epsilon": "x", "delta": "y", "mu": 1.0}) + "\n")
        f.write("9" * 5000 + "\n")  # an integer too long for json to read: a corrupt line, not a traceback
    r = cli("releases", "--release-log", log)
    assert r.exit_code == 2 and "line 4 is corrupt" in r.stderr
    log.write_text("\n".join(log.read_text().splitlines()[:-1]) + "\n")
    r = cli("releases", "--release-log", log)
    assert r.exit_code == 0 and r.exception is None and "?" in r.output


def test_eps_for_delta_refuses_nan_and_negative_inputs():
    from mepf.artifacts.accounting import eps_for_delta

    for mu, delta in ((float("nan"), 1e-5), (-1.0, 1e-5), (1.0, float("nan")), (1.0, -1e-5)):
        with pytest.raises(ValueError):
            eps_for_delta(delta, mu)
    assert eps_for_delta(1e-5, 0.0) == 0.0 and math.isinf(eps_for_delta(1e-5, math.inf))
