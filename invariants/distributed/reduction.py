"""What is reduced over ranks, and how: the metric-reduction switch and DDP-correct losses.

* The **metric-reduction switch** (``metrics_reduced()``, ``metric_reduction(enabled)``):
  a data-parallel training loop logs a batch metric from the full batch (its shards
  gathered over the ranks) only while ``metrics_reduced()`` is True. The golden rank
  worker turns it off for a job (``execute_distributed(..., reduce_metrics=False)``) to
  run the classic "metrics not all-reduced" bug, which ``assert_ranks_logged_same_curves``
  must catch. The library owns the switch, the training loops read it: the library never
  reaches into a model package to flip a flag. It is a ``ContextVar``, so a block sets it
  and the token restores the caller's value however blocks nest.
* DDP averages gradients over ranks, so a loss that is a per-rank *mean over equal
  shards* gives the full-batch gradient, and anything else does not:
  ``sum_reduction_scale()`` rescales a term summed over samples, ``ddp_token_mean``
  turns a per-rank token mean (padding ignored) into the full-batch token mean.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.distributed as dist

from invariants._validate import require

__all__ = ["ddp_token_mean", "metric_reduction", "metrics_reduced", "sum_reduction_scale"]

_METRICS_REDUCED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "invariants_metrics_reduced", default=True)


def metrics_reduced() -> bool:
    """True (the default) when a data-parallel loop must log full-batch metrics.

    A training loop's gather of a metric's shards returns the local shard when this is
    False (see ``reference_models/data_parallel.py``): each rank then logs its own
    shard's value, the bug the rank-consistency check of golden runs catches.
    """
    return _METRICS_REDUCED.get()


@contextlib.contextmanager
def metric_reduction(enabled: bool) -> Iterator[None]:
    """Run the block with metrics reduced over ranks (``True``) or left per rank (``False``)."""
    require(isinstance(enabled, bool), "enabled", enabled, "must be True or False")
    token = _METRICS_REDUCED.set(enabled)
    try:
        yield
    finally:
        _METRICS_REDUCED.reset(token)


def sum_reduction_scale() -> int:
    """The factor a loss term *summed* over samples needs under DDP: the world size.

    DDP averages gradients over ranks. A mean over equal shards averages to the
    full-batch mean, but a per-rank sum (e.g. seed 000's decay λ·Σ_i‖ΔW_i‖F²)
    averages to 1/world_size of the full-batch sum. Multiply such terms by this.
    Returns 1 without an initialised process group.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def ddp_token_mean(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """A mean over items whose number differs per rank (tokens with padding ignored).

    ``total`` is this rank's sum of per-item losses, ``count`` its number of items.
    Returns ``total · world_size / Σ_ranks count`` so that DDP's gradient average is
    the gradient of the full-batch mean ``Σ total / Σ count``. Without a process
    group it is ``total / count``. The count is all-reduced (one small collective).
    """
    n = torch.as_tensor(count, dtype=torch.float64).detach().clone().reshape(())
    world = sum_reduction_scale()
    if world > 1:
        dist.all_reduce(n)
    require(float(n) > 0, "count", float(n), "must be > 0 summed over ranks")
    return total * (world / n.to(total.dtype))
