"""What a launcher (torchrun) says in the environment: this process's rank numbers, parsed once. Torch-free, so the
CLI reads the same numbers as the collectives (core/distributed.py) without importing torch."""
from __future__ import annotations

import os

from mepf.artifacts.errors import MepfError

#: the numbers a rank checks before anything is read, each with the least value it may take (launch_problem)
RANK_ENV = {"LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1, "GROUP_RANK": 0}


def env_int(name: str, default: int, least: int = 0) -> int:
    """A launcher's number from the environment, or `default` where it is unset or not a whole number from `least`
    to 2^31-1 (which launch_problem says, on every rank)."""
    text = os.environ.get(name, "").strip()
    if not (text.isascii() and text.isdigit() and least <= int(text) < 2 ** 31):
        return default
    return int(text)


def launch_problem() -> str | None:
    """What is wrong with this rank's LOCAL_RANK, LOCAL_WORLD_SIZE or GROUP_RANK, if anything (a traceback, or a
    value out of range where it is packed, before)."""
    from mepf.artifacts.format import printable

    for name, least in RANK_ENV.items():
        text = os.environ.get(name)
        if text is not None and env_int(name, -1, least) < 0:
            return (f"{name}='{printable(text, 20)}' (rank {printable(os.environ.get('RANK', '?'), 12)}) is not a "
                    f"whole number from {least} to 2^31-1; nothing was read: launch with torchrun, or have the "
                    f"launcher set {name} to this rank's number")
    return None


def launched() -> bool:
    """Whether torchrun (or any launcher setting WORLD_SIZE > 1) started this process; a WORLD_SIZE that is not a
    number is one line, and so, where it is, a RANK that is not (torch would fail on it while joining)."""
    from mepf.artifacts.format import printable

    if os.environ.get("WORLD_SIZE", "").strip() and env_int("WORLD_SIZE", -1) < 0:
        raise MepfError(f"WORLD_SIZE='{printable(os.environ['WORLD_SIZE'], 20)}' is not a whole number from 0 to "
                        "2^31-1; nothing was read: unset it for one process, or launch with torchrun")
    if several() and env_int("RANK", -1) < 0:
        raise MepfError(f"RANK='{printable(os.environ.get('RANK', ''), 20)}' is not a whole number from 0 to 2^31-1 "
                        "(WORLD_SIZE says several processes run); nothing was read: launch with torchrun, or have the "
                        "launcher set RANK to this process's number")
    return several()


def several() -> bool:
    """launched(), never raising: where only who prints is asked (a bad WORLD_SIZE is one process's error, which
    that process prints). Only then do RANK and LOCAL_RANK say anything: a shell that happens to export RANK=3
    must not silence a lone process."""
    return world() > 1


def world() -> int:
    """The number of processes the launcher says run (WORLD_SIZE), never raising: 1 where it says none or one."""
    return max(env_int("WORLD_SIZE", 1), 1)


def is_main_rank() -> bool:
    """Rank 0, or not launched; a RANK that is not a number counts as 0 (an error printed twice, never lost)."""
    return not several() or env_int("RANK", 0) == 0


def speaks() -> bool:
    """Whether this process prints what every rank meets (an error, an interrupt): local rank 0, so that under
    torchrun each node's terminal gets it once, and rank 0 too, whose LOCAL_RANK a launcher numbering from 1 makes
    1; or not launched. A LOCAL_RANK that is not a number counts as 0 (launch_problem says what is wrong with it)."""
    return not several() or env_int("LOCAL_RANK", 0) == 0 or is_main_rank()
