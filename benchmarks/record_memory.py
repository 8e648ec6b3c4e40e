"""Peak memory of one record at the decoding cap (2^26 pixels) through stage 1's decode and transform.

A PNG of zero rows is ~200 KB however many pixels it declares, so one record in the folder decides this peak;
each case runs in a fresh process and prints its peak resident memory above the process after its imports.
Usage: python benchmarks/record_memory.py [--image-size 32]
"""
from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

CASES = {  # name: (width, height, PNG colour type, bit depth)
    "8192 x 8192 RGB": (8192, 8192, 2, 8),
    "8192 x 8192 grey 16-bit": (8192, 8192, 0, 16),
    "2^26 x 1 RGB": (1 << 26, 1, 2, 8),
}

CHILD = """
import resource, sys
from pathlib import Path
from mepf.embed.files import decode_image
from mepf.embed.transform import Transform
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak()
a = decode_image(Path(sys.argv[1]))
decoded = peak()
Transform((int(sys.argv[2]),) * 2, int(sys.argv[3]))([a])
print(f"{base:.0f} {decoded - base:.0f} {peak() - base:.0f}")
"""


def png(path: Path, w: int, h: int, colour: int, depth: int) -> None:
    """A valid PNG of zero pixels, streamed through zlib (a few hundred KB at most)."""
    row = b"\x00" * (1 + w * {0: 1, 2: 3}[colour] * depth // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    print(f"{'record':<26} {'file':>8} {'--channels':>10} {'imports MB':>10} {'+decode MB':>10} {'+transform MB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (w, h, colour, depth) in CASES.items():
            path = Path(tmp) / "record.png"
            png(path, w, h, colour, depth)
            for channels in (1, 3):
                out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.image_size), str(channels)],
                                     capture_output=True, text=True, check=True).stdout.split()
                print(f"{name:<26} {path.stat().st_size // 1024:>6}KB {channels:>10} {out[0]:>10} {out[1]:>10} "
                      f"{out[2]:>13}")


if __name__ == "__main__":
    main()
