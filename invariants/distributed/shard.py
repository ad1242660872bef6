"""Sharding a batch over ranks: the one helper both DDP equivalence and data-parallel loops use.

Rank ``r`` of ``W`` keeps rows ``r·n//W .. (r+1)·n//W`` of a batch of ``n`` rows: contiguous,
in rank order, so the shards concatenated in rank order are the batch again. Shards may
differ in size by one row (a data-parallel training loop gathers its metrics exactly);
``equal=True`` requires equal shards (one DDP step compared with a single-process step:
DDP averages per-rank means, which equal the full-batch mean only over equal shards).
Without ``rank``/``world_size`` the current process group's are used (0 of 1 without one).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from invariants._validate import require

__all__ = ["shard_batch", "shard_bounds"]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    require(isinstance(world_size, int) and not isinstance(world_size, bool)
            and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
    require(isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank < world_size,
            "rank", rank, f"must be an integer in [0, world_size={world_size})")
    return rank, world_size


def shard_bounds(n: int, rank: int | None = None, world_size: int | None = None, *,
                 equal: bool = False) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a batch of ``n`` rows that ``rank`` of ``world_size`` trains on.

    Raises:
      InvalidArgumentError: fewer rows than ranks, or (``equal``) ``n`` not a multiple
        of ``world_size``.
    """
    rank, world = _rank_and_world(rank, world_size)
    if equal:
        require(n % world == 0 and n >= world, "batch size", n,
                f"must be a positive multiple of world_size={world} (equal shards: DDP "
                "averages per-rank means)")
    require(n >= world, "batch size", n,
            f"must be >= world_size={world} so that every rank gets at least one row")
    return rank * n // world, (rank + 1) * n // world


def shard_batch(batch: Sequence[torch.Tensor], rank: int | None = None,
                world_size: int | None = None, *, dim: int = 0,
                equal: bool = False) -> tuple[torch.Tensor, ...]:
    """This rank's rows of each tensor of ``batch`` (all the same size on ``dim``).

    Raises:
      InvalidArgumentError: an empty batch, tensors whose sizes on ``dim`` differ, or
        a batch ``shard_bounds`` refuses.
    """
    require(len(batch) >= 1, "batch", batch, "needs at least one tensor")
    n = batch[0].shape[dim]
    require(all(t.shape[dim] == n for t in batch), "batch", [tuple(t.shape) for t in batch],
            f"tensors must share the batch size on dim {dim}")
    lo, hi = shard_bounds(n, rank, world_size, equal=equal)
    return tuple(t.narrow(dim, lo, hi - lo) for t in batch)
