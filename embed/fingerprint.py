"""A dataset's fingerprint, for the owner's local release log only (never released, never printed).

What it sees: the multiset of canonical records, pixels as stored plus the label index. It is the same
whatever the order, the file names, the container (image folder, .npz, .h5) and the transform options
(--image-size, --channels), because it is taken before the transform. Beside the exact fingerprint it
keeps a bounded sample of per-record pixel hashes (the records whose hash falls below a threshold, at
most SKETCH_CAP of them), so that a dataset that shares records with an earlier one (a subset, a
superset, a relabelled copy) is recognised too. It cannot recognise an image that was re-encoded with
loss, cropped, resized or otherwise changed before it reached mepf: those are different pixels.
"""
from __future__ import annotations

import base64
import hashlib
import hmac

import numpy as np

RECORD_TAG = b"mepf-record-v2|"
#: the most per-record hashes a sketch keeps (16 bytes each); past it the sampling rate halves
SKETCH_CAP = 4096
#: overlap above this share of either dataset's sampled records counts as a repeat release
REPEAT_SHARE = 0.5
_BITS = 128
_MOD = 1 << 256


def canonical(record) -> np.ndarray:
    """A record's pixels as stored, independent of its container: (H, W, C) with C = 1 for grey (an RGB
    record whose channels are equal is grey); a float record on the 1/255 grid becomes the uint8 it encodes."""
    a = np.asarray(record)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        u = np.round(a * 255)
        if np.all(np.abs(a * 255 - u) < 1e-3) and np.all((u >= 0) & (u <= 255)):
            a = u.astype(np.uint8)
    if a.shape[2] == 3 and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
        a = a[..., :1]
    return np.ascontiguousarray(a)


def record_hash(record) -> bytes:
    """SHA-256 of a canonical record's pixels (dtype, shape and bytes); labels are not part of it."""
    a = canonical(record)
    h = hashlib.sha256(RECORD_TAG)
    h.update(f"{a.dtype.str}|{list(a.shape)}|".encode())
    h.update(a.tobytes())
    return h.digest()


class Sketch:
    """Adaptive hash sampling: keep the record hashes (first 128 bits) with at least `level` leading zero
    bits; when more than SKETCH_CAP are kept, raise the level. Two sketches compared at the higher level
    are samples of the same hash range, so the share of common hashes estimates the overlap."""

    def __init__(self, level: int = 0, hashes=(), keyed: bool = False):
        self.level, self.hashes, self.keyed = level, set(hashes), keyed

    @staticmethod
    def _level_of(h: int) -> int:
        return _BITS - h.bit_length()

    def add(self, digest: bytes) -> None:
        h = int.from_bytes(digest[:16], "big")
        if self._level_of(h) >= self.level:
            self.hashes.add(h)
            while len(self.hashes) > SKETCH_CAP:
                self.level += 1
                self.hashes = {x for x in self.hashes if self._level_of(x) >= self.level}

    def at_level(self, level: int) -> set:
        return {x for x in self.hashes if self._level_of(x) >= level}

    def overlap(self, other: Sketch) -> tuple:
        """(shared sampled records, share of self's sample, share of other's sample); none shared between a
        keyed and a plain sketch (they sample different values)."""
        if self.keyed != other.keyed:
            return 0, 0.0, 0.0
        level = max(self.level, other.level)
        a, b = self.at_level(level), other.at_level(level)
        shared = len(a & b)
        return shared, shared / max(len(a), 1), shared / max(len(b), 1)

    def to_json(self) -> dict:
        raw = b"".join(x.to_bytes(16, "big") for x in sorted(self.hashes))
        out = {"level": self.level, "hashes": base64.b64encode(raw).decode()}
        return {**out, "keyed": True} if self.keyed else out

    @classmethod
    def from_json(cls, d: dict) -> Sketch:
        raw = base64.b64decode(d["hashes"])
        return cls(int(d["level"]), (int.from_bytes(raw[i:i + 16], "big") for i in range(0, len(raw), 16)),
                   d.get("keyed") is True)

    def merged(self, other: Sketch) -> Sketch:
        """The sketch of the union of two disjoint parts of one dataset."""
        level = max(self.level, other.level)
        out = Sketch(level, keyed=self.keyed)
        for h in self.at_level(level) | other.at_level(level):
            out.add(h.to_bytes(16, "big"))
        return out


def tag(key: bytes, digest: bytes) -> bytes:
    """A record hash under the release log's secret key: whoever lacks the key cannot compute it."""
    return hmac.new(key, digest, hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    """Names a key without revealing it, so that a log and a key that do not belong together are told apart."""
    return hmac.new(key, b"mepf-release-log-key", hashlib.sha256).hexdigest()[:16]


class Fingerprint:
    """Order-free: the per-record hashes (pixels and label) are added modulo 2**256, so the digest does not
    depend on order or batching, and a duplicated record counts twice (a multiset). With the release log's
    key it also keeps a keyed sketch, sampled by the records' keyed tags: the one the log stores, which
    tells nothing about any record to whoever lacks the key (neither which records were sampled nor their
    hashes). The plain sketch is kept in memory only, to compare with entries written before keys."""

    def __init__(self, key: bytes | None = None, keep_hashes: bool = False):
        self._sum, self._n, self.key = 0, 0, key
        self.sketch = Sketch()
        self.keyed_sketch = Sketch(keyed=True) if key is not None else None
        self._kept = [] if keep_hashes else None

    def update(self, records, labels) -> None:
        """Add records (with labels, or None when unlabelled)."""
        self.add([record_hash(r) for r in records], [-1] * len(records) if labels is None else labels)

    def add(self, pixel_hashes, labels) -> None:
        """Add records given by their record_hash and their label index (-1 when unlabelled)."""
        for pixels, label in zip(pixel_hashes, labels):
            h = hashlib.sha256(pixels + int(label).to_bytes(8, "little", signed=True)).digest()
            self._sum = (self._sum + int.from_bytes(h, "big")) % _MOD
            self._n += 1
            self.sketch.add(pixels)
            if self.keyed_sketch is not None:
                self.keyed_sketch.add(tag(self.key, pixels))
            if self._kept is not None:
                self._kept.append((pixels, int(label)))

    def with_key(self, key: bytes) -> Fingerprint:
        """The same records fingerprinted under `key` (needs keep_hashes=True: an in-memory reference set)."""
        if self._kept is None:
            raise ValueError("with_key needs a fingerprint made with keep_hashes=True")
        out = Fingerprint(key)
        out.add([p for p, _ in self._kept], [y for _, y in self._kept])
        return out

    def merge(self, other: Fingerprint) -> None:
        """Combine with the fingerprint of a disjoint part of the same dataset (another rank's shard)."""
        self._sum = (self._sum + other._sum) % _MOD
        self._n += other._n
        self.sketch = self.sketch.merged(other.sketch)
        if self.keyed_sketch is not None:
            self.keyed_sketch = self.keyed_sketch.merged(other.keyed_sketch)

    def hexdigest(self) -> str:
        return hashlib.sha256(f"mepf-dataset-v2|{self._n}|{self._sum:064x}".encode()).hexdigest()

    def keyed_hexdigest(self) -> str | None:
        """The digest under the log's key, as the log stores it ('k1:' marks the keyed form)."""
        return keyed_digest(self.key, self.hexdigest()) if self.key is not None else None


def keyed_digest(key: bytes, plain: str) -> str:
    return "k1:" + hmac.new(key, plain.encode(), hashlib.sha256).hexdigest()
