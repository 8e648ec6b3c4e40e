"""A JPEG's scans are counted as libjpeg meets them, before it decodes any, and a file past the bounds is
undecodable: a progressive JPEG may hold any number of scans, each a pass over the whole image, so 2.6 KB took 52 s
(review 34). The walk must never miss a scan libjpeg decodes."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mepf.artifacts.errors import MepfError
from mepf.embed import jpeg_scans
from mepf.embed.files import decode_image
from mepf.embed.fingerprint import replaced_identity
from mepf.embed.sources import Replaced
from tests.jpeg_writer import DHT, DQT, EOB_RUNS, EOI, SOI, frame, progressive, scan, seg
from tests.test_hostile_inputs import released_shapes


def walk(path, window=jpeg_scans.WINDOW) -> list:
    """The markers the walk meets up to the first EOI (or the end), each (code, body)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(code, body) for code, body, _ in jpeg_scans.segments(fd, window) if code != jpeg_scans.EOI]
    finally:
        os.close(fd)


def pillow_alone(path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("L" if im.mode == "L" else "RGB"))


def is_black_pixel(got, data: bytes) -> bool:
    return isinstance(got, Replaced) and got.identity == replaced_identity(file_bytes=hashlib.sha256(data).digest())


def test_a_jpeg_whose_scans_hold_too_many_blocks_is_undecodable_before_any_is_decoded(tmp_path):
    """2048 x 2048 grey, arithmetic-coded: 65,536 blocks a scan, counted 16 times each, so 32 scans are 2^25 and
    decode as Pillow decodes them alone; one more is past the bound. Refused unread: review 34's 2,606-byte file
    (16,384^2, 250 refinements: 52 s), a sequential one of 65,500^2 in four components (111 bytes, 13 s), and review
    35's 9 KB files of 894 scans of one coefficient (88 s) or of DC refinements (Huffman: 14 s), which a bound on
    coefficients let through; the release of D and of D plus such a record have the same shapes."""
    for n in (0, 30):
        (tmp_path / "ok.jpg").write_bytes(progressive(2048, 2048, n))
        got = decode_image(tmp_path / "ok.jpg")
        assert got.shape == (2048, 2048, 1) and np.array_equal(got[:, :, 0], pillow_alone(tmp_path / "ok.jpg")), n
    bombs = {"over.jpg": progressive(2048, 2048, 31), "review34.jpg": progressive(16384, 16384, 250),
             "sequential.jpg": SOI + DQT + frame(0xC9, 65500, 65500, 4) + scan([1, 2, 3, 4], 0, 63) + EOI,
             "band63.jpg": SOI + DQT + frame(0xCA, 12392, 12392) + scan([1], 0, 0) + scan([1], 63, 63, 1, 0) * 894
             + EOI,
             "dc.jpg": SOI + DQT + frame(0xC2, 12392, 12392) + DHT + EOB_RUNS + scan([1], 0, 0, 0, 1)
             + scan([1], 0, 0, 1, 0) * 894 + EOI}
    assert len(bombs["review34.jpg"]) == 2606
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
        assert is_black_pixel(decode_image(tmp_path / name, zero=True), data), name
        with pytest.raises(MepfError, match=f"cannot read image .*{name}"):
            decode_image(tmp_path / name)
    assert (released_shapes(tmp_path, "D", None, "--bad-records", "zero")
            == released_shapes(tmp_path, "D_bomb", tmp_path / "review34.jpg", "--bad-records", "zero"))


def test_more_scans_than_the_bound_is_undecodable_however_small_each(tmp_path):
    """Four components of one block each: 1,000 DC scans decode as Pillow decodes them alone, 1,001 do not."""
    head = SOI + DQT + frame(0xCA, 8, 8, comps=4)
    for n, ok in ((jpeg_scans.MAX_SCANS, True), (jpeg_scans.MAX_SCANS + 1, False)):
        data = head + b"".join(scan([1 + i % 4], 0, 0) for i in range(n)) + EOI
        (tmp_path / "many.jpg").write_bytes(data)
        got = decode_image(tmp_path / "many.jpg", zero=True)
        if ok:
            assert np.array_equal(got, pillow_alone(tmp_path / "many.jpg"))
        else:
            assert is_black_pixel(got, data)


