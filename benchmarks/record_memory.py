"""Peak memory of one record at the decoding cap (2^26 pixels) through stage 1's decode and transform.

A PNG of zero rows is ~200 KB however many pixels it declares, and a JPEG's header can declare 65,535 x 65,535, so
one record in the folder decides this peak; each case runs in a fresh process (decoding as under --bad-records zero)
and prints its peak resident memory above the process after its imports, and what the record was decoded as.
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

CASES = {  # name: (width, height, PNG colour type, bit depth), or a JPEG: (width, height, "progressive jpeg")
    "8192 x 8192 RGB": (8192, 8192, 2, 8),
    "8192 x 8192 grey 16-bit": (8192, 8192, 0, 16),
    "65535 x 1024 RGB": (65535, 1024, 2, 8),
    "1024 x 65535 RGB": (1024, 65535, 2, 8),
    "65535 x 1024 RGBA 16-bit": (65535, 1024, 6, 16),
    "8192 x 8192 JPEG prog.": (8192, 8192, "progressive jpeg"),
    "32768 x 32768 JPEG prog.": (32768, 32768, "progressive jpeg"),
}

CHILD = """
import resource, sys
from pathlib import Path
from mepf.embed.files import decode_image
from mepf.embed.sources import pixels_of
from mepf.embed.transform import Transform
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak()
a = decode_image(Path(sys.argv[1]), zero=True)  # under --bad-records zero
decoded = peak()
Transform((int(sys.argv[2]),) * 2, int(sys.argv[3]))(pixels_of([a]))
print(f"{base:.0f} {decoded - base:.0f} {peak() - base:.0f} {type(a).__name__}")
"""


def png(path: Path, w: int, h: int, colour: int, depth: int) -> None:
    """A valid PNG of zero pixels, streamed through zlib (a few hundred KB at most)."""
    row = b"\x00" * (1 + w * {0: 1, 2: 3, 6: 4}[colour] * depth // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def progressive_jpeg(path: Path, w: int, h: int) -> None:
    """A progressive JPEG (4:4:4) of w x h: made whole up to the cap; above it a 64 x 64 one whose header declares
    w x h (a few hundred bytes), which libjpeg decodes through whole-image coefficients of the declared size."""
    import io

    from PIL import Image

    small = w * h <= 1 << 26
    b = io.BytesIO()
    Image.new("RGB", (w, h) if small else (64, 64), (10, 200, 30)).save(b, "JPEG", progressive=True, subsampling=0)
    data = bytearray(b.getvalue())
    if not small:
        sof = data.find(b"\xff\xc2")
        data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    path.write_bytes(bytes(data))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--make-jpeg", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_jpeg:
        return progressive_jpeg(Path(args.make_jpeg[0]), int(args.make_jpeg[1]), int(args.make_jpeg[2]))
    print(f"{'record':<26} {'file':>8} {'--channels':>10} {'imports MB':>10} {'+decode MB':>10} {'+transform MB':>13}"
          "  decoded as")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (w, h, *kind) in CASES.items():
            path = Path(tmp) / "record"
            if kind == ["progressive jpeg"]:  # made in a process of its own: a child's peak starts at its parent's
                subprocess.run([sys.executable, __file__, "--make-jpeg", str(path), str(w), str(h)], check=True)
            else:
                png(path, w, h, *kind)
            for channels in (1, 3):
                out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.image_size), str(channels)],
                                     capture_output=True, text=True, check=True).stdout.split()
                print(f"{name:<26} {path.stat().st_size // 1024:>6}KB {channels:>10} {out[0]:>10} {out[1]:>10} "
                      f"{out[2]:>13}  {out[3]}")


if __name__ == "__main__":
    main()
