"""The data owner's local release log (JSONL, never released): which data was embedded, at what cost.

Each entry holds the dataset's fingerprint and a sketch of sampled record tags (embed/fingerprint.py),
both under a secret key kept beside the log (`<log>.key`, owner-only), the sketch sealed (fixed size,
encrypted), the key's id, the output's SHA-256 and the guarantee. Beside them, `<log>.head` lists (under a MAC with
the key) the releases the log held at its last entry, so a log lost, moved or rolled back to an older copy is
refused instead of starting over silently. Without the key the log (shown to an
auditor, say) cannot be used to test whether an image was in the data, nor tells any release's n or
which records two releases share. Earlier releases that are the same multiset of records, or share records with it,
are found from these; their budgets compose. Log, key and a new folder are created owner-only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
import tempfile
from pathlib import Path

from mepf.artifacts.errors import MepfError
from mepf.artifacts.staging import fsync_folder

from .fingerprint import REPEAT_SHARE, Fingerprint, Sketch, key_id, keyed_digest, open_sketch, seal_sketch
from .options import RELEASE_LOG, default_path


def default_log_path() -> Path:
    return default_path(RELEASE_LOG)


def read_log(path) -> list:
    path = Path(path)
    try:  # non-blocking: a FIFO put in the log's place is refused, not waited on
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise MepfError(f"release log {path} cannot be read ({type(e).__name__}); pass a log file you own with "
                        "--release-log") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MepfError(f"release log {path} is not a file; pass a log file you own with --release-log")
    with os.fdopen(fd, "rb") as f:
        try:
            lines = f.read().decode().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise MepfError(f"release log {path} cannot be read as a log ({type(e).__name__}); check that "
                            "--release-log names the log (not a release or other file), else restore it from a "
                            "backup") from None
    entries = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError, an integer too long to read, deep nesting
                entry = None
            if not isinstance(entry, dict):
                raise MepfError(f"release log {path} line {i} is corrupt; repair that line (a part-written last "
                                "line left by a crash can be deleted); do not move the log away: with it go the "
                                "releases that a repeat of this data must compose with")
            entries.append(entry)
    return entries


def key_path(log_path) -> Path:
    return Path(str(log_path) + ".key")


def head_path(log_path) -> Path:
    return Path(str(log_path) + ".head")


_HEAD_DOMAIN = b"mepf release-log head v1\0"


def _head_mac(key: bytes, releases: list) -> str:
    return hmac.new(key, _HEAD_DOMAIN + json.dumps(sorted(releases)).encode(), hashlib.sha256).hexdigest()


def lost_releases(log_path, entries: list | None, key: bytes | None) -> list | None:
    """The releases (output SHA-256s) that the head recorded and the log no longer holds; None where the log has
    no head (logs from before heads) or no key to check it with. MepfError for a head that is not this log's.
    `entries` None: the log is read after the head (which is written after its entries, so a release logged
    meanwhile is never taken for a lost one); pass them only as read under the log's lock."""
    path = head_path(log_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):  # no head (nor, for the latter, a folder for the log)
        return None
    except OSError as e:
        raise MepfError(f"release log head {path} cannot be read ({type(e).__name__}); make it a file of yours, "
                        "as mepf embed wrote it") from None
    try:
        head = json.loads(os.read(fd, 1 << 24).decode()) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (OSError, ValueError, RecursionError):
        head = None
    finally:
        os.close(fd)
    releases = head.get("releases") if isinstance(head, dict) else None
    if not isinstance(releases, list) or not all(isinstance(r, str) for r in releases):
        raise MepfError(f"release log head {path} is damaged; restore it with its log from a backup")
    if key is None:
        return None
    if not hmac.compare_digest(str(head.get("mac")), _head_mac(key, releases)):
        raise MepfError(f"release log head {path} does not belong to this log's key (damaged, or from another "
                        "log); restore the log, its key and its head together from a backup")
    held = {e.get("output_sha256") for e in (read_log(log_path) if entries is None else entries)}
    return [r for r in releases if r not in held]


def check_not_lost(log_path, entries: list, key: bytes | None) -> None:
    """MepfError where the log no longer holds every release its head recorded (deleted, moved away, an
    older copy restored): a run on it would not see those releases, and a repeat would pass uncounted."""
    lost = lost_releases(log_path, entries, key)
    if lost:
        raise MepfError(f"release log {log_path} no longer holds {len(lost)} release(s) that it held before (its head "
                        f"{head_path(log_path)} records them: was the log deleted, moved, or an older copy "
                        "restored?); nothing was released; restore the log from a backup, or start a new log with "
                        "--release-log NEW (budgets in the old log then no longer compose with new releases)")


