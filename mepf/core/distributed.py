"""Several processes under torchrun (one per GPU, or several CPU processes): the process group and the
few collectives stages 1 and 2 need. Outside torchrun everything here is a no-op on one rank.

The rule for failures: a step that can fail on some ranks runs under `agree` (or `on_main`), so that
every rank raises the same one-line error and none is left waiting in a collective.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mepf.artifacts.errors import LaunchError, MepfError
from mepf.core.launch_env import env_int, launch_problem, launched

#: a rank waits MEPF_DIST_TIMEOUT_HOURS (default 6) in a collective for the others (a shard may be slower than
#: another), and MEPF_DIST_JOIN_MINUTES (default 10) for every rank to join: a node that stopped before it
#: joined (a refused option) stops the others then


def _wait(name: str, default: float, unit: str) -> datetime.timedelta:
    text = os.environ.get(name, str(default))
    try:
        value = float(text)
        if not value > 0:
            raise ValueError
    except ValueError:
        raise MepfError(f"{name}={text!r} is not a positive number of {unit}; unset it or give one") from None
    return datetime.timedelta(**{unit: value})
_GROUP = None  # every rank, with the long timeout: what the collectives below use


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def current() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), env_int("LOCAL_RANK", 0),
                 env_int("LOCAL_WORLD_SIZE", 1, least=1))


def setup(device: torch.device) -> tuple:
    """Join the process group if launched by torchrun (gloo for CPU tensors, NCCL for CUDA ones); return
    (ranks, the device this rank uses). A CPU rank gets its share of the cores, so that ranks do not
    oversubscribe them; a CUDA rank gets the GPU of its local rank."""
    if not launched():
        return Ranks(), device
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(env_int("LOCAL_RANK", 0))
        join_timeout = _wait("MEPF_DIST_JOIN_MINUTES", 10, "minutes")
        _wait("MEPF_DIST_TIMEOUT_HOURS", 6, "hours")  # a bad value is said before joining
        try:
            dist.init_process_group(backend=backend, timeout=join_timeout)
        except Exception as e:  # noqa: BLE001 - the store's timeout and connection errors have several types
            raise MepfError(f"not every rank joined within {join_timeout.total_seconds() / 60:g} minutes "
                            f"({type(e).__name__}); a node may have refused its options before joining (see its "
                            "terminal); nothing was read. Fix it and start every node again "
                            "(MEPF_DIST_JOIN_MINUTES sets the wait)") from None
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(timeout=_wait("MEPF_DIST_TIMEOUT_HOURS", 6, "hours"))
    ranks = current()
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world))
    return ranks, device


def join(device_option: str, resolve) -> tuple:
    """resolve(device_option) and setup(): where this node cannot have the device, it joins anyway (on the
    CPU) and the error is the same one line on every rank, instead of leaving the others waiting to join."""
    try:
        device, error = resolve(device_option), None
    except MepfError as e:
        device, error = torch.device("cpu"), str(e)
    misnumbered = (launch_problem() or gpu_problem(device)) if launched() else None
    if misnumbered:
        device = torch.device("cpu")  # LOCAL_RANK picks the GPU
    ranks, device = setup(device)
    agree(misnumbered, LaunchError)  # a number that is not one, said by its rank, before the numbering is compared
    if ranks.active:  # where LOCAL_RANK is not each node's 0..m-1, a node may have no rank that prints, or a GPU twice
        problem = numbering_problem(all_gather_bytes(node_row(ranks), 16))
        if problem:  # every rank has the same rows: the same decision
            raise LaunchError(problem)
    agree(error)
    return ranks, device


def node_row(ranks: Ranks) -> bytes:
    """This rank's (node, local rank) as two int64: the node is torchrun's agent number, GROUP_RANK, else the node's
    first rank (torchrun numbers a node's ranks consecutively)."""
    return struct.pack("<qq", env_int("GROUP_RANK", ranks.rank - ranks.local_rank), ranks.local_rank)


def nodes_of(rows: list) -> dict:
    """{node: [(rank, local rank, rest of the row)]} from every rank's row (node, local rank as two int64, then
    anything)."""
    nodes: dict = {}
    for r, row in enumerate(rows):
        nodes.setdefault(row[:8], []).append((r, struct.unpack("<q", row[8:16])[0], row[16:]))
    return nodes


def numbering_problem(rows: list) -> str | None:
    """The error when a node's ranks are not numbered 0..m-1 by LOCAL_RANK, else None."""
    for group in nodes_of(rows).values():
        if sorted(local for _, local, _ in group) != list(range(len(group))):
            said = ", ".join(f"rank {r}: {local}" for r, local, _ in group[:8]) + (", ..." if len(group) > 8 else "")
            return (f"the ranks of one node are not numbered 0..{len(group) - 1} by LOCAL_RANK ({said}); nothing was "
                    "read: launch with torchrun, or have the launcher set LOCAL_RANK (and GROUP_RANK) so that each "
                    "node's ranks are 0, 1, ...")
    return None


def gpu_problem(device: torch.device, count: int | None = None) -> str | None:
    """Where a CUDA rank's LOCAL_RANK names a GPU this node does not have (more processes per node than GPUs), the
    error every rank says, instead of torch's traceback on this rank and a wait on the others."""
    if device.type != "cuda":
        return None
    count = torch.cuda.device_count() if count is None else count
    local = env_int("LOCAL_RANK", 0)
    if local < count:
        return None
    return (f"LOCAL_RANK {local} names a GPU this process does not see (it sees {count}; mepf uses GPU number "
            f"LOCAL_RANK); nothing was read: start at most {count} process{'es' if count != 1 else ''} per node "
            f"(torchrun --nproc-per-node {max(count, 1)}) with every GPU of the node visible to each (a launcher "
            "binding one GPU per process through CUDA_VISIBLE_DEVICES hides the others), or run on the CPU "
            "(--device cpu)")


def teardown() -> None:
    global _GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (exact for integer tensors)."""
    if current().active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_GROUP)
    return tensor


#: the longest error text ranks exchange (bytes); longer ones are cut
MESSAGE_BYTES = 4096


def _to_tensor(data: bytes, size: int) -> torch.Tensor:
    if len(data) > size:
        raise ValueError(f"{len(data)} bytes exceed the {size} this exchange carries")
    t = torch.zeros(8 + size, dtype=torch.uint8)
    t[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
    if data:
        t[8:8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return t


def _from_tensor(t: torch.Tensor, size: int) -> bytes:
    raw = t.numpy().tobytes()
    length = min(int.from_bytes(raw[:8], "little"), size)  # a peer's length is not trusted past the buffer
    return raw[8:8 + length]


def all_gather_bytes(data: bytes, size: int) -> list:
    """Every rank's `data` (at most `size` bytes), in rank order, on every rank. Exchanged as uint8 tensors
    of one fixed size: nothing a peer sends is unpickled, and a peer's length is bounded by `size`."""
    r = current()
    if not r.active:
        return [data]
    out = [torch.zeros(8 + size, dtype=torch.uint8) for _ in range(r.world)]
    dist.all_gather(out, _to_tensor(data, size), group=_GROUP)
    return [_from_tensor(t, size) for t in out]


def broadcast_bytes(data: bytes | None, size: int) -> bytes:
    """Rank 0's `data` (at most `size` bytes) on every rank, as a uint8 tensor."""
    r = current()
    if not r.active:
        return data or b""
    t = _to_tensor(data or b"", size) if r.main else torch.zeros(8 + size, dtype=torch.uint8)
    dist.broadcast(t, src=0, group=_GROUP)
    return _from_tensor(t, size)


def _encode_error(error: str | None) -> bytes:
    return b"" if error is None else b"E" + error.encode("utf-8", "replace")[:MESSAGE_BYTES - 1]


def _decode_error(raw: bytes) -> str | None:
    if not raw.startswith(b"E"):
        return None
    text = raw[1:].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text) or "another rank failed"  # one printable line


