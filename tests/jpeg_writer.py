"""Crafted JPEGs, byte by byte, for tests/test_jpeg_scans.py and benchmarks/record_time.py: segments, frames and
scans with little or no entropy data (libjpeg's arithmetic decoder then reads zeros and does each block's work)."""
from __future__ import annotations

SOI, EOI = b"\xff\xd8", b"\xff\xd9"


def seg(code: int, body: bytes = b"") -> bytes:
    return bytes([0xFF, code]) + (len(body) + 2).to_bytes(2, "big") + body


def frame(code: int, w: int, h: int, comps: int = 1) -> bytes:
    return seg(code, bytes([8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([comps])
               + b"".join(bytes([i + 1, 0x11, 0]) for i in range(comps)))


def scan(ids, ss: int, se: int, ah: int = 0, al: int = 0) -> bytes:
    return seg(0xDA, bytes([len(ids)]) + b"".join(bytes([i, 0]) for i in ids) + bytes([ss, se, ah << 4 | al]))


DQT = seg(0xDB, b"\x00" + b"\x01" * 64)
DHT = seg(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # one code of one bit, for difference 0
EOB_RUNS = seg(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0")  # AC: one code of one bit, for a run of 2^14+ EOBs


def eob_runs(blocks: int) -> bytes:
    """Huffman entropy data ending every block of a scan in runs of 32,767 EOBs: 15 bits a run."""
    bits = "".join("0" + "1" * 14 for _ in range(-(-blocks // 32767)))
    bits += "1" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big")
    return data.replace(b"\xff", b"\xff\x00")


def progressive(w: int, h: int, refinements: int, comps: int = 1) -> bytes:
    """Arithmetic-coded (SOF10), flat: a DC scan, a first AC scan of each component, then `refinements` of each,
    with no entropy bytes (review 34's worst)."""
    ids = range(1, comps + 1)
    return (SOI + DQT + frame(0xCA, w, h, comps) + scan(list(ids), 0, 0)
            + b"".join(scan([c], 1, 63, 0, 1) for c in ids)
            + b"".join(scan([c], 1, 63, 1, 0) for c in ids) * refinements + EOI)