def lost_note(log_path, key: bytes | None) -> str | None:
    """For readers of the log (releases, audit): a note where its head shows releases it no longer holds."""
    try:
        lost = lost_releases(log_path, None, key)
    except MepfError as e:
        return str(e)
    return (f"the log no longer holds {len(lost)} release(s) that its head {head_path(log_path)} records, and "
            "composed totals leave them out; restore the log from a backup") if lost else None


def record_head(log_path, key: bytes) -> None:
    """After an entry is appended, under the log's lock: the head lists every release the log holds now."""
    path = head_path(log_path)
    releases = sorted({e["output_sha256"] for e in read_log(log_path) if isinstance(e.get("output_sha256"), str)})
    text = json.dumps({"releases": releases, "mac": _head_mac(key, releases)}) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_folder(path.parent)


def read_key(log_path) -> bytes | None:
    """The log's key, or None where it has none (yet). Reading changes nothing; `prepare` narrows its mode."""
    path = key_path(log_path)
    try:
        if not path.is_file():
            return None
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise MepfError(f"release log key {path} cannot be read ({type(e).__name__}); fix its permissions") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise MepfError(f"release log key {path} is damaged; restore it from a backup, or start a new log with "
                        "--release-log NEW (budgets in the old log then no longer compose with new releases)")
    return key


def _keyed_entries(entries: list) -> list:
    return [e for e in entries if e.get("key_id")]


def check_key(log_path, entries: list, key: bytes | None) -> str | None:
    """Why the log's keyed entries cannot be matched record by record with this key, or None."""
    keyed = _keyed_entries(entries)
    if not keyed:
        return None
    if key is None:
        return f"release log key {key_path(log_path)} is missing"
    if any(e["key_id"] != key_id(key) for e in keyed):
        return f"release log key {key_path(log_path)} does not belong to this log"
    return None


def _exposed(log_path) -> list:
    """The log and key files that others could read (group or other bits set)."""
    found = []
    for p in (Path(log_path), key_path(log_path), head_path(log_path)):
        try:
            if p.is_file() and p.stat().st_mode & 0o077:
                found.append(p)
        except OSError:
            pass  # an unreadable file is prepare's error to give
    return found


def prepare(log_path, entries: list) -> tuple:
    """Before any record is read: the log can be appended to and has its key (created on first use), so a
    release is never written without its entry. Returns the key, the files it narrowed to 0600 (whoever
    copied both log and key before can test images for membership in earlier releases), and whether the key
    was created now (the owner is told where both are, and to back them up)."""
    path = Path(log_path)
    key = read_key(path)
    problem = check_key(path, entries, key)
    if key is None and head_path(path).exists():
        problem = f"release log key {key_path(path)} is missing"
    if problem:
        raise MepfError(f"{problem}, so earlier releases cannot be matched; restore the key from a backup, or start "
                        "a new log with --release-log NEW (budgets in the old log then no longer compose with new "
                        "releases)")
    check_not_lost(path, None, key)  # before the log is created at its path; again under the lock below
    narrowed = _exposed(path)  # e.g. restored from a backup with the umask's mode
    for p in narrowed:
        try:
            os.chmod(p, 0o600)
        except OSError as e:
            what = {key_path(path): "release log key", head_path(path): "release log head"}.get(p, "release log")
            raise MepfError(f"{what} {p} is readable by others and its mode cannot be narrowed "
                            f"({type(e).__name__}); make it yours and chmod 600 it") from None
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MepfError(f"release log {path} is not a file; pass a log file you own with --release-log")
        finally:
            os.close(fd)
    except OSError as e:
        raise MepfError(f"release log {path} cannot be written ({type(e).__name__}); pass a writable "
                        "--release-log") from None
    created = False
    with locked(path):  # tried before the pass; two first runs on one log: the second takes the first's key
        check_not_lost(path, None, key)  # under the lock: another embed's entry and head are both in, or neither
        key = read_key(path) if key is None else key
        if key is None:
            key, created = secrets.token_bytes(32), True
            try:
                _write_key(key_path(path), key)
            except OSError as e:
                raise MepfError(f"release log key {key_path(path)} cannot be written ({type(e).__name__}); pass a "
                                "writable --release-log") from None
    return key, [str(p) for p in narrowed], created


