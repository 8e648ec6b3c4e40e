"""The names of the files in a training run folder, in one place (stage 2 writes them, stage 3 reads them)."""
import re
import shlex

OPTIONS = "options.json"  # every resolved option, the release's SHA-256, eps and delta, versions
STATS = "stats.jsonl"  # one JSON record every --log-every steps
LOG = "log.txt"
GENERATOR = "generator.pt"  # the result: architecture, weights, the guarantee it inherits
SNAPSHOT_GLOB = "snapshot-*.pt"
SNAPSHOT_NAME = re.compile(r"snapshot-(\d{7})\.pt")  # what snapshot_name writes; any other file is not one
GRID_NAME = re.compile(r"grid-(\d{7})\.png")  # what grid_name writes


#: the most bytes read of a run's options.json and stats.jsonl (a run folder can come from someone else)
MAX_OPTIONS_BYTES, MAX_STATS_BYTES = 16 << 20, 512 << 20
#: the longest stats.jsonl line read (mepf writes a few hundred bytes)
MAX_STATS_LINE = 1 << 20


def shell_word(path) -> str:
    """`path` as one word of a command to paste: shlex.quote'd (a path with spaces works pasted as printed), or
    where it holds what a terminal must not be sent (control characters, bytes that are not UTF-8) bash's $'...'
    with each such byte as \\xHH: inert on screen and the very path when pasted (review 48 L1)."""
    import os

    text = str(path)
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(chr(c) if 32 <= c < 127 and chr(c) not in "\\'" else f"\\x{c:02x}"
                          for c in os.fsencode(text)) + "'"


def resume_command(run) -> str:
    """The command that continues `run`, ready to paste."""
    return f"mepf synthesize --resume {shell_word(run)}"


def hold(run) -> int:
    """This process's hold on the run folder while it trains it: an exclusive lock on the folder itself (a file in
    it would be replaced by a rename), released when the returned descriptor is closed or the process ends. A
    second mepf synthesize on the same folder (a requeued job while the first still runs, a command started twice)
    is refused: both wrote its log, stats, snapshots and options.json (review 47 M2). A filesystem without locks
    holds nothing (-1)."""
    import errno
    import fcntl
    import os

    from mepf.artifacts.errors import MepfError

    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MepfError(f"run folder {run} is being trained by another process (mepf synthesize or its --resume); "
                            "wait for it to end or stop it, then continue with: " + resume_command(run)) from None
        return -1
    return fd


def release(fd: int | None) -> None:
    """Let go of hold()'s lock."""
    import os

    if fd is not None and fd >= 0:
        os.close(fd)


def read_text(path, limit: int) -> str:
    """A run folder's text file, opened without blocking (a FIFO at its name is refused, not waited on) and read
    only when it is a plain file of at most `limit` bytes; anything else is one MepfError."""
    from mepf.artifacts.errors import MepfError
    from mepf.artifacts.plain_file import read_plain_file

    problem, data = read_plain_file(path, limit=limit)
    if problem:
        raise MepfError(f"{path} cannot be read ({problem}); the run folder is damaged")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MepfError(f"{path} is not UTF-8 text; the run folder is damaged") from None


def open_append(path):
    """`path` opened to append text, only where it is a plain file with no other name or absent (then created):
    never through a link, as a run folder from someone else may hold one planted to make this run write
    outside it (a shell's start-up file, say)."""
    import errno
    import os
    import stat

    from mepf.artifacts.errors import MepfError

    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        what = "a link" if e.errno == errno.ELOOP else type(e).__name__
        raise MepfError(f"{path} cannot be appended to ({what}); a run folder's files must be plain files: remove "
                        "it and run again") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise MepfError(f"{path} is not a plain file with one name; a run folder's files must be: remove it and run "
                        "again")
    return os.fdopen(fd, "a", encoding="utf-8")


def read_options(run) -> dict:
    """A run's options.json, refused in one line where it cannot say whose generator the folder holds: missing,
    unreadable, not a dict, without a release SHA-256 that is a string, or with changes that are not records."""
    import json
    from pathlib import Path

    from mepf.artifacts.errors import MepfError

    run = Path(run)
    if not (run / OPTIONS).is_file():
        raise MepfError(f"{run} is not a run folder (no {OPTIONS}); start one with `mepf synthesize FILE --out "
                        f"{shell_word(run)}`")
    try:
        saved = json.loads(read_text(run / OPTIONS, MAX_OPTIONS_BYTES))
    except (ValueError, RecursionError) as e:
        raise MepfError(f"{run / OPTIONS} cannot be read ({type(e).__name__}); the run folder is damaged") from None
    if not isinstance(saved, dict) or "release_sha256" not in saved:
        raise MepfError(f"{run / OPTIONS} is not a run's options; the run folder is damaged")
    if not isinstance(saved["release_sha256"], str):  # it says whose generator the folder holds (info, evaluate)
        kind = type(saved["release_sha256"]).__name__
        raise MepfError(f"{run / OPTIONS} holds release_sha256 of type {kind}, not a release's SHA-256; the run folder "
                        "is damaged")
    changes = saved.get("changes", [])
    if not (isinstance(changes, list) and all(isinstance(c, dict) and {"step", "option", "from", "to"} <= set(c)
                                              for c in changes)):
        raise MepfError(f"{run / OPTIONS} holds changes that are not a run's records of changed options; the run "
                        "folder is damaged")
    return saved


