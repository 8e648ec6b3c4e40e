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

    def __init__(self, level: int = 0, hashes=()):
        self.level, self.hashes = level, set(hashes)

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
        """(shared sampled records, share of self's sample, share of other's sample)."""
        level = max(self.level, other.level)
        a, b = self.at_level(level), other.at_level(level)
        shared = len(a & b)
        return shared, shared / max(len(a), 1), shared / max(len(b), 1)

    def keyed(self, key: bytes | None) -> KeyedSketch:
        """The form the release log keeps: each sampled hash replaced by its HMAC under the log's key, beside
        its sampling level. key None: the plain hashes (for log entries written before keys existed)."""
        def tag(h: int) -> bytes:
            raw = h.to_bytes(16, "big")
            return hmac.new(key, raw, hashlib.sha256).digest()[:16] if key is not None else raw
        return KeyedSketch(self.level, {tag(h): self._level_of(h) for h in self.hashes}, key is not None)

    def to_json(self) -> dict:
        raw = b"".join(x.to_bytes(16, "big") for x in sorted(self.hashes))
        return {"level": self.level, "hashes": base64.b64encode(raw).decode()}

    @classmethod
    def from_json(cls, d: dict) -> Sketch:
        raw = base64.b64decode(d["hashes"])
        return cls(int(d["level"]), (int.from_bytes(raw[i:i + 16], "big") for i in range(0, len(raw), 16)))


class KeyedSketch:
    """A sketch whose record hashes are HMACs under the release log's own secret key: whoever reads the log
    without the key cannot test whether a given image was in the data. Sampling levels are kept beside the
    tags, so two sketches under the same key compare at the higher level as plain sketches do."""

    def __init__(self, level: int, tags: dict, keyed: bool = True):
        self.level, self.tags, self.is_keyed = level, dict(tags), keyed

    def overlap(self, other: KeyedSketch) -> tuple:
        """(shared sampled records, share of self's sample, share of other's sample); 0 when the two are not
        under the same kind of key."""
        if self.is_keyed != other.is_keyed:
            return 0, 0.0, 0.0
        level = max(self.level, other.level)
        a = {t for t, lv in self.tags.items() if lv >= level}
        b = {t for t, lv in other.tags.items() if lv >= level}
        shared = len(a & b)
        return shared, shared / max(len(a), 1), shared / max(len(b), 1)

    def to_json(self) -> dict:
        raw = b"".join(bytes([lv]) + t for t, lv in sorted(self.tags.items()))
        return {"level": self.level, "keyed": base64.b64encode(raw).decode()}

    @classmethod
    def from_json(cls, d: dict) -> KeyedSketch:
        raw = base64.b64decode(d["keyed"], validate=True)
        if len(raw) % 17:
            raise ValueError("damaged keyed sketch")
        return cls(int(d["level"]), {raw[i + 1:i + 17]: raw[i] for i in range(0, len(raw), 17)})


class Fingerprint:
    """Order-free: the per-record hashes (pixels and label) are added modulo 2**256, so the digest does not
    depend on order or batching, and a duplicated record counts twice (a multiset)."""

    def __init__(self):
        self._sum, self._n = 0, 0
        self.sketch = Sketch()

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

    def merge(self, other: Fingerprint) -> None:
        """Combine with the fingerprint of a disjoint part of the same dataset (another rank's shard)."""
        self._sum = (self._sum + other._sum) % _MOD
        self._n += other._n
        level = max(self.sketch.level, other.sketch.level)
        merged = Sketch(level, self.sketch.at_level(level) | other.sketch.at_level(level))
        self.sketch = Sketch(level)
        for h in merged.hashes:
            self.sketch.add(h.to_bytes(16, "big"))

    def hexdigest(self) -> str:
        return hashlib.sha256(f"mepf-dataset-v2|{self._n}|{self._sum:064x}".encode()).hexdigest()