def _write_key(path: Path, key: bytes) -> None:
    """Whole or absent to any reader, and never in place of anything at `path` (a dangling link to a key on
    an unmounted disk, say); called under the log's lock after finding no key."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise MepfError(f"release log key {path} is taken by something that is not a key (a dangling link?); "
                            "restore the key it points to, or move it away") from None
        except OSError:  # a filesystem without hard links; no key was found under the lock
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_folder(path.parent)  # the key's name durable before any entry made under it


class Lock:
    """The open, locked log: `append(..., lock=)` writes through it, so the entry lands in the file checked."""

    def __init__(self, fd: int, path):
        self.fd, self.path = fd, path


@contextlib.contextmanager
def locked(log_path):
    """Holds an exclusive lock on the log (mepf processes only): a release checks the log for repeats and
    appends its entry under it, so two embeds of the same data on one log cannot both pass the check."""
    for _ in range(10):
        try:  # opened for writing: NFS takes flock as a POSIX lock, which needs it
            fd = os.open(log_path, os.O_RDWR | os.O_APPEND | os.O_NONBLOCK)
        except OSError as e:
            raise MepfError(f"release log {log_path} cannot be opened ({type(e).__name__}); nothing was released; "
                            "restore it and run again") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MepfError(f"release log {log_path} is not a file; nothing was released; restore it and run again")
            _lock(fd, log_path)
            if _same_file(fd, log_path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the log was replaced (renamed over) before the lock was taken: lock the one at its path
    else:
        raise MepfError(f"release log {log_path} keeps being replaced; nothing was released; stop whatever "
                        "rewrites it and run again")
    try:
        yield Lock(fd, log_path)
    finally:
        os.close(fd)


def _lock(fd: int, log_path) -> None:
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another mepf embed to finish writing to release log {log_path}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        raise MepfError(f"release log {log_path} cannot be locked ({type(e).__name__}: its filesystem does not "
                        "support flock); put the log on a local disk with --release-log") from None


def _same_file(fd: int, log_path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(log_path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _entry_sketch(entry: dict, key: bytes | None) -> Sketch | None:
    """The entry's sketch: sealed (opened with the log's key; None without it), or the open form of entries
    written before sealing. None for an entry from before sketches, or a damaged one (its fingerprint still
    compares)."""
    d = entry.get("sketch")
    if isinstance(d, dict) and "sealed" in d:
        return open_sketch(key, d)
    try:
        return Sketch.from_json(d)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _entry_digest(entry: dict, key: bytes | None):
    """The entry's fingerprint in keyed form where the key allows (entries from before keys are plain)."""
    f = entry.get("fingerprint")
    if not isinstance(f, str):
        return None
    return keyed_digest(key, f) if key is not None and not f.startswith("k1:") else f


def open_keyed(entries: list) -> list:
    """Entries of logs from before sealing: their sample is open, tags under the log's own key (kind k1)."""
    return [e for e in entries if isinstance(e.get("sketch"), dict) and e["sketch"].get("keyed") is True]


def _linked(a: dict, b: dict) -> bool:
    """Whether one entry recorded, when it was released, that it shares records with the other."""
    def names(e, other):
        links = e.get("composes_with")
        return isinstance(links, list) and other.get("output_sha256") in links
    return names(a, b) or names(b, a)


def _related(entries: list, digests: set, sketches: list, key: bytes | None, links_of: dict | None = None,
             tag_filter=None) -> dict:
    out = {"same": [], "most": [], "some": []}
    empty = Fingerprint().hexdigest()  # releases of no records repeat no one's data, nor each other
    digests = digests - {empty} - ({keyed_digest(key, empty)} if key is not None else set())
    for e in entries:
        if {_entry_digest(e, None), _entry_digest(e, key)} & digests:
            out["same"].append(e)
            continue
        theirs = _entry_sketch(e, key)
        best = max((s.overlap(theirs) for s in sketches), key=lambda o: o[0],
                   default=(0, 0.0, 0.0)) if theirs is not None else (0, 0.0, 0.0)
        within = 0.0  # the share of their sampled records found among all of this run's (its tag filter)
        if tag_filter is not None and theirs is not None and theirs.kind == "k3":
            within = tag_filter.share_within(theirs.hashes)
        if max(best[1], best[2], within) >= REPEAT_SHARE:
            out["most"].append(e)
        elif best[0] or within:
            out["some"].append(e)
        elif links_of is not None and _linked(links_of, e):
            out["some"].append(e)
    return out


