"""The one exception type for user errors: the CLI prints its message on one line, no traceback."""
from __future__ import annotations

import errno


class MepfError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class LaunchError(MepfError):
    """A launch that numbered its ranks wrongly: every rank prints it, since a node whose ranks are misnumbered may
    have no rank that prints for the node."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, taken where the work could stop cleanly; the message says how far it got and how to
    go on. `signum` is the signal (SIGTERM exits 143, SIGINT 130)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


#: errno values that are the machine's storage, not a bug: full, over quota, read-only, a file too large, access
#: denied, failing
STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM,
                            errno.EIO})


def storage_error(e: OSError) -> str:
    """An OSError in words: 'No space left on device: PATH' (the path shown inert), for one-line messages."""
    from .format import printable

    said = e.strerror or type(e).__name__
    return f"{said}: {printable(str(e.filename), 200)}" if e.filename else said
