"""Writing files atomically: a release is staged under a temporary name (owner-only, locked, fsynced) and renamed
into place, temporaries a killed writer left are swept, and every other file mepf writes (generators, snapshots,
grids, samples, reports) goes through `atomic_path`. Torch-free."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np

from .errors import MepfError, storage_error
from .format import ARRAY_NAMES, CHECKSUM_COVERS, DESCRIPTION, FORMAT_NAME, SCHEMA_VERSION, content_checksum, fd_sha256
from .ledger import canonical_json


def _too_long(path: Path) -> MepfError:
    return MepfError(f"output path too long: {str(path)[:60]}... (a folder or file name may have at most 255 bytes, a "
                     "whole path 4,096); choose a shorter --out")


def create_folder_of(path: Path) -> None:
    """Create the folder an output goes in, and its parents, where missing; one line where it cannot be."""
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise _too_long(path) from None
            raise MepfError(f"output folder {path.parent} cannot be created ({type(e).__name__}); choose another "
                            "--out") from None


def check_output_path(path, overwrite: bool, need: int = 0) -> Path:
    """Create the output's folder (and its parents) where missing; refuse an existing output without overwrite, a
    folder no file can be made in, or one with less than `need` bytes free, before any work (review 47 M3: embed
    read the whole dataset first)."""
    path = Path(path)
    create_folder_of(path)
    try:
        os.lstat(path)  # a name too long is the user's, said before any work (under torchrun, on every rank)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise _too_long(path) from None
    if path.is_dir():
        raise MepfError(f"output {path} is a folder; give a file name such as {path}/release.h5")
    if path.exists() and not overwrite:
        raise MepfError(f"output {path} already exists; pass --overwrite to replace it or choose another --out")
    longest = _longest_name(path.parent)
    if len(os.fsencode(path.name)) + TEMP_EXTRA > longest:
        raise MepfError(f"output name {path.name[:40]}... is too long for this folder (at most "
                        f"{longest - TEMP_EXTRA} bytes, to leave room for its temporary name); choose a shorter --out")
    _check_room(path.parent, 2 * need if need and _copied(path.parent) else need)
    return path


def _copied(folder: Path) -> bool:
    """Whether a file written here is copied into place (unnamed files that cannot be linked in: EXDEV), so that
    it takes twice its size until it is in place (review 49)."""
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return not _links(folder)


def _check_room(folder: Path, need: int) -> None:
    """A file can be made in `folder` (tried: permissions, a read-only mount, no inode left) and its filesystem has
    `need` bytes free for this user."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mepf-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MepfError(f"no file can be written in {folder} ({storage_error(e)}); fix its permissions, free space "
                        "or choose another --out") from None
    try:
        st = os.statvfs(folder)
    except OSError:  # a filesystem that does not say: the write will tell
        return
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise MepfError(f"{folder} has {free / 1e6:,.1f} MB free and the output needs about {need / 1e6:,.1f} MB; "
                        "free space or choose another --out") from None


def _longest_name(folder) -> int:
    """The longest file name, in bytes, that `folder` takes (255 where the filesystem does not say)."""
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
    return longest if longest > 0 else 255  # indeterminate on some filesystems


