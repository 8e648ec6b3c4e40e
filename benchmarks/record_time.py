"""Time to decode one record at the bounds of stage 1's rules: the slowest files a folder can hold.

A JPEG may hold many scans, each a pass over the whole image (review 34: 2.6 KB took 52 s); embed/jpeg_scans.py
bounds the blocks its scans decode before decoding. Each case is a crafted file of a few hundred bytes at the
bound (little or no entropy data: libjpeg's arithmetic decoder then reads zeros and does each block's work), some
past it, and a PNG at the decoding cap for comparison; each is decoded in a fresh process as under --bad-records
zero, and the wall time of decode_image printed with what the record was decoded as. Not here: arithmetic data
that an adapted coder makes cost a fraction of a bit a decision (cjpeg -arithmetic of a repeated block, its
refinement scan copied: 400 ns a block), the reason an arithmetic block counts 16, and data whose bits each buy
~30 decisions (review 36: 610 ns a byte), the reason arithmetic-coded data is bounded.
Usage: python benchmarks/record_time.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from record_memory import png

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for its crafted-JPEG writer
from tests.jpeg_writer import DHT, DQT, EOB_RUNS, EOI, SOI, eob_runs, frame, progressive, scan  # noqa: E402


def huffman_refinements(side: int, comps: int, refinements: int) -> bytes:
    """Huffman (SOF2): a DC scan, a first AC scan of each component, then `refinements` of each that end every block
    in EOB runs, for which libjpeg still walks the band of each block (review 34's costliest Huffman scan)."""
    runs = eob_runs((side // 8) ** 2)
    ids = range(1, comps + 1)
    return (SOI + DQT + frame(0xC2, side, side, comps) + DHT + EOB_RUNS + scan(list(ids), 0, 0)
            + b"".join(scan([c], 1, 63, 0, 1) + runs for c in ids)
            + b"".join(scan([c], 1, 63, 1, 0) + runs for c in ids) * refinements + EOI)


def narrow(side: int, scans: int, arithmetic: bool) -> bytes:
    """A DC scan then `scans` refinements of coefficient 63 alone (review 35: 88 s when a scan was charged its
    band's width)."""
    code, tables = (0xCA, b"") if arithmetic else (0xC2, DHT + EOB_RUNS)
    return SOI + DQT + frame(code, side, side, 1) + tables + scan([1], 0, 0) + scan([1], 63, 63, 1, 0) * scans + EOI


def sequential(side: int, code: int = 0xC9) -> bytes:
    """One scan of four components (arithmetic-coded: SOF9)."""
    return SOI + DQT + frame(code, side, side, 4) + (DHT if code == 0xC0 else b"") + scan([1, 2, 3, 4], 0, 63) + EOI


def lossless(side: int, passes: int) -> bytes:
    """Huffman lossless (SOF3) of four components, each scanned `passes` times."""
    return (SOI + frame(0xC3, side, side, 4) + DHT
            + b"".join(scan([c], 1, 0) for c in (1, 2, 3, 4)) * passes + EOI)


CASES = [  # (name, the file's bytes, or None for a PNG of zero pixels at the decoding cap); at 2^25 blocks, and past
    ("Huffman prog. 8192^2 grey, 30 EOB-run ref.", lambda: huffman_refinements(8192, 1, 30)),
    ("  31 refinements (past)", lambda: huffman_refinements(8192, 1, 31)),
    ("Huffman prog. 8192^2 RGB, 8 EOB-run ref.", lambda: huffman_refinements(8192, 3, 8)),
    ("Huffman 8192^2, 31 scans of coef. 63", lambda: narrow(8192, 31, False)),
    ("arith. prog. 2048^2 grey, 30 ref.", lambda: progressive(2048, 2048, 30)),
    ("  31 refinements (past)", lambda: progressive(2048, 2048, 31)),
    ("  review 34's: 16384^2, 250 ref.", lambda: progressive(16384, 16384, 250)),
    ("arith. 2048^2, 31 scans of coef. 63", lambda: narrow(2048, 31, True)),
    ("  review 35's: 12392^2, 894 (past)", lambda: narrow(12392, 894, True)),
    ("arith. prog. 2048^2 CMYK, 6 ref.", lambda: progressive(2048, 2048, 6, 4)),
    ("Huffman seq. 23168^2 CMYK", lambda: sequential(23168, 0xC0)),
    ("arith. seq. 5792^2 CMYK", lambda: sequential(5792)),
    ("  65500^2 (past; was 13 s)", lambda: sequential(65500)),
    ("lossless 8192^2 CMYK x 2", lambda: lossless(8192, 2)),
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
    print(f"{'record':<38} {'file':>9} {'decode s':>9}  decoded as")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "record"
        for name, make in CASES:
            if make is None:
                png(path, 8192, 8192, 2, 8)
            else:
                path.write_bytes(make())
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                                 check=True).stdout.split(maxsplit=1)
            print(f"{name:<38} {path.stat().st_size:>8}B {out[0]:>9}  {out[1].strip()}")


if __name__ == "__main__":
    main()
