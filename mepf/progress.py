"""Progress for long work: a tqdm bar on a terminal; where stderr is not a terminal (a log file, a Slurm job),
one plain status line every MEPF_PROGRESS_EVERY seconds (default 60) and one at the end, instead of a bar
redrawn hundreds of times. Torch-free, shared by every stage."""
from __future__ import annotations

import os
import sys
import time

#: seconds between status lines when stderr is not a terminal (the environment variable overrides it)
PROGRESS_ENV = "MEPF_PROGRESS_EVERY"
DEFAULT_EVERY = 60.0


def every() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_ENV, DEFAULT_EVERY)))
    except ValueError:
        return DEFAULT_EVERY


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class StatusLines:
    """tqdm's interface (update, set_postfix, close, context manager) as plain lines. `counts=False` shows
    only how long it has run and how long it has left, never a count, percentage or rate (stage 1's rule for
    records, as its bar shows)."""

    def __init__(self, total=None, desc: str = "", initial: int = 0, disable: bool = False, counts: bool = True,
                 unit: str = "it", **_):
        self.total, self.desc, self.n, self.disable = total, desc, initial, disable
        self.counts, self.unit = counts, unit
        self.start = self.last = time.monotonic()
        self.initial, self.postfix = initial, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last >= every():
            self.last = now
            self._line()

    def set_postfix(self, values=None, **kw) -> None:
        values = {**(values or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, done: bool = False) -> None:
        elapsed = time.monotonic() - self.start
        parts = []
        if self.total:
            frac = min(self.n / self.total, 1.0)
            if self.counts:
                parts += [f"{100 * frac:.0f}%", f"{self.n}/{self.total} {self.unit}"]
            moved = (self.n - self.initial) / max(self.total - self.initial, 1)
            if not done and moved > 0:
                parts.append(f"remaining {_clock(elapsed * (1 - moved) / moved)}")
        elif self.counts:
            parts.append(f"{self.n} {self.unit}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.postfix and self.counts:
            parts.append(self.postfix)
        print(f"{self.desc}: {'done, ' if done else ''}{', '.join(parts)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.disable:
            self._line(done=True)
            self.disable = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        return False


def progress(total=None, desc: str = "", disable: bool = False, counts: bool = True, **kw):
    """A tqdm bar on a terminal, else StatusLines (what a log file should get). `bar_format` is tqdm's."""
    if not disable and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, **kw)
    kw.pop("bar_format", None)
    return StatusLines(total=total, desc=desc, disable=disable, counts=counts, **kw)
