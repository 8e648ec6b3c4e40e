"""Find the released file a run or generator was trained from by its SHA-256, wherever it has moved: the
file the user names, the path the run recorded, or a release beside the run. Any file with that SHA-256 is
the same release; any other is refused."""
from __future__ import annotations

from pathlib import Path

from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import fd_sha256, file_sha256
from mepf.artifacts.plain_file import memory_bytes, open_plain_file

#: at most this many .h5 files of each folder searched are hashed (those of the release's size, where known)
MAX_CANDIDATES = 32


#: what every release starts with (mepf writes no user block)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _search_budget() -> list:
    """The bytes one search may hash in all, as a one-item list that _sha spends: what the release reader takes of
    one file (half the memory)."""
    memory = memory_bytes()
    return [memory // 2 if memory else 1 << 40]


def _sha(path: Path, size: int | None = None, budget: list | None = None) -> str | None:
    """The SHA-256 of a plain file that could be the release: an HDF5 file of `size` bytes where the run recorded
    it, of no more than is left of `budget` (a fresh _search_budget by default: never more than the release reader
    takes), read only that far. A run folder may come from someone else and name any file on the machine (reviews
    39, 40: a 1 TiB sparse file named in options.json kept evaluate hashing for as long as it liked; 65 files of the
    recorded size, each within the bound, would too)."""
    import os

    if not path.is_file() or path.is_symlink():
        return None
    problem, f = open_plain_file(path)
    if problem:
        return None
    budget = budget if budget is not None else _search_budget()
    with f:
        try:
            n = os.fstat(f.fileno()).st_size
            if (size is not None and n != size) or n > budget[0]:
                return None
            if os.pread(f.fileno(), len(HDF5_SIGNATURE), 0) != HDF5_SIGNATURE:
                return None
            budget[0] -= n
            return fd_sha256(f.fileno(), limit=n)  # one that grows while it is read is not a release to take
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
        try:  # the user's own choice: hashed whatever its size (loading it checks that)
            got = file_sha256(given) if Path(given).is_file() and not Path(given).is_symlink() else None
        except OSError:
            got = None
        if got is None:
            raise MepfError(f"{given} is not a readable file; pass the released .h5 file")
        if got != sha256:
            raise MepfError(f"{given} is not the release {what} {'were' if what.endswith('samples') else 'was'} "
                            f"trained from (its SHA-256 starts "
                            f"{got[:12]}, the run's {sha256[:12]}); pass that release")
        return Path(given)
    budget = _search_budget()
    for p in candidates(near, recorded, size):
        if _sha(p, size, budget) == sha256:
            return p
    if required:
        where = f" (recorded at {recorded})" if recorded else ""
        raise MepfError(f"the release {what} was trained from{where} is not there, nor beside it; pass it by name "
                        f"(any file with SHA-256 {sha256[:12]}... is accepted)")
    return None
