"""The data owner's local release log (JSONL, never released): which data was embedded, at what cost.

Each entry holds the dataset's fingerprint and its sketch of record hashes (embed/fingerprint.py), the
output's SHA-256 and the guarantee. Earlier releases that are the same multiset of records, or share
records with it, are found from these; their budgets compose.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mepf.artifacts.errors import MepfError

from .fingerprint import REPEAT_SHARE, Fingerprint, Sketch


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


def _overlap(entry: dict, sketch: Sketch) -> tuple:
    try:
        other = Sketch.from_json(entry["sketch"])
    except (KeyError, TypeError, ValueError):  # an entry from before sketches, or damaged: its fingerprint compares
        return 0, 0.0, 0.0
    return sketch.overlap(other)


def related(entries: list, fingerprint: str, sketch: Sketch) -> dict:
    """Earlier releases of this data: 'same' (the same multiset of records), 'most' (sharing at least
    REPEAT_SHARE of either dataset's sampled records: a subset, superset or relabelled copy) and 'some'
    (sharing fewer records)."""
    out = {"same": [], "most": [], "some": []}
    for e in entries:
        if e.get("fingerprint") == fingerprint:
            out["same"].append(e)
            continue
        shared, mine, theirs = _overlap(e, sketch)
        if shared:
            out["most" if max(mine, theirs) >= REPEAT_SHARE else "some"].append(e)
    return out


def entry_of(entries: list, output_sha256: str) -> dict | None:
    for e in entries:
        if e.get("output_sha256") == output_sha256:
            return e
    return None


def composable(entries: list, entry: dict) -> list:
    """The releases whose budgets compose with `entry`'s for some record: itself, every release of the
    same data, and every release that shares any sampled record with it."""
    try:
        sketch = Sketch.from_json(entry["sketch"])
    except (KeyError, TypeError, ValueError):
        sketch = Sketch()
    found = related([e for e in entries if e is not entry], entry["fingerprint"], sketch)
    return [entry, *found["same"], *found["most"], *found["some"]]


def new_entry(fingerprint: Fingerprint, **fields) -> dict:
    return {"fingerprint": fingerprint.hexdigest(), "sketch": fingerprint.sketch.to_json(), **fields}


def append(path, entry: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
