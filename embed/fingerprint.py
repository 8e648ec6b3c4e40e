"""A dataset's fingerprint, for the owner's local release log only (never released, never printed).

What it sees: the multiset of canonical records, pixels as stored plus the label index. It is the same
whatever the order, the file names, the container (image folder, .npz, .h5) and the transform options
(--image-size, --channels), because it is taken before the transform. Beside the exact fingerprint it
keeps a bounded sample of per-record pixel hashes (the records whose hash falls below a threshold, at
most SKETCH_CAP of them), so that a dataset that shares records with an earlier one (a subset, a
superset, a relabelled copy) is recognised too. It cannot recognise an image that was re-encoded with
loss, cropped, resized or otherwise changed before it reached mepf: those are different pixels. A record that
`--bad-records zero` embeds as the black image counts as itself (`replaced_identity`), one it drops not at all.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import numpy as np

from .sources import Replaced

RECORD_TAG = b"mepf-record-v2|"
#: the most per-record hashes a sketch keeps (16 bytes each); past it the sampling rate halves
SKETCH_CAP = 4096
#: overlap above this share of either dataset's sampled records counts as a repeat release
REPEAT_SHARE = 0.5
_BITS = 128
_MOD = 1 << 256


def canonical(record) -> np.ndarray:
    """A record's pixels as stored, independent of its container: (H, W, C) with C = 1 for grey (an RGB
    record whose channels are equal is grey); a float record on the 1/255 grid (to its dtype's precision: a
    float16 copy of uint8 images is the same records) becomes the uint8 it encodes."""
    a = np.asarray(record)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        # k/255 held in float16 (as stored, or widened by a reader) is off the grid by up to 0.25 of a step
        half = np.array_equal(a.astype(np.float16).astype(np.float32), a)
        tol = 255 * float(np.finfo(np.float16).eps) if half else 1e-3
        u = np.round(a * 255)
        if np.all(np.abs(a * 255 - u) < tol) and np.all((u >= 0) & (u <= 255)):
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


def record_hashes(records) -> list:
    """record_hash of each record of a block; a Replaced record (sources.py) is its identity."""
    return [r.identity if isinstance(r, Replaced) else record_hash(r) for r in records]


def replaced_identity(*, file_bytes: bytes | None = None, values=None) -> bytes:
    """The record_hash in the fingerprint of a record embedded as the black image (--bad-records zero, or a PNG
    above the decoding cap): for a file, its bytes (their SHA-256); for a float record with a value outside [0,1],
    the record its values encode on the two common wrong scales, so that the corrected data released next is a
    repeat (in [-1,1]: (a+1)/2; in [0,255]: a/255; then record_hash's own grid rule), else its values as stored,
    canonical as record_hash's are (float32, equal channels one, one NaN, no -0). Not the black image's hash
    (unless the values encode black, as an all -1 record does): such records are told apart as any records are."""
    h = hashlib.sha256(b"mepf-replaced-v1|")
    if file_bytes is not None:
        h.update(b"file|" + file_bytes)
        return h.digest()
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.asarray(values, dtype=np.float64)  # mapped in float64 and rounded once, by record_hash, as the
        v = v[:, :, None] if v.ndim == 2 else v  # owner's own correction in its dtype is (float16 to float64)
        if np.all(np.isfinite(v)):
            lo, hi = float(v.min()), float(v.max())
            if -1 <= lo and hi <= 1:
                return record_hash((v + 1) / 2)
            if 0 <= lo and hi <= 255:
                return record_hash(v / 255)
        a = v.astype(np.float32)
        a = np.where(np.isnan(a), np.float32(np.nan), a) + np.float32(0)  # one NaN; -0 + 0 is +0
    if a.shape[2] == 3 and np.array_equal(a[..., 0], a[..., 1], equal_nan=True) \
            and np.array_equal(a[..., 1], a[..., 2], equal_nan=True):
        a = a[..., :1]
    h.update(f"values|{list(a.shape)}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


class Sketch:
    """Adaptive hash sampling: keep the record hashes (first 128 bits) with at least `level` leading zero
    bits; when more than SKETCH_CAP are kept, raise the level. Two sketches compared at the higher level
    are samples of the same hash range, so the share of common hashes estimates the overlap. `kind` says
    what was hashed: 'plain' record hashes, 'k1' tags under the log's key (entries of v2 logs), 'k3' tags
    under the log's tag key (today's entries, stored sealed); sketches of different kinds never compare."""

    def __init__(self, level: int = 0, hashes=(), kind: str = "plain"):
        self.level, self.hashes, self.kind = level, set(hashes), kind

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
        """(shared sampled records, share of self's sample, share of other's sample); none shared between
        sketches of different kinds (they sample different values)."""
        if self.kind != other.kind:
            return 0, 0.0, 0.0
        level = max(self.level, other.level)
        a, b = self.at_level(level), other.at_level(level)
        shared = len(a & b)
        return shared, shared / max(len(a), 1), shared / max(len(b), 1)

    def to_json(self) -> dict:
        """The form of log entries before sealing (plain, and 'k1' with keyed: true)."""
        raw = b"".join(x.to_bytes(16, "big") for x in sorted(self.hashes))
        out = {"level": self.level, "hashes": base64.b64encode(raw).decode()}
        return {**out, "keyed": True} if self.kind == "k1" else out

    @classmethod
    def from_json(cls, d: dict) -> Sketch:
        raw = base64.b64decode(d["hashes"])
        return cls(int(d["level"]), (int.from_bytes(raw[i:i + 16], "big") for i in range(0, len(raw), 16)),
                   "k1" if d.get("keyed") is True else "plain")

    def to_bytes(self) -> bytes:
        """level (1 byte), count (2 bytes, big-endian), then the hashes, 16 bytes each, sorted."""
        return bytes([self.level]) + len(self.hashes).to_bytes(2, "big") + b"".join(
            x.to_bytes(16, "big") for x in sorted(self.hashes))

    @classmethod
    def from_bytes(cls, raw: bytes, kind: str) -> tuple:
        """(sketch, bytes after it); ValueError for anything that is not a well-formed sketch."""
        if len(raw) < 3:
            raise ValueError("short sketch")
        level, count = raw[0], int.from_bytes(raw[1:3], "big")
        end = 3 + 16 * count
        if level > _BITS or count > SKETCH_CAP or len(raw) < end:
            raise ValueError("malformed sketch")
        hashes = [int.from_bytes(raw[i:i + 16], "big") for i in range(3, end, 16)]
        if any(cls._level_of(h) < level for h in hashes) or len(set(hashes)) != count:
            raise ValueError("malformed sketch")
        return cls(level, hashes, kind), raw[end:]

    def merged(self, other: Sketch) -> Sketch:
        """The sketch of the union of two disjoint parts of one dataset."""
        level = max(self.level, other.level)
        out = Sketch(level, kind=self.kind)
        for h in self.at_level(level) | other.at_level(level):
            out.add(h.to_bytes(16, "big"))
        return out


class TagFilter:
    """Every record's tag (its first 128 bits) in a Bloom filter of FILTER_BITS_PER_RECORD bits per expected
    record, in memory only (never in the log): the run sees every record, so an earlier entry's sampled tags
    found here show that the earlier data is within this one (a superset of a small pilot release, which the
    sketches, compared at this run's coarser level, miss). Parts of one dataset merge by OR."""

    K = 11  # hash positions per tag: a false hit about 1.3e-6 at 32 bits per record

    def __init__(self, expected: int):
        bits = 1 << 13
        while bits < FILTER_BITS_PER_RECORD * expected and bits < FILTER_MAX_BITS:
            bits <<= 1
        self.bits, self._fill = np.zeros(bits // 8, np.uint8), None

    def _positions(self, hashes: list) -> tuple:
        """Each tag's K bit positions (double hashing of its two 64-bit halves, mod m), as (byte index, bit mask)
        arrays of shape (N, K)."""
        lo = np.array([h & ((1 << 64) - 1) for h in hashes], np.uint64)
        hi = np.array([(h >> 64) | 1 for h in hashes], np.uint64)
        pos = lo[:, None] + np.arange(self.K, dtype=np.uint64)[None, :] * hi[:, None]  # mod 2^64, which m divides
        pos &= np.uint64(len(self.bits) * 8 - 1)
        return (pos >> np.uint64(3)).astype(np.intp), (1 << (pos & np.uint64(7))).astype(np.uint8)

    def add(self, hashes: list) -> None:
        """Add tags (their first 128 bits as ints), the positions of a whole batch at once."""
        if not hashes:
            return
        np.bitwise_or.at(self.bits, *self._positions(hashes))
        self._fill = None

    def found(self, hashes: list) -> int:
        """How many of the tags `hashes` the filter holds (added, or by chance)."""
        if not hashes:
            return 0
        at, mask = self._positions(hashes)
        return int(np.all(self.bits[at] & mask, axis=1).sum())

    def merge(self, other: TagFilter) -> None:
        np.bitwise_or(self.bits, other.bits, out=self.bits)
        self._fill = None

    def false_rate(self) -> float:
        """The chance that a tag not added is found, from the share of bits set (counted once)."""
        if self._fill is None:
            self._fill = int(_POPCOUNT[self.bits].sum(dtype=np.int64)) / (len(self.bits) * 8)
        return self._fill ** self.K

    def share_within(self, hashes) -> float:
        """The share of `hashes` (an earlier entry's sampled tags) that were added here, corrected for the hits a
        filter of this fill gives by chance; 0 where the found ones are within chance (odds about 1e-6) or the
        filter is too full to tell (false rate above MAX_FALSE_RATE)."""
        hashes = list(hashes)
        p = self.false_rate()
        if not hashes or p > MAX_FALSE_RATE:
            return 0.0
        found, expected = self.found(hashes), p * len(hashes)
        if found <= expected + 5 * expected ** 0.5 + 2:
            return 0.0
        return (found - expected) / ((1 - p) * len(hashes))


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)  # numpy 1.x has no bitwise_count

#: the tag filter's size: bits per record the run expects (a power of two at least this), and its ceiling (16 MB,
#: exchanged between torchrun ranks: past 4 M records its false hits grow, which `share_within` corrects for; past about
#: 13 M, where they pass MAX_FALSE_RATE, it is not used)
FILTER_BITS_PER_RECORD, FILTER_MAX_BITS, MAX_FALSE_RATE = 32, 1 << 27, 0.01


def tag(key: bytes, digest: bytes) -> bytes:
    """A record hash under a secret key: whoever lacks the key cannot compute it."""
    return hmac.new(key, digest, hashlib.sha256).digest()


def subkey(key: bytes, purpose: str) -> bytes:
    """A key derived from the release log's key for one purpose; it reveals nothing of the log's key."""
    return hmac.new(key, f"mepf-release-log|{purpose}".encode(), hashlib.sha256).digest()


def tag_key(key: bytes) -> bytes:
    """The key of the record tags that sketches sample: the only key other ranks are given (never the log's)."""
    return subkey(key, "sketch-tags-v3")


def key_id(key: bytes) -> str:
    """Names a key without revealing it, so that a log and a key that do not belong together are told apart."""
    return hmac.new(key, b"mepf-release-log-key", hashlib.sha256).hexdigest()[:16]


#: a sealed sketch: version, level, count, then SKETCH_CAP slots of 16 bytes, whatever the data's size
SEALED_BYTES = 4 + 16 * SKETCH_CAP
SEAL_VERSION = 3


def _keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    """HMAC-SHA256 in counter mode: a pseudorandom pad under `key`, fresh for each nonce."""
    blocks = (length + 31) // 32
    return b"".join(hmac.new(key, nonce + i.to_bytes(4, "big"), hashlib.sha256).digest()
                    for i in range(blocks))[:length]


def seal_sketch(key: bytes, sketch: Sketch) -> dict:
    """A sketch as a log entry stores it: padded to a fixed size and encrypted and authenticated under keys
    derived from the log's key, so that without the key it tells nothing, not the number of records sampled
    (so nothing of n) and not which records two entries share. The repeat check opens it with the key."""
    plain = bytes([SEAL_VERSION]) + sketch.to_bytes()
    plain += bytes(SEALED_BYTES - len(plain))
    nonce = secrets.token_bytes(16)
    pad = np.frombuffer(_keystream(subkey(key, "sketch-seal-v3"), nonce, SEALED_BYTES), np.uint8)
    box = (np.frombuffer(plain, np.uint8) ^ pad).tobytes()
    mac = hmac.new(subkey(key, "sketch-mac-v3"), nonce + box, hashlib.sha256).hexdigest()
    return {"sealed": SEAL_VERSION, "nonce": nonce.hex(), "box": base64.b64encode(box).decode(), "mac": mac}


def open_sketch(key: bytes | None, sealed: dict) -> Sketch | None:
    """The sketch inside a sealed entry, or None without the right key or for a damaged one."""
    if key is None:
        return None
    try:
        nonce, box = bytes.fromhex(sealed["nonce"]), base64.b64decode(sealed["box"], validate=True)
        mac = hmac.new(subkey(key, "sketch-mac-v3"), nonce + box, hashlib.sha256).hexdigest()
        if len(box) != SEALED_BYTES or not hmac.compare_digest(mac, str(sealed["mac"])):
            return None
        pad = np.frombuffer(_keystream(subkey(key, "sketch-seal-v3"), nonce, SEALED_BYTES), np.uint8)
        plain = (np.frombuffer(box, np.uint8) ^ pad).tobytes()
        if plain[0] != SEAL_VERSION:
            return None
        return Sketch.from_bytes(plain[1:], "k3")[0]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


class Fingerprint:
    """Order-free: the per-record hashes (pixels and label) are added modulo 2**256, so the digest does not
    depend on order or batching, and a duplicated record counts twice (a multiset). Beside it, sketches:
    the plain one (in memory only, to compare with entries written before keys), the one of tags under
    `tag_key` (what the log stores, sealed) and, given the log's own key as `legacy_key`, the one of tags
    under it (to compare with entries of logs from before sealing). Under torchrun each rank keeps its own
    and rank 0 merges them from their bytes (`to_bytes`): the log's key never leaves rank 0."""

    def __init__(self, tag_key: bytes | None = None, legacy_key: bytes | None = None, keep_hashes: bool = False,
                 expected: int = 0):
        """`expected`: the number of records the whole dataset has (every rank the same), to size the tag filter;
        0: none kept."""
        self._sum, self._n = 0, 0
        self.tag_key, self.legacy_key = tag_key, legacy_key
        self.sketch = Sketch()
        self.tag_sketch = Sketch(kind="k3") if tag_key is not None else None
        self.tag_filter = TagFilter(expected) if tag_key is not None and expected > 0 else None
        self.legacy_sketch = Sketch(kind="k1") if legacy_key is not None else None
        self._kept = [] if keep_hashes else None

    def update(self, records, labels) -> None:
        """Add records (with labels, or None when unlabelled); a Replaced record counts as its identity."""
        self.add(record_hashes(records), [-1] * len(records) if labels is None else labels)

    def add(self, pixel_hashes, labels) -> None:
        """Add records given by their record_hash and their label index (-1 when unlabelled)."""
        tags = []
        for pixels, label in zip(pixel_hashes, labels):
            h = hashlib.sha256(pixels + int(label).to_bytes(8, "little", signed=True)).digest()
            self._sum = (self._sum + int.from_bytes(h, "big")) % _MOD
            self._n += 1
            self.sketch.add(pixels)
            if self.tag_sketch is not None:
                t = tag(self.tag_key, pixels)
                self.tag_sketch.add(t)
                tags.append(int.from_bytes(t[:16], "big"))
            if self.legacy_sketch is not None:
                self.legacy_sketch.add(tag(self.legacy_key, pixels))
            if self._kept is not None:
                self._kept.append((pixels, int(label)))
        if self.tag_filter is not None:
            self.tag_filter.add(tags)

    def with_key(self, key: bytes) -> Fingerprint:
        """The same records fingerprinted under the log's `key` (needs keep_hashes=True: an in-memory set)."""
        if self._kept is None:
            raise ValueError("with_key needs a fingerprint made with keep_hashes=True")
        out = Fingerprint(tag_key(key), legacy_key=key, expected=len(self._kept))
        out.add([p for p, _ in self._kept], [y for _, y in self._kept])
        return out

    def merge(self, other: Fingerprint) -> None:
        """Combine with the fingerprint of a disjoint part of the same dataset (another rank's shard)."""
        self._sum = (self._sum + other._sum) % _MOD
        self._n += other._n
        self.sketch = self.sketch.merged(other.sketch)
        if self.tag_sketch is not None:
            self.tag_sketch = self.tag_sketch.merged(other.tag_sketch)
        if self.tag_filter is not None:  # a part without one (or of another size) leaves the whole without it
            if other.tag_filter is not None and len(other.tag_filter.bits) == len(self.tag_filter.bits):
                self.tag_filter.merge(other.tag_filter)
            else:
                self.tag_filter = None
        if self.legacy_sketch is not None:  # a part without it makes the whole's sample partial: dropped
            self.legacy_sketch = self.legacy_sketch.merged(other.legacy_sketch) if other.legacy_sketch else None

    #: the most bytes to_bytes gives without the tag filter: n, the sum, then two sketches and a flag
    MAX_BYTES = 8 + 32 + 1 + 2 * (3 + 16 * SKETCH_CAP)

    def max_bytes(self) -> int:
        """The most bytes this fingerprint's to_bytes gives (every rank's the same: the filter's size is fixed)."""
        return self.MAX_BYTES + (len(self.tag_filter.bits) if self.tag_filter is not None else 0)

    def to_bytes(self) -> bytes:
        """What a rank sends to rank 0: n, the sum, the plain and tag sketches, then the tag filter's bits (no
        key, no legacy sketch)."""
        tags = self.tag_sketch.to_bytes() if self.tag_sketch is not None else b""
        bits = self.tag_filter.bits.tobytes() if self.tag_filter is not None and tags else b""
        return (self._n.to_bytes(8, "big") + self._sum.to_bytes(32, "big") + bytes([bool(tags)])
                + self.sketch.to_bytes() + tags + bits)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Fingerprint:
        """A peer's part; ValueError for anything malformed (it is parsed, never unpickled)."""
        if len(raw) < 41:
            raise ValueError("short fingerprint")
        out = cls()
        out._n, out._sum = int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:40], "big")
        out.sketch, rest = Sketch.from_bytes(raw[41:], "plain")
        if raw[40]:
            out.tag_sketch, rest = Sketch.from_bytes(rest, "k3")
        if rest:
            if not raw[40] or len(rest) < (1 << 10) or len(rest) > FILTER_MAX_BITS // 8 or len(rest) & (len(rest) - 1):
                raise ValueError("malformed fingerprint")
            out.tag_filter = TagFilter(0)
            out.tag_filter.bits = np.frombuffer(rest, np.uint8).copy()
        if out._sum >= _MOD:
            raise ValueError("malformed fingerprint")
        return out

    def hexdigest(self) -> str:
        return hashlib.sha256(f"mepf-dataset-v2|{self._n}|{self._sum:064x}".encode()).hexdigest()


def keyed_digest(key: bytes, plain: str) -> str:
    """The dataset's digest as the log stores it, under the log's key ('k1:' marks the keyed form)."""
    return "k1:" + hmac.new(key, plain.encode(), hashlib.sha256).hexdigest()