def count(tmp_path, data: bytes) -> tuple:
    (tmp_path / "counted.jpg").write_bytes(data)
    fd = os.open(tmp_path / "counted.jpg", os.O_RDONLY)
    try:
        return jpeg_scans.scans(fd)
    finally:
        os.close(fd)


def test_a_scan_counts_its_blocks_whatever_its_band_and_coding(tmp_path):
    """libjpeg's time goes by the block: a scan of one coefficient costs as much as one of 63 (review 35), an
    arithmetic-coded block up to 16 Huffman ones, a lossless sample 1/16 of one. Each pair: the largest at 2^25
    blocks and the next past it (counted, not decoded); and arithmetic-coded data past 1 MB."""
    def sequential(code, side):
        return SOI + DQT + frame(code, side, side, 2) + scan([1, 2], 0, 63) + EOI

    def one_coefficient(bands):
        return SOI + DQT + frame(0xC2, 8192, 8192) + b"".join(scan([1], k, k) for k in range(bands)) + EOI

    def lossless(passes):
        return SOI + frame(0xC3, 8192, 8192, 4) + b"".join(scan([c], 1, 0) for c in (1, 2, 3, 4)) * passes + EOI

    edge = jpeg_scans.MAX_BLOCKS
    for within, past, scans in ((sequential(0xC0, 32768), sequential(0xC0, 32776), 1),
                                (sequential(0xC9, 8192), sequential(0xC9, 8200), 1),
                                (one_coefficient(32), one_coefficient(33), 32), (lossless(2), lossless(3), 8)):
        assert count(tmp_path, within) == (scans, edge)
        with pytest.raises(ValueError, match="more blocks"):
            count(tmp_path, past)
    head = SOI + DQT + frame(0xCA, 64, 64) + scan([1], 0, 0)
    data = bytes(range(1, 255)) * (jpeg_scans.MAX_ARITHMETIC_DATA // 254 + 1)  # no 0xFF: no marker
    assert count(tmp_path, head + data[:jpeg_scans.MAX_ARITHMETIC_DATA] + EOI) == (1, 64 * 16)
    with pytest.raises(ValueError, match="arithmetic-coded data"):
        count(tmp_path, head + data[:jpeg_scans.MAX_ARITHMETIC_DATA] + b"\x01" + scan([1], 0, 0) + EOI)


def test_a_jpeg_of_more_markers_than_the_bound_is_undecodable(tmp_path):
    """Each marker is a step of the walk (and of Pillow's header parse): with comments added up to MAX_MARKERS
    markers in all (its SOI and EOI included) the file decodes as the image alone, one more is undecodable."""
    Image.new("L", (16, 16), 90).save(tmp_path / "plain.jpg")
    base = (tmp_path / "plain.jpg").read_bytes()
    own = 2 + len(walk(tmp_path / "plain.jpg"))  # its SOI and EOI, and the markers between
    for n, ok in ((jpeg_scans.MAX_MARKERS - own, True), (jpeg_scans.MAX_MARKERS - own + 1, False)):
        data = base[:2] + b"\xff\xfe\x00\x02" * n + base[2:]
        (tmp_path / "notes.jpg").write_bytes(data)
        got = decode_image(tmp_path / "notes.jpg", zero=True)
        assert np.array_equal(got[:, :, 0], pillow_alone(tmp_path / "plain.jpg")) if ok else is_black_pixel(got, data)


def test_a_stream_of_tables_alone_then_the_image_decodes_as_pillow_decodes_it(tmp_path):
    """SOI tables EOI, then SOI frame scans EOI (libjpeg's jpeg_write_tables, a TIFF's JPEGTables joined to a tile):
    Pillow asks libjpeg for a header again while it returns tables only, so plain Pillow decodes it to the pixels of
    the one-stream file; its scans are counted, after the first EOI. Anything but FF D8 right after that EOI, or an
    EOI after a frame, libjpeg refuses, and so does the walk (review 37)."""
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for kw in ({}, {"progressive": True}):
        Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=90, **kw)
        full = (tmp_path / "full.jpg").read_bytes()
        pos, tables, rest = 2, b"", b""
        while full[pos + 1] != 0xDA:  # the tables' segments (DQT, DHT) to the first stream, the rest to the image's
            end = pos + 2 + int.from_bytes(full[pos + 2:pos + 4], "big")
            if full[pos + 1] in (0xDB, 0xC4):
                tables += full[pos:end]
            else:
                rest += full[pos:end]
            pos = end
        rest += full[pos:]
        (tmp_path / "two.jpg").write_bytes(SOI + tables + EOI + SOI + rest)
        assert np.array_equal(decode_image(tmp_path / "two.jpg"), pillow_alone(tmp_path / "full.jpg")), kw
        assert np.array_equal(pillow_alone(tmp_path / "two.jpg"), pillow_alone(tmp_path / "full.jpg")), kw
        assert count(tmp_path, SOI + tables + EOI + SOI + rest)[0] == full.count(b"\xff\xda") > 0
        frame_first = SOI + rest[:rest.index(b"\xff\xda")] + EOI + SOI + tables + rest  # an EOI after a frame
        for data in (SOI + tables + EOI + b"\x00" + SOI + rest, SOI + tables + EOI + b"\xff" + SOI + rest, frame_first):
            (tmp_path / "bad.jpg").write_bytes(data)
            with pytest.raises(ValueError, match="refuses before its first scan"):
                walk(tmp_path / "bad.jpg")
            with pytest.raises(Exception):  # noqa: B017 - whatever Pillow raises: it cannot decode the file either
                pillow_alone(tmp_path / "bad.jpg")


