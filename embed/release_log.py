"""The data owner's local release log (JSONL, never released): which data was embedded, at what cost."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mepf.artifacts.errors import MepfError


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


def releases_of(path, fingerprint: str) -> list:
    return [e for e in read_log(path) if e.get("fingerprint") == fingerprint]


def append(path, entry: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