def agree(error: str | None, kind: type = MepfError) -> None:
    """Every rank states whether its step failed; if any did, every rank raises the first error (by rank), as
    `kind`."""
    errors = [_decode_error(raw) for raw in all_gather_bytes(_encode_error(error), MESSAGE_BYTES)]
    first = next((e for e in errors if e), None)
    if first:
        raise kind(first)


def on_main(fn, on_lost=None):
    """Run fn() on rank 0 only and share its outcome: its return value on rank 0 (None elsewhere), or the
    same one-line error raised on every rank. A rank lost while rank 0 tells the others: rank 0 raises its own
    error, or, where fn() succeeded, returns on_lost(result, said) (with no on_lost, the collective's error)."""
    r = current()
    result, error, crash = None, None, None
    if r.main:
        try:
            result = fn()
        except MepfError as e:
            error = str(e)
        except Exception as e:  # a bug: the others must not wait for rank 0 in the next collective
            error, crash = f"rank 0 failed ({type(e).__name__}); see its traceback", e
    if r.active:
        try:
            error = _decode_error(broadcast_bytes(_encode_error(error), MESSAGE_BYTES))
        except RuntimeError as e:
            if not (r.main and lost_peer(e)) or (crash is None and error is None and on_lost is None):
                raise
            if crash is None and error is None:  # fn()'s work is done: a peer that went away must not hide it
                return on_lost(result, _said(e))
    if crash is not None:
        raise crash
    if error:
        raise MepfError(error)
    return result


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective's failure because another rank stopped or its node failed (torch's own
    error, a traceback on every other rank, unless caught; review 44 L2, review 49)."""
    return isinstance(e, RuntimeError) and (isinstance(e, getattr(dist, "DistError", ())) or any(
        w in str(e) for w in ("gloo", "NCCL", "Connection reset", "Connection closed")))


def _said(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


@contextlib.contextmanager
def peers_lost(consequence: str):
    """A collective that fails because another rank or node went away becomes one line on this rank, ending in
    `consequence` (what became of the work and the way on); any other error passes."""
    try:
        yield
    except RuntimeError as e:
        if not (current().active and lost_peer(e)):
            raise
        raise MepfError(f"rank {current().rank}'s collective failed ({_said(e)}): another rank stopped or its node "
                        f"failed, or this rank's own device (the words above say which); {consequence}") from None


def agree_same(what: str, value) -> None:
    """Every rank's `value` (JSON-able) must be rank 0's: compared as SHA-256 digests; else every rank raises
    the same error naming `what` (never the values)."""
    import hashlib
    import json

    r = current()
    if not r.active:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).digest()
    rows = all_gather_bytes(digest, 32)
    differ = [i for i, d in enumerate(rows) if d != rows[0]]
    if differ:
        raise MepfError(f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ[:8]))} disagree"
                        f"{'' if len(differ) > 1 else 's'} with rank 0 on {what}; start every node with the same "
                        "options")


def guarded(fn):
    """Run fn() on every rank; a MepfError on any rank becomes the same error on all (see agree)."""
    result, error, crash = None, None, None
    try:
        result = fn()
    except MepfError as e:
        error = str(e)
    except Exception as e:  # a bug: raised here with its traceback, and the others do not wait for this rank
        error, crash = f"rank {current().rank} failed ({type(e).__name__}); see its traceback", e
    try:
        agree(error)
    except MepfError:
        if crash is not None:
            raise crash from None
        raise
    return result