#: what libjpeg-turbo's own trace (djpeg -verbose -verbose) lists for this stream: three scans, Ss-Se 0-0, 1-63, 1-63
TRICKY = (SOI + seg(0xE1, b"xx\xff\xda\x00\x08yy")  # an SOS inside an APP segment: its data, not a marker
          + b"\xff\xfe\x00\x00"  # a comment of length 0: libjpeg skips its two length bytes only
          + b"junk\x00\xff\x00"  # between segments: passed over (FF 00 is no marker)
          + frame(0xCA, 16, 16) + DQT + b"\xff\xff\xff" + scan([1], 0, 0)  # fill bytes before a marker
          + b"\x12\xff\x00\x34\xff\xff\x00\xff\xd3\xff\x01"  # stuffed, filled, RST3 and TEM: inside the scan
          + scan([1], 1, 63, 0, 1) + b"\xab" + scan([1], 1, 63, 1, 0)
          + EOI + scan([1], 1, 63, 1, 0))  # after the first EOI (a camera's next frame): not libjpeg's


@pytest.mark.parametrize("window", [2, 3, 5, 64, jpeg_scans.WINDOW])
def test_the_walk_meets_the_markers_libjpeg_meets_in_any_window(tmp_path, window):
    (tmp_path / "t.jpg").write_bytes(TRICKY)
    got = walk(tmp_path / "t.jpg", window)
    assert [code for code, _ in got] == [0xE1, 0xFE, 0xCA, 0xDB, 0xDA, 0xDA, 0xDA]
    assert [tuple(body[-3:-1]) for code, body in got if code == 0xDA] == [(0, 0), (1, 63), (1, 63)]


