"""Several processes under torchrun (one per GPU, or several CPU processes): the process group and the
few collectives stages 1 and 2 need. Outside torchrun everything here is a no-op on one rank.

The rule for failures: a step that can fail on some ranks runs under `agree` (or `on_main`), so that
every rank raises the same one-line error and none is left waiting in a collective.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mepf.artifacts.errors import MepfError

#: a rank waits this long in a collective for the others (a shard may be slower than another)
TIMEOUT = datetime.timedelta(hours=int(os.environ.get("MEPF_DIST_TIMEOUT_HOURS", "6")))


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


def launched() -> bool:
    """Whether torchrun (or any launcher setting WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup(device: torch.device) -> tuple:
    """Join the process group if launched by torchrun (gloo for CPU tensors, NCCL for CUDA ones); return
    (ranks, the device this rank uses). A CPU rank gets its share of the cores, so that ranks do not
    oversubscribe them; a CUDA rank gets the GPU of its local rank."""
    if not launched():
        return Ranks(), device
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    ranks = current()
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world))
    return ranks, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (exact for integer tensors)."""
    if current().active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    r = current()
    if not r.active:
        return [obj]
    out = [None] * r.world if r.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def agree(error: str | None) -> None:
    """Every rank states whether its step failed; if any did, every rank raises the first error (by rank)."""
    r = current()
    errors = [error]
    if r.active:
        errors = [None] * r.world
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise MepfError(first)


def on_main(fn):
    """Run fn() on rank 0 only and share its outcome: its return value on rank 0 (None elsewhere), or the
    same one-line error raised on every rank."""
    r = current()
    result, error = None, None
    if r.main:
        try:
            result = fn()
        except MepfError as e:
            error = str(e)
    if r.active:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise MepfError(error)
    return result


def shared(obj):
    """Rank 0's `obj` on every rank."""
    if current().active:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def guarded(fn):
    """Run fn() on every rank; a MepfError on any rank becomes the same error on all (see agree)."""
    result, error = None, None
    try:
        result = fn()
    except MepfError as e:
        error = str(e)
    agree(error)
    return result
