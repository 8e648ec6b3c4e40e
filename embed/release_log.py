"""The data owner's local release log (JSONL, never released): which data was embedded, at what cost.

Each entry holds the dataset's fingerprint and its sketch of sampled record hashes (embed/fingerprint.py),
the output's SHA-256 and the guarantee. The sketch's hashes are HMACs under a secret key kept beside the
log (`<log>.key`, owner-only), so the log alone, shown to an auditor say, cannot be used to test whether
an image was in the data. Earlier releases that are the same multiset of records, or share records with
it, are found from these; their budgets compose. Log, key and a new folder are created owner-only.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from mepf.artifacts.errors import MepfError

from .fingerprint import REPEAT_SHARE, Fingerprint, KeyedSketch, Sketch


def default_log_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mepf" / "releases.jsonl"


def read_log(path) -> list:
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    raise MepfError(f"release log {path} line {i} is corrupt; repair or move the file") from None
    return entries


def key_path(log_path) -> Path:
    return Path(str(log_path) + ".key")


def read_key(log_path) -> bytes | None:
    """The log's sketch key, or None where it has none (yet)."""
    path = key_path(log_path)
    if not path.is_file():
        return None
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise MepfError(f"release log key {path} is damaged; restore it from a backup, or start a new log with "
                        "--release-log NEW (budgets in the old log then no longer compose with new releases)")
    return key


def prepare(log_path, entries: list) -> bytes:
    """Before any record is read: the log can be appended to and has its key (created on first use), so a
    release is never written without its entry. Returns the key."""
    path = Path(log_path)
    key = read_key(path)
    if key is None and any(isinstance(e.get("sketch"), dict) and "keyed" in e["sketch"] for e in entries):
        raise MepfError(f"release log key {key_path(path)} is missing, so earlier releases cannot be matched record "
                        "by record; restore it from a backup, or start a new log with --release-log NEW (budgets "
                        "in the old log then no longer compose with new releases)")
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        if key is None:
            key = secrets.token_bytes(32)
            fd = os.open(key_path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key.hex() + "\n")
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise MepfError(f"release log {path} cannot be written ({type(e).__name__}); pass a writable "
                        "--release-log") from None
    return key


def entry_sketch(entry: dict, key: bytes | None) -> KeyedSketch | None:
    """An entry's sketch in comparable form: as stored (keyed), or an older plain sketch keyed now; None for
    an entry from before sketches, or a damaged one (its fingerprint still compares)."""
    d = entry.get("sketch")
    try:
        if "keyed" in d:
            return KeyedSketch.from_json(d)
        return Sketch.from_json(d).keyed(key)
    except (KeyError, TypeError, ValueError):
        return None


def _related(entries: list, fingerprint: str, mine: KeyedSketch | None, key: bytes | None) -> dict:
    out = {"same": [], "most": [], "some": []}
    for e in entries:
        if e.get("fingerprint") == fingerprint:
            out["same"].append(e)
            continue
        theirs = entry_sketch(e, key)
        if mine is None or theirs is None:
            continue
        shared, a, b = mine.overlap(theirs)
        if shared:
            out["most" if max(a, b) >= REPEAT_SHARE else "some"].append(e)
    return out


def related(entries: list, fingerprint: str, sketch: Sketch, key: bytes | None) -> dict:
    """Earlier releases of this data: 'same' (the same multiset of records), 'most' (sharing at least
    REPEAT_SHARE of either dataset's sampled records: a subset, superset or relabelled copy) and 'some'
    (sharing fewer records). Without the log's key only fingerprints and plain (older) sketches compare."""
    return _related(entries, fingerprint, sketch.keyed(key), key)


def entry_of(entries: list, output_sha256: str) -> dict | None:
    for e in entries:
        if e.get("output_sha256") == output_sha256:
            return e
    return None


def composable(entries: list, entry: dict, key: bytes | None = None) -> list:
    """The releases whose budgets compose with `entry`'s for some record: itself, every release of the
    same data, and every release that shares any sampled record with it."""
    found = _related([e for e in entries if e is not entry], entry["fingerprint"], entry_sketch(entry, key), key)
    return [entry, *found["same"], *found["most"], *found["some"]]


def new_entry(fingerprint: Fingerprint, key: bytes, **fields) -> dict:
    return {"fingerprint": fingerprint.hexdigest(), "sketch": fingerprint.sketch.keyed(key).to_json(), **fields}


def append(path, entry: dict) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