def libjpeg_markers(data: bytes) -> list:
    """libjpeg's marker reading a byte at a time (jdmarker.c: next_marker, each segment skipped by its length; a
    stream of tables alone passed as Pillow's decoder does), to hold the walk's windows and expressions to."""
    out, i, scanned, framed = [], 2, False, False
    while True:
        while i < len(data) and data[i] != 0xFF:
            i += 1
        while i < len(data) and data[i] == 0xFF:
            i += 1
        if i >= len(data):
            return out
        code, i = data[i], i + 1
        if code == 0 or 0xD0 <= code <= 0xD7 or code < 0xC0:
            continue
        if not scanned and code == 0xD9 and not framed and data[i:i + 2] == b"\xff\xd8":
            i += 2  # a stream of tables alone, then the image's
            continue
        if not scanned and (code in (0xD8, 0xD9, 0xC8, 0xDE, 0xDF) or 0xF0 <= code <= 0xFD or code & 0xF7 in (0xC5,
                                                                                                           0xC6, 0xC7)
                            or framed and code in jpeg_scans.SOF):
            return "refused"  # libjpeg's errors before a scan: a second SOI or frame, no image, codes it does not know
        scanned, framed = scanned or code == 0xDA, framed or code in jpeg_scans.SOF
        if code == 0xD9:
            return out
        if code == 0xD8:
            out.append((code, None))
            continue
        length = int.from_bytes(data[i:i + 2], "big")
        out.append((code, data[i + 2:i + length] if code == 0xDA or code in jpeg_scans.SOF else None))
        i += max(2, length)


PIECES = [b"\xff", b"\x00", b"\xd0", b"\xd7", b"\xd8", b"\xd9", b"\xda", b"\xff\xd9\xff\xd8", b"\xc2", b"\xe1", b"\x02",
          b"\x01", b"\x05", b"\x13", b"\xc7", b"\xf3", b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x10",
          b"\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00"]


@settings(max_examples=400, deadline=None)
@given(body=st.lists(st.sampled_from(PIECES), max_size=60), window=st.integers(2, 9))
def test_property_the_walk_is_libjpegs_marker_reading(tmp_path_factory, body, window):
    data = SOI + b"".join(body)
    path = tmp_path_factory.mktemp("w") / "f.jpg"
    path.write_bytes(data)
    assert outcome(path, window) == outcome(path) == libjpeg_markers(data)


def outcome(path, window=jpeg_scans.WINDOW):
    try:
        return walk(path, window)
    except ValueError:
        return "refused"


def test_bytes_between_segments_before_the_first_scan_are_bounded(tmp_path):
    """Pillow's header parse steps through bytes outside segments one at a time in Python (2 MB of 0xFF fill took
    2.6 s): up to MAX_BETWEEN of them (junk, stuffed 0xFF, restart markers) the file decodes as without them, one
    more and it is undecodable."""
    Image.new("L", (16, 16), 90).save(tmp_path / "plain.jpg")
    base = (tmp_path / "plain.jpg").read_bytes()
    plain = pillow_alone(tmp_path / "plain.jpg")
    at = base.index(b"\xff\xdb")  # after the first segment (Pillow takes a JPEG by its first three bytes)
    half = jpeg_scans.MAX_BETWEEN // 2
    for fill, n, ok in ((b"\x00", 2 * half, True), (b"\x00", 2 * half + 1, False), (b"\xff\x00", half, True),
                        (b"\xff\x00", half + 1, False), (b"\xd0\xff\xd7", 1000, True)):
        data = base[:at] + fill * n + base[at:]
        (tmp_path / "filled.jpg").write_bytes(data)
        got = decode_image(tmp_path / "filled.jpg", zero=True)
        assert np.array_equal(got[:, :, 0], plain) if ok else is_black_pixel(got, data), (fill, n)


