"""Open and read a file someone else may control without blocking on it or reading without bound. Torch-free:
`mepf info` and `mepf audit` use it too."""
from __future__ import annotations

import os
import stat


def _open_fd(path, follow: bool = True) -> int:
    """A descriptor of `path` for reading, opened without blocking on a FIFO (raises OSError); with follow=False a
    link in the last component fails (ELOOP)."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW))


def open_nonblocking(path, follow: bool = True):
    """`path` opened for reading (raises OSError): a FIFO put at the name does not block the open (the caller's
    plain-file or identity check then refuses it); with follow=False a link in the last component fails (ELOOP)."""
    fd = _open_fd(path, follow)
    try:
        return os.fdopen(fd, "rb")
    except OSError:  # a folder: fdopen refuses it but leaves the descriptor open
        os.close(fd)
        raise


def open_plain_file(path):
    """(problem, None) or (None, the plain file at `path` open for reading). Opened without blocking, so that a
    FIFO put at the name is refused, not waited on; checked to be a plain file on the open handle."""
    try:
        fd = _open_fd(path)
    except OSError as e:
        return f"it cannot be opened ({type(e).__name__})", None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a folder with a traceback
            os.close(fd)
            return "it is not a plain file", None
        return None, os.fdopen(fd, "rb")
    except OSError as e:
        os.close(fd)
        return f"it cannot be opened ({type(e).__name__})", None


def read_plain_file(path, size: int | None = None, limit: int | None = None) -> tuple:
    """(problem, None) or (None, the bytes of the plain file at `path`), opened as open_plain_file does and
    checked on the open handle to have `size` bytes (when pinned) or at most `limit`, then read: what is read is
    what was checked. limit None: any size (a file larger than memory fails as a MemoryError, in one line)."""
    problem, f = open_plain_file(path)
    if problem:
        return problem, None
    with f:
        st = os.fstat(f.fileno())
        if size is not None and st.st_size != size:
            return f"it has {st.st_size} bytes, not {size}", None
        if limit is not None and st.st_size > limit:
            return f"it has {st.st_size:,} bytes, more than the {limit:,} mepf reads here", None
        try:
            data = f.read(st.st_size + 1)
        except (OSError, MemoryError) as e:
            return f"it cannot be read ({type(e).__name__})", None
    if len(data) != st.st_size:
        return "it changed while it was read", None
    return None, data


def _cgroup_limits() -> list:
    """The memory limits of this process's control groups (v2 memory.max, v1 memory.limit_in_bytes), each of its
    group and of the groups above it, where /proc and /sys say: a container or a Slurm job may hold less than the
    machine. Never raises: a group's name may hold any byte but '/', and what cannot be read sets no limit."""
    found = []
    try:
        with open("/proc/self/cgroup", "rb") as f:  # split on newlines only: a name may hold \x0b, \x1c, U+2028
            lines = [os.fsdecode(line) for line in f.read(1 << 16).split(b"\n")]
    except Exception:  # noqa: BLE001 - no /proc, or anything odd in it: no limit known
        return found
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            root, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in parts[1].split(","):
            root, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        rel = [p for p in parts[2].split("/") if p and p not in (".", "..")]
        for depth in range(len(rel) + 1):
            try:
                with open(os.path.join(root, *rel[:depth], name), "rb") as f:
                    text = f.read(64).strip()
            except Exception:  # noqa: BLE001 - not mounted, not readable, a name the filesystem refuses
                continue
            if text.isdigit():
                found.append(int(text))
    return found


def memory_bytes() -> int | None:
    """The memory this process may use: the machine's physical memory, or less where a control group (a container,
    a Slurm job) limits it; None where the platform does not say. A file of a few KB can claim to be any size (a
    sparse file costs no disk), so a size alone cannot be trusted to fit."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    if physical <= 0:  # -1 where the platform does not know
        return None
    return min([physical, *(n for n in _cgroup_limits() if n > 0)])


def address_space_left() -> int | None:
    """Bytes this process may still map under its address-space limit (`ulimit -v`, RLIMIT_AS), where allocations
    fail rather than being overcommitted; None where there is no such limit or the platform does not say."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status", "rb") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith(b"VmSize:"))
    except (ImportError, OSError, ValueError, StopIteration, IndexError):
        return None
    return max(0, soft - used)
