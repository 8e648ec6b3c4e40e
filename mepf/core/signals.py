"""Ctrl-C and SIGTERM (Slurm's preemption signal) held off across a short stretch that must finish whole (a
training step and its snapshot; a logged release and its rename), then taken by the caller. Torch-free."""
from __future__ import annotations

import contextlib
import signal
import threading

from mepf.artifacts.errors import Interrupted


@contextlib.contextmanager
def deferred_interrupts(enabled: bool = True, again: str | None = "interrupted again: stopped at once"):
    """Within the block, Ctrl-C and SIGTERM are noted in the yielded list and taken by the caller at a clean
    point; a second Ctrl-C interrupts at once with `again` (None: never; torchrun's agent forwards the terminal's
    Ctrl-C, so each rank sees it twice). Off when not `enabled`, and outside the main thread."""
    hits = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield hits
        return

    def note(signum, frame):
        hits.append(signum)
        if again and signum == signal.SIGINT and hits.count(signal.SIGINT) > 1:  # a repeated SIGTERM (the agent's
            raise Interrupted(again, signum)  # forwards Slurm's) is one preemption, followed by SIGKILL anyway

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield hits
    finally:
        for s, h in old.items():
            signal.signal(s, h)