def fsync_folder(folder) -> None:
    """Make a rename or new name in `folder` durable, where the filesystem supports it (best effort: the
    file is already in place)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: room a temporary of atomic_path adds to a name: ".", ".tmp-", a PID, "-", 8 hex digits, a suffix
_ATOMIC_EXTRA = 1 + 5 + 10 + 1 + 8 + 8


def _atomic_temp_name(path: Path, suffix: str) -> tuple:
    """(the temporary's name, a pattern matching any temporary of `path`): the output's name, cut where a long
    one would not leave room, so that any name the folder takes can be written."""
    longest = _longest_name(path.parent)
    stem = os.fsencode(path.name)[:max(1, longest - _ATOMIC_EXTRA - len(os.fsencode(suffix)))]
    stem = stem.decode(errors="ignore") or "x"
    pattern = re.compile(re.escape(f".{stem}.tmp-") + r"([0-9]{1,10})-[0-9a-f]{8}" + re.escape(suffix) + r"(?:\.old)?")
    return f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}", pattern


def _sweep_dead_temporaries(path: Path, pattern) -> None:
    """Remove temporaries of `path` whose writer process is gone (a killed `sample` may leave gigabytes)."""
    try:
        found = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for p in found:
        pid = int(pattern.fullmatch(p.name).group(1))
        try:
            os.kill(pid, 0)
            continue  # its writer still runs (on this host)
        except ProcessLookupError:
            pass
        except OSError:
            continue  # someone else's process
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary name beside `path` to write to (a file, or a folder); on a clean exit it replaces
    `path`, the file's bytes and the rename made durable; on an error nothing changes at `path` and the temporary
    is removed. A folder at `path` is moved aside before the new one takes its name, and removed after.
    `suffix` ends the temporary's name, for writers that pick a format by it (np.savez: .npz, PIL: .png).
    Temporaries left by a killed writer of the same output are removed first."""
    path = Path(path)
    name, pattern = _atomic_temp_name(path, suffix)
    _sweep_dead_temporaries(path, pattern)
    tmp = path.with_name(name)
    try:
        yield tmp
        old = None
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        elif tmp.is_dir() and path.is_dir() and not path.is_symlink():
            old = path.with_name(name + ".old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old, path)
            raise
        fsync_folder(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def write_text_atomic(path, text: str) -> None:
    """`path` holds `text` (UTF-8) or what it held before, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


TEMP_EXTRA = len(".") + len(".tmp-") + 10 + len("-") + 16  # a temporary's name: .NAME.tmp-PID-RANDOM


def _temp_name(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}"


def sweep_stale_temporaries(path, recover=None) -> list:
    """Deal with temporaries of `path` left by a writer that was killed (SIGKILL, power loss): each is a noisy
    release (whole or in part) logged but never put in place, which must not lie around to be copied out. A
    live writer holds a lock on its temporary (on any host, where the filesystem's locks are shared), so a file
    we can lock is stale.
    If `recover(fd)` says it is the release logged for `path`, our own, and nothing is at `path`, it is put in
    place (the killed run had spent its budget on it); otherwise it is removed. Returns (what, line) for each
    file found, what being "placed", "removed", "left", or "logged-left" (a logged release it could not place)."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"[0-9]{1,10}-[0-9a-f]{16}")
    try:
        found = sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:  # a folder we may write to but not list
        return []
    done = []
    for p in found:
        try:
            if not stat.S_ISREG(os.lstat(p).st_mode):
                done.append(_not_a_file(p))
                continue
            fd = os.open(p, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError as e:
            done.append(("left", f"left {p} ({type(e).__name__}): it may be a release file left by a killed embed; "
                                 "check it and remove it yourself"))
            continue
        try:
            result = _sweep_one(p, fd, path, recover)
            if result:
                done.append(result)
        except OSError as e:
            done.append(("left", f"left {p} ({type(e).__name__}): a release file left by a killed embed; remove it "
                                 "yourself"))
        finally:
            os.close(fd)
    return done


def _not_a_file(p: Path) -> tuple:
    return "left", f"left {p}: named like a temporary release file but not a file; remove it yourself"


def _still_named(p: Path, st) -> bool:
    try:
        return st.st_nlink > 0 and os.path.samestat(os.lstat(p), st)
    except OSError:
        return False


def _sweep_one(p: Path, fd: int, path: Path, recover) -> tuple | None:
    """What to do with one temporary, opened as `fd`; None where its writer finished with it meanwhile."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return _not_a_file(p)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "left", f"left {p}: in use by another process (an embed writing it, or a reader); if none is, run again"
    except OSError as e:
        return "left", (f"left {p}: its filesystem cannot lock it ({type(e).__name__}), so it may be another embed's "
                        "file in progress; if no embed is running, remove it yourself")
    st = os.fstat(fd)
    if not _still_named(p, st):
        return None  # its writer renamed or removed it before we locked it
    if st.st_size == 0:
        return "left", f"left {p}: empty (a writer about to lock it, or one killed before it wrote anything)"
    ours = st.st_uid == os.geteuid() and st.st_nlink == 1
    if ours and recover is not None and not os.path.lexists(path) and recover(fd):
        logged = f"it is the release logged for {path} by an embed killed before putting it in place"
        try:
            os.link(p, path)
        except FileExistsError:
            return "logged-left", f"left {p}: {logged}, but something is now at {path}; see to both yourself"
        except OSError as e:
            return "logged-left", f"left {p} ({type(e).__name__}): {logged}; rename it to {path} yourself"
        if not _still_named(path, os.fstat(fd)):  # p was swapped for another file meanwhile: leave both
            return "logged-left", f"left {p}: {logged}, but what was linked to {path} is not that file; check both"
        os.unlink(p)
        fsync_folder(path.parent)
        return "placed", f"put {p} in place as {path}: the release an embed logged before it was killed"
    os.unlink(p)
    return "removed", (f"removed {p}: a release file left by an embed that was killed before putting it in place "
                       "(never released; if that run logged it, its entry overstates the spend)")


@contextlib.contextmanager
def staged_release(path, arrays: dict, class_names, feature_spec: dict, data_spec: dict, ledger: dict,
                   overwrite: bool = False):
    """Write the file whole (fsynced) into an unnamed file in the output's folder (O_TMPFILE) and yield its
    SHA-256; on a clean exit from the block give it a temporary name and rename it into place. Until the block
    ends (embed logs the release there) no noisy byte has a name: a kill leaves nothing, while a full disk or a
    folder that cannot be written fails before the entry. Where the kernel will not link an unnamed file into
    the folder (EXDEV here), the temporary is created and its space reserved (zeros) before the block and the
    file copied into it after; where the filesystem has no unnamed files (some NFS), the file is written under
    its temporary name before the block (a kill then leaves it, unlogged, for the next embed's sweep). An
    exception leaves nothing at `path`."""
    path = check_output_path(path, overwrite)
    tmp, copy = path.with_name(_temp_name(path)), None
    try:
        fd, named = os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o600), False
    except (OSError, AttributeError):  # no O_TMPFILE here
        fd, named = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), True  # owner-only until it is released
    try:
        _lock(fd)  # held until it is renamed, so a later run's sweep leaves it alone
        _write_release(fd, arrays, class_names, feature_spec, data_spec, ledger)
        os.fsync(fd)
        if not named and not _links(path.parent):
            copy = _reserved(tmp, os.fstat(fd).st_size)
        yield fd_sha256(fd)
        if ledger.get("private") is True:  # a noisy release is for sharing: the umask's mode; a baseline stays 0600
            umask = os.umask(0o077)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        if copy is not None:
            _copy(fd, copy)
        elif not named:
            _link_unnamed(fd, tmp)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.close(fd)
        if copy is not None:
            os.close(copy)


def _lock(fd: int) -> None:
    try:  # blocking, as a sweep may hold it for a moment before the file has data
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass  # a filesystem without locks: no sweep can lock it either


def _links(folder: Path) -> bool:
    """Whether an unnamed file can be linked into `folder` (linkat through /proc: refused with EXDEV by some
    kernels and filesystems, or without /proc); tried on an empty one."""
    probe = folder / _temp_name(folder / "probe")
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        return False
    try:
        _link_unnamed(fd, probe)
        probe.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _link_unnamed(fd: int, name: Path) -> None:
    """Give the unnamed (O_TMPFILE) file `fd` the name `name`: linkat through /proc."""
    os.link(f"/proc/self/fd/{fd}", name, follow_symlinks=True)


def _reserved(tmp: Path, size: int) -> int:
    """The temporary `tmp`, created locked with `size` bytes of zeros allocated, before the entry: a full disk
    fails here; the release's bytes are copied in after the entry."""
    out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _lock(out)
        os.posix_fallocate(out, 0, size)
        os.fsync(out)
    except BaseException:
        os.close(out)
        tmp.unlink(missing_ok=True)
        raise
    return out


def _copy(fd: int, out: int) -> None:
    """The unnamed file's bytes into the reserved temporary `out`, with its mode, fsynced."""
    os.fchmod(out, stat.S_IMODE(os.fstat(fd).st_mode))
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        view, at = memoryview(chunk), offset
        while view:
            n = os.pwrite(out, view, at)
            view, at = view[n:], at + n
        offset += len(chunk)
    os.fsync(out)


def _write_release(fd: int, arrays: dict, class_names, feature_spec: dict, data_spec: dict, ledger: dict) -> None:
    """The release file's contents, written through `fd` (never a name another file could be renamed over)."""
    import h5py

    texts = {"feature_spec": canonical_json(feature_spec), "data_spec": canonical_json(data_spec),
             "ledger": canonical_json(ledger)}
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    checksum = content_checksum(arrays, class_names, texts["feature_spec"], texts["data_spec"], texts["ledger"])
    with os.fdopen(os.dup(fd), "r+b") as fo, h5py.File(fo, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["description"] = DESCRIPTION
        f.attrs["checksum_sha256"] = checksum
        f.attrs["checksum_covers"] = CHECKSUM_COVERS
        for name in ARRAY_NAMES:
            if name in arrays:
                f.create_dataset(name, data=arrays[name])
        f.create_dataset("class_names", data=np.array(list(class_names), dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        for name, text in texts.items():
            f.create_dataset(name, data=text, dtype=h5py.string_dtype("utf-8"))


def write_release(path, arrays: dict, class_names, feature_spec: dict, data_spec: dict, ledger: dict,
                  overwrite: bool = False) -> str:
    """Write the file atomically (temporary file, fsync, rename); return its SHA-256."""
    with staged_release(path, arrays, class_names, feature_spec, data_spec, ledger, overwrite) as sha:
        pass
    return sha
