"""The one exception type for user errors: the CLI prints its message on one line, no traceback."""
from __future__ import annotations


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