def test_fill_bytes_are_bounded_in_all_and_the_walk_over_them_is_linear(tmp_path):
    """libjpeg passes over 0xFF fill without moving its read position (in a Huffman MCU it starts the MCU again) and
    Pillow feeds it all again, so the time went as the square of a run (64 MB before an EOI took 32 s: review 35) or
    of an MCU padded with runs each within a bound per run (42 MB, 15 s: review 36): MAX_FILL fill bytes in all, in
    one run between two scans or in many, decode as Pillow decodes the file without them, one more is undecodable,
    in windows of any size. And an expression that backtracked over a run was quadratic too (100 KB took 52 s):
    a run at the bound and 16 MB of stuffed bytes and restarts are walked in a process allowed 10 s of CPU."""
    import subprocess
    import sys

    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "prog.jpg", progressive=True)
    data = (tmp_path / "prog.jpg").read_bytes()
    cut = data.index(b"\xff\xda", 4 + data.index(b"\xff\xda"))  # the second scan
    fill = jpeg_scans.MAX_FILL
    runs = (b"\xff" * 257 + b"\x00") * (fill // 256)  # 256 fill bytes each, then a stuffed byte libjpeg passes over
    for pad, ok in ((b"\xff" * fill, True), (b"\xff" * (fill + 1), False), (runs, True), (runs + b"\xff", False)):
        filled = data[:cut] + pad + data[cut:]
        (tmp_path / "fill.jpg").write_bytes(filled)
        got = decode_image(tmp_path / "fill.jpg", zero=True)
        assert np.array_equal(got, pillow_alone(tmp_path / "prog.jpg")) if ok else is_black_pixel(got, filled)
        for window in (2, 7, 4096):
            assert (outcome(tmp_path / "fill.jpg", window) == "refused") is not ok, (len(pad), window)
    (tmp_path / "run.jpg").write_bytes(data[:cut] + b"\xff" * fill + data[cut:])
    (tmp_path / "pairs.jpg").write_bytes(data[:cut] + (b"\x12\xff\x00\xff\xd0") * (16 << 18) + data[cut:])
    code = ("import os, resource, sys\nresource.setrlimit(resource.RLIMIT_CPU, (10, 10))\n"
            "from mepf.embed.jpeg_scans import scans\n"
            "print(*(scans(os.open(p, os.O_RDONLY))[0] for p in sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run.jpg"), str(tmp_path / "pairs.jpg")],
                       capture_output=True, text=True)
    scans = data.count(b"\xff\xda")
    assert r.returncode == 0 and r.stdout.split() == [str(scans)] * 2, r.stdout + r.stderr[-500:]


def test_a_marker_libjpeg_refuses_before_the_first_scan_is_undecodable_unparsed(tmp_path):
    """Pillow's header parse goes on past an EOI and through the contents of JPG segments a byte at a time (16 MB
    took 13 s: review 35), and parses each frame in Python (51 MB of them took 5 s and 1.4 GB: review 36), where
    libjpeg refuses the file anyway (no image, an unknown code, a second SOI or frame): refused before Pillow parses
    it."""
    Image.new("L", (16, 16), 90).save(tmp_path / "plain.jpg")
    base = (tmp_path / "plain.jpg").read_bytes()
    for data in (SOI + EOI + bytes(1 << 20), base[:2] + seg(0xF0, bytes(60000)) * 20 + base[2:],
                 base[:2] + b"\xff\xd8" + base[2:], base[:2] + frame(0xC0, 16, 16) + base[2:]):
        (tmp_path / "refused.jpg").write_bytes(data)
        with pytest.raises(ValueError, match="refuses before its first scan"):
            walk(tmp_path / "refused.jpg")
        assert is_black_pixel(decode_image(tmp_path / "refused.jpg", zero=True), data)
        with pytest.raises(Exception):  # noqa: B017 - whatever Pillow raises: it cannot decode the file either
            pillow_alone(tmp_path / "refused.jpg")


def test_pillow_parses_no_quantization_table_while_mepf_decodes(tmp_path):
    """Pillow parsed each quantization table in Python for nothing mepf uses (32 MB of them took 1.7 s, and the
    marker bound allowed 4 GB: review 36): skipped like application segments while mepf decodes (libjpeg reads
    them), parsed again after; 2,000 of them decode as the image alone."""
    from mepf.embed.files import _metadata_skipped

    Image.new("L", (16, 16), 90).save(tmp_path / "plain.jpg")
    base = (tmp_path / "plain.jpg").read_bytes()
    with _metadata_skipped(), Image.open(tmp_path / "plain.jpg") as im:
        assert im.quantization == {} and im.size == (16, 16)
    with Image.open(tmp_path / "plain.jpg") as im:
        assert set(im.quantization) == {0}
    (tmp_path / "tables.jpg").write_bytes(base[:2] + seg(0xDB, b"\x01" + bytes(range(1, 65))) * 2000 + base[2:])
    assert np.array_equal(decode_image(tmp_path / "tables.jpg")[:, :, 0], pillow_alone(tmp_path / "plain.jpg"))
