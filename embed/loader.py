"""The parallel data path of stage 1: blocks of records read, decoded, transformed and hashed in
torch DataLoader workers. Block b belongs to rank b % world and, within it, to worker (b // world) %
workers, so every record is read exactly once whatever the numbers of ranks and workers, and each rank's
share differs from another's by at most one block."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mepf.artifacts.errors import MepfError

from .fingerprint import record_hashes
from .sources import pixels_of


class Failed(str):
    """A user error met in a worker, passed on as a value: DataLoader would re-raise it with a traceback
    in its message, and stage 1's errors are one line."""


class RecordBlocks(IterableDataset):
    """Yields (x float (b, C, H, W) in [0, 1], labels int64 (b,) with -1 when unlabelled, record hashes)."""

    def __init__(self, source, transform, block_size: int, rank: int = 0, world: int = 1):
        self.source, self.transform, self.block_size, self.rank, self.world = source, transform, block_size, rank, world

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        world, rank = self.world, self.rank

        def keep(b):
            return b % world == rank and (b // world) % nw == w

        try:
            for _, records, labels in self.source.blocks(self.block_size, keep):
                hashes = record_hashes(records)
                x = self.transform(pixels_of(records))  # a Replaced record is embedded as the black image
                y = (torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)) if labels is not None
                     else torch.full((len(x),), -1, dtype=torch.int64))
                yield x, y, hashes
        except MepfError as e:
            yield Failed(str(e))


def shard_size(n: int, block_size: int, rank: int, world: int) -> int:
    """How many of n records fall to this rank."""
    blocks = math.ceil(n / block_size)
    mine = range(rank, blocks, world)
    return sum(min(block_size, n - b * block_size) for b in mine)


def default_workers(device: torch.device, local_world: int = 1) -> int:
    """Decoding workers per rank: none on a small CPU machine (the forward pass already uses every core),
    a few where cores are spare (a GPU does the forward pass)."""
    cores = max(1, (os.cpu_count() or 1) // max(local_world, 1))
    if device.type == "cuda":
        return max(0, min(8, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)


def loader(source, transform, block_size: int, workers: int, rank: int = 0, world: int = 1,
           pin: bool = False) -> DataLoader:
    return DataLoader(RecordBlocks(source, transform, block_size, rank, world), batch_size=None,
                      num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None)
