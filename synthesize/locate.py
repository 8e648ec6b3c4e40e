"""Find the released file a run or generator was trained from by its SHA-256, wherever it has moved: the
file the user names, the path the run recorded, or a release beside the run. Any file with that SHA-256 is
the same release; any other is refused."""
from __future__ import annotations

from pathlib import Path

from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import file_sha256

#: at most this many .h5 files of each folder searched are hashed (those of the release's size, where known)
MAX_CANDIDATES = 32


def _sha(path: Path) -> str | None:
    try:
        return file_sha256(path) if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def candidates(near: Path, recorded: str | None, size: int | None = None) -> list:
    """The recorded path first, then the .h5 files in `near` and in its parent folder (of `size` bytes, where
    the run recorded it: no other file is read)."""
    out = [Path(recorded)] if recorded else []
    for folder in (near, near.parent):
        try:
            found = sorted(p for p in folder.glob("*.h5")
                           if p.is_file() and (size is None or p.stat().st_size == size))
        except OSError:
            continue
        out += found[:MAX_CANDIDATES]
    seen, unique = set(), []
    for p in out:
        key = str(p.resolve()) if p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def locate_release(sha256: str, near: Path, recorded: str | None = None, given: str | None = None,
                   required: bool = True, what: str = "this run", size: int | None = None) -> Path | None:
    """The path of the release whose SHA-256 is `sha256`: `given` (refused unless it matches), else the first
    of the recorded path and the .h5 files beside `near` that matches; None (or a MepfError if `required`)
    where none does."""
    if given is not None:
        got = _sha(Path(given))
        if got is None:
            raise MepfError(f"{given} is not a readable file; pass the released .h5 file")
        if got != sha256:
            raise MepfError(f"{given} is not the release {what} {'were' if what.endswith('samples') else 'was'} "
                            f"trained from (its SHA-256 starts "
                            f"{got[:12]}, the run's {sha256[:12]}); pass that release")
        return Path(given)
    for p in candidates(near, recorded, size):
        if _sha(p) == sha256:
            return p
    if required:
        where = f" (recorded at {recorded})" if recorded else ""
        raise MepfError(f"the release {what} was trained from{where} is not there, nor beside it; pass it by name "
                        f"(any file with SHA-256 {sha256[:12]}... is accepted)")
    return None
