"""Time to decode one record at the bounds of stage 1's rules: the slowest files a folder can hold.

A JPEG may hold many scans, each a pass over the whole image (review 34: 2.6 KB took 52 s); embed/jpeg_scans.py
bounds them before decoding. Each case is a crafted file of a few hundred bytes at a bound (no entropy data, so
libjpeg's arithmetic decoder reads zeros and does every block's whole work), the first past it, and a PNG at the
decoding cap for comparison; each is decoded in a fresh process as under --bad-records zero, and the wall time of
decode_image printed with what the record was decoded as.
Usage: python benchmarks/record_time.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from record_memory import png

SOI, EOI = b"\xff\xd8", b"\xff\xd9"


def seg(code: int, body: bytes) -> bytes:
    return bytes([0xFF, code]) + (len(body) + 2).to_bytes(2, "big") + body


def frame(code: int, w: int, h: int, comps: int) -> bytes:
    return seg(code, bytes([8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([comps])
               + b"".join(bytes([i + 1, 0x11, 0]) for i in range(comps)))


def scan(ids, ss: int, se: int, ah: int = 0, al: int = 0) -> bytes:
    return seg(0xDA, bytes([len(ids)]) + b"".join(bytes([i, 0]) for i in ids) + bytes([ss, se, ah << 4 | al]))


DQT = seg(0xDB, b"\x00" + b"\x01" * 64)
DHT = seg(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # one code of one bit, for difference 0


def progressive(side: int, comps: int, refinements: int) -> bytes:
    """Arithmetic-coded (SOF10): a DC scan, a first AC scan of each component, then `refinements` of each."""
    ids = range(1, comps + 1)
    return (SOI + DQT + frame(0xCA, side, side, comps) + scan(list(ids), 0, 0)
            + b"".join(scan([c], 1, 63, 0, 1) for c in ids)
            + b"".join(scan([c], 1, 63, 1, 0) for c in ids) * refinements + EOI)


def sequential(side: int) -> bytes:
    """Arithmetic-coded (SOF9), one scan of four components."""
    return SOI + DQT + frame(0xC9, side, side, 4) + scan([1, 2, 3, 4], 0, 63) + EOI


def lossless(side: int, passes: int) -> bytes:
    """Huffman lossless (SOF3) of four components, each scanned `passes` times."""
    return (SOI + frame(0xC3, side, side, 4) + DHT
            + b"".join(scan([c], 1, 0) for c in (1, 2, 3, 4)) * passes + EOI)


CASES = [  # (name, the file's bytes, or None for a PNG of zero pixels at the decoding cap)
    ("JPEG prog. 16384^2 grey, 7 ref.", lambda: progressive(16384, 1, 7)),
    ("  8 refinements (past)", lambda: progressive(16384, 1, 8)),
    ("  review 34's: 250 ref. (past)", lambda: progressive(16384, 1, 250)),
    ("JPEG prog. 8192^2 CMYK, 7 ref.", lambda: progressive(8192, 4, 7)),
    ("  8 refinements (past)", lambda: progressive(8192, 4, 8)),
    ("JPEG seq. 23168^2 CMYK", lambda: sequential(23168)),
    ("  23176^2 (past)", lambda: sequential(23176)),
    ("  65500^2 (past)", lambda: sequential(65500)),
    ("JPEG lossless 8192^2 CMYK x 2", lambda: lossless(8192, 2)),
    ("PNG 8192^2 RGB (the cap)", None),
]

CHILD = """
import sys, time
from pathlib import Path
from mepf.embed.files import decode_image
t = time.perf_counter()
a = decode_image(Path(sys.argv[1]), zero=True)
print(f"{time.perf_counter() - t:.2f}", type(a).__name__, getattr(a, "shape", ""))
"""


def main():
    print(f"{'record':<32} {'file':>9} {'decode s':>9}  decoded as")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "record"
        for name, make in CASES:
            if make is None:
                png(path, 8192, 8192, 2, 8)
            else:
                path.write_bytes(make())
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                                 check=True).stdout.split(maxsplit=1)
            print(f"{name:<32} {path.stat().st_size:>8}B {out[0]:>9}  {out[1].strip()}")


if __name__ == "__main__":
    main()