def iter_stats(run):
    """(line, record) of each of the run's stats.jsonl records (dicts with an integer 'step'), read a line at a
    time: a file of MAX_STATS_BYTES from someone else costs its parsed records only where the caller keeps them
    (all of them as dicts took about 30 times its size). Nothing where there is no file; a last line without its
    newline is a record whose write was cut short, skipped; a damaged line, or a file that is not plain, too large
    or not UTF-8, is one MepfError."""
    import json
    import os
    from pathlib import Path

    from mepf.artifacts.errors import MepfError
    from mepf.artifacts.plain_file import open_plain_file

    path = Path(run) / STATS
    if not path.exists():
        return
    problem, f = open_plain_file(path)
    if not problem and os.fstat(f.fileno()).st_size > MAX_STATS_BYTES:
        f.close()
        problem = f"it has more than the {MAX_STATS_BYTES:,} bytes mepf reads here"
    if problem:
        raise MepfError(f"{path} cannot be read ({problem}); the run folder is damaged")
    with f:
        read, i = 0, 0
        while True:
            try:
                raw = f.readline(MAX_STATS_LINE + 1)
            except OSError as e:  # a 'plain' file whose read fails (procfs, a failing disk)
                raise MepfError(f"{path} cannot be read ({type(e).__name__}); the run folder is damaged") from None
            if not raw:
                break
            i += 1
            read += len(raw)
            if read > MAX_STATS_BYTES:  # grew while it was read
                raise MepfError(f"{path} grew past {MAX_STATS_BYTES:,} bytes while it was read; the run folder is "
                                "damaged")
            if len(raw) > MAX_STATS_LINE:
                raise MepfError(f"{path} line {i} is longer than any stats record; the run folder is damaged")
            if not raw.endswith(b"\n"):  # the last, unfinished (a write cut short by a full disk or a kill): no record;
                break  # resume rewrites the file without it (review 48)
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise MepfError(f"{path} is not UTF-8 text; the run folder is damaged") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError, an integer too long to read, deep nesting
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise MepfError(f"{path} line {i} is not a stats record; the run folder is damaged")
            yield line, record


def snapshots(run) -> list:
    """(step, path) of the run's snapshots, by step: plain files only (a folder or link of that name is none)."""
    from pathlib import Path

    found = []
    for p in Path(run).glob(SNAPSHOT_GLOB):
        m = SNAPSHOT_NAME.fullmatch(p.name)
        if m and p.is_file() and not p.is_symlink():
            found.append((int(m.group(1)), p))
    return sorted(found)


def behind_note(behind: int, step, what: str) -> str:
    """What evaluate and sample say of a generator.pt older than the run's last snapshot (checkpoint.resumable_past)."""
    return (f"the run has snapshots past its generator.pt (step {behind} > {step}): {what} of an older generator; "
            "finish the run (mepf synthesize --resume) and")


def run_id_of(saved: dict) -> str | None:
    """The run id an options.json records (None in a run from before run ids)."""
    return saved.get("run_id") if isinstance(saved.get("run_id"), str) else None


def of_another_run(record: dict, saved: dict) -> str | None:
    """Why a snapshot or generator.pt whose record is `record` is not of the run whose options.json is `saved`, or
    None: another release, or another run id (a run from before run ids, none in its options.json, owns only files
    without one). Resume, `mepf info` and `mepf evaluate` decide by this one rule."""
    if "release_sha256" in record and record["release_sha256"] != saved.get("release_sha256"):
        return f"it was trained from another release, {str(record['release_sha256'])[:12]}..."
    if record.get("run_id") != run_id_of(saved):
        return "it is another run's, by its run id"
    return None


def snapshot_name(step: int) -> str:
    return f"snapshot-{step:07d}.pt"


def grids_past(run, step: int) -> list:
    """The run's grid PNGs (plain files named as grid_name writes) of steps past `step`."""
    from pathlib import Path

    return [p for p in Path(run).glob("grid-*.png") if (m := GRID_NAME.fullmatch(p.name)) and int(m.group(1)) > step
            and p.is_file() and not p.is_symlink()]


def grid_name(step: int) -> str:
    return f"grid-{step:07d}.png"
