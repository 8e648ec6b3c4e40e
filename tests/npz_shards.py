"""Exactly-once reading of an .npz in shards, importable by the tests and runnable under another Python
(`python tests/npz_shards.py FOLDER`, with mepf importable and no torch needed): zipfile changed in 3.12."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

N, BLOCK = 103, 10


def write(folder: Path, compressed: bool, labels_first: bool):
    """An .npz whose records carry their index (pixel 0), blocks larger than zipfile's 4 KB read-ahead."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (N, 32, 32, 1), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(N)
    y = rng.integers(0, 7, N)
    path = folder / f"d-{int(compressed)}{int(labels_first)}.npz"
    arrays = {"labels": y, "images": x} if labels_first else {"images": x, "labels": y}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path, x, y


def problems(folder: Path) -> list[str]:
    """Every way the shards of 1, 2 and 3 readers did not read each record once, with its own label."""
    from mepf.embed.files import ArraySource

    out = []
    for compressed in (False, True):
        for labels_first in (False, True):
            path, x, y = write(folder, compressed, labels_first)
            src = ArraySource(path, list("abcdefg"))
            for world in (1, 2, 3):
                case = f"compressed={compressed} labels_first={labels_first} shards={world}"
                seen = []
                try:
                    for rank in range(world):
                        for b, xb, yb in src.blocks(BLOCK, keep=lambda b, r=rank, w=world: b % w == r):
                            part = slice(b * BLOCK, (b + 1) * BLOCK)
                            if b % world != rank or not (np.array_equal(xb, x[part]) and np.array_equal(yb, y[part])):
                                out.append(f"{case}: block {b} read other bytes")
                            seen += [int(i) for i in xb[:, 0, 0, 0]]
                except Exception as e:  # noqa: BLE001 - reported, not raised: the caller lists every case
                    out.append(f"{case}: {type(e).__name__} {e}")
                    continue
                if sorted(seen) != list(range(N)):
                    out.append(f"{case}: records read {len(seen)} times for {N}, {len(set(seen))} distinct")
    return out


if __name__ == "__main__":
    found = problems(Path(sys.argv[1]))
    print("\n".join(found) or f"ok (Python {sys.version.split()[0]})")
    sys.exit(1 if found else 0)