def related(entries: list, fingerprint: Fingerprint, key: bytes | None = None) -> dict:
    """Earlier releases of this data: 'same' (the same multiset of records), 'most' (sharing at least
    REPEAT_SHARE of either dataset's sampled records: a subset, superset or relabelled copy) and 'some'
    (sharing fewer records). Keyed entries match record by record only with the log's key. A release of no records
    (every one dropped under --bad-records zero) repeats no one's data: it is related to nothing (_related)."""
    digests = {fingerprint.hexdigest()} | ({keyed_digest(key, fingerprint.hexdigest())} if key is not None else set())
    sketches = [s for s in (fingerprint.sketch, fingerprint.tag_sketch, fingerprint.legacy_sketch) if s is not None]
    return _related(entries, digests, sketches, key, tag_filter=getattr(fingerprint, "tag_filter", None))


def entry_of(entries: list, output_sha256: str) -> dict | None:
    for e in entries:
        if e.get("output_sha256") == output_sha256:
            return e
    return None


def composable(entries: list, entry: dict, key: bytes | None = None) -> list:
    """The releases whose budgets compose with `entry`'s for some record: itself, every release of the
    same data, every release that shares a sampled record with it (sealed samples: with the log's key only),
    and every release either entry recorded as sharing records when it was made (entries from before keys
    share records with keyed ones only through their fingerprint)."""
    mine = _entry_sketch(entry, key)
    digests = {_entry_digest(entry, None), _entry_digest(entry, key)} - {None}
    found = _related([e for e in entries if e is not entry], digests, [mine] if mine else [], key, links_of=entry)
    return [entry, *found["same"], *found["most"], *found["some"]]


def mixed_note(entries: list, key: bytes | None = None) -> str | None:
    """A note where some entries cannot be compared record by record: entries from before keys beside keyed
    ones, or sealed entries read without the log's key."""
    plain = [e for e in entries if not e.get("key_id")]
    if plain and _keyed_entries(entries):
        return (f"{len(plain)} release-log entr{'y' if len(plain) == 1 else 'ies'} from before keyed logs compare with "
                "later releases by their whole-dataset fingerprint only (a shared subset of records is not seen)")
    sealed = [e for e in entries if isinstance(e.get("sketch"), dict) and "sealed" in e["sketch"]]
    if sealed and (key is None or any(_entry_sketch(e, key) is None for e in sealed)):
        return ("without the log's key, releases are matched by whole dataset and by the links each entry recorded "
                "when it was made, not record by record; pass the log with its key beside it to check fully")
    return None


def files_key(key: bytes, identity: str) -> str:
    """A source's `files_identity` as the log stores it (field `files`): under the log's key, so that whoever reads
    the log without it cannot test a guess of the files."""
    return "f1:" + hmac.new(key, b"mepf-files-identity-v1|" + identity.encode(), hashlib.sha256).hexdigest()


def same_files(entries: list, key: bytes, identity: str) -> list:
    """The entries released from these very files, unchanged and read the same way: found before any record is
    read, they are the data's repeats that the pass's fingerprint would find (a copy, a re-encoding or a changed
    file is left to the fingerprint). An entry's `files` can only add such a refusal, never take one away."""
    mine = files_key(key, identity).encode()
    return [e for e in entries if isinstance(e.get("files"), str)
            and hmac.compare_digest(e["files"].encode("utf-8", "surrogatepass"), mine)]


def new_entry(fingerprint: Fingerprint, key: bytes, composes_with=(), **fields) -> dict:
    """A log entry: nothing in it tells, without the key, how many records the data had or which records two
    releases share; `composes_with` names (by output SHA-256) the earlier releases found to share records."""
    return {"fingerprint": keyed_digest(key, fingerprint.hexdigest()),
            "sketch": seal_sketch(key, fingerprint.tag_sketch), "key_id": key_id(key),
            "composes_with": sorted({str(c) for c in composes_with if c}), **fields}


def append(path, entry: dict, lock: Lock | None = None) -> None:
    """One whole line or nothing: a write that fails partway (disk full) is cut back off the log. With `lock`
    the line goes into the locked file, and if that is no longer the file at `path` (renamed over during
    the run, by an editor's save say) MepfError is raised: the caller must then not release."""
    path = Path(path)
    data = (json.dumps(entry, sort_keys=True) + "\n").encode()
    if lock is None:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    else:
        fd = os.dup(lock.fd)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a hand-edited last line without its newline
            data = b"\n" + data
        written = 0
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
            if lock is not None and not _same_file(fd, path):
                raise MepfError(f"release log {path} was replaced while this run held it (saved by an editor?), so "
                                "nothing was released; do not edit the log while an embed runs, and run again")
        except BaseException:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size == size + written:  # nobody else wrote after us: cut back our part
                    os.ftruncate(fd, size)  # (from a replaced log too: a backup of it shows no phantom release)
                    os.fsync(fd)
            raise
    finally:
        os.close(fd)
