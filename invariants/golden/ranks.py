"""Golden runs at world size >= 2: executing them on spawned gloo ranks, and rank agreement.

``execute_distributed(_jobs)`` runs golden runs data-parallel in ONE spawned group: each
rank finds the runs by name in the runs module (``load_runs``; a run's ``fn`` is a
closure and cannot be sent) and executes them under ``deterministic(seed)`` inside the
process group, where the training functions go data-parallel. A job may run with the
metric reduction switched off (``metric_reduction(False)``, owned by
``invariants.distributed``): each rank then logs its own shard's metrics, the bug
``assert_ranks_logged_same_curves`` exists to catch. No runs module is imported here
unless the caller names one (or leaves the default).
"""
from __future__ import annotations

import gc
import math
from typing import Sequence

import torch
import torch.distributed as dist

from invariants._assertions import invariant_check
from invariants._errors import InvariantViolation
from invariants._validate import require
from invariants.distributed.reduction import metric_reduction
from invariants.distributed.spawn import HANG_AFTER_S, spawn_group
from invariants.golden.run import (DEFAULT_RUNS_MODULE, Curves, GoldenError, GoldenRun, execute,
                                   load_runs)

__all__ = ["assert_ranks_logged_same_curves", "execute_distributed", "execute_distributed_jobs"]


def _golden_rank_worker(rank: int, world_size: int, runs_module: str,
                        jobs: list[tuple[list[str], bool]], device: str
                        ) -> list[dict[str, dict[str, list]]]:
    """One rank: each job's runs under ``deterministic(seed)``, inside the process group.

    A job is ``(run names, reduce_metrics)``; ``reduce_metrics=False`` runs it under
    ``metric_reduction(False)``.
    """
    out = []
    for names, reduce_metrics in jobs:
        with metric_reduction(reduce_metrics):
            curves_of = {}
            for run in load_runs(runs_module, names):
                curves = execute(run, torch.device(device))
                curves_of[run.name] = {m: [list(st), list(vals)]
                                       for m, (st, vals) in curves.items()}
        out.append(curves_of)
    # Free the runs' DDP reducers while the group is alive, and leave together: a rank
    # that tore the group down while the other was still in its last collective or its
    # teardown made a rank die in C++ ("terminate called without an active exception"),
    # observed a few times in 20-odd groups when rank 0 hosted the store (the parent
    # hosts it now, see invariants/distributed/rendezvous.py).
    gc.collect()
    dist.barrier()
    return out


def execute_distributed(runs: Sequence[GoldenRun], world_size: int = 2, *,
                        runs_module: str = DEFAULT_RUNS_MODULE, device: torch.device | str = "cpu",
                        timeout: float | None = None, reduce_metrics: bool = True,
                        hang_after: float = HANG_AFTER_S) -> dict[str, list[Curves]]:
    """Run golden runs on ``world_size`` gloo ranks (one spawned group for all of them).

    The ranks import ``runs_module`` and look the runs up by name (a run's ``fn`` is a
    closure and cannot be sent to a spawned process); a run whose config there differs
    from the caller's is a GoldenError. The training functions go data-parallel under
    the process group (e.g. ``reference_models/data_parallel.py``). Returns
    ``{run name: [rank 0 curves, rank 1 curves, ...]}``. ``reduce_metrics=False`` is the
    broken variant (every rank logs its own shard's metrics), for tests. ``timeout`` (an
    optional overall backstop) and ``hang_after`` (seconds without progress from any
    rank) are ``spawn_group``'s.
    """
    return execute_distributed_jobs([(runs, reduce_metrics)], world_size, runs_module=runs_module,
                                    device=device, timeout=timeout, hang_after=hang_after)[0]


def execute_distributed_jobs(jobs: Sequence[tuple[Sequence[GoldenRun], bool]],
                             world_size: int = 2, *, runs_module: str = DEFAULT_RUNS_MODULE,
                             device: torch.device | str = "cpu", timeout: float | None = None,
                             hang_after: float = HANG_AFTER_S) -> list[dict[str, list[Curves]]]:
    """Several ``(runs, reduce_metrics)`` jobs in ONE spawned group (spawning costs seconds)."""
    require(isinstance(world_size, int) and not isinstance(world_size, bool) and world_size >= 2,
            "world_size", world_size, "must be an integer >= 2 (world size 1 is _execute)")
    device = torch.device(device)
    require(device.type == "cpu", "device", device, "distributed golden runs use gloo on cpu")
    known = {r.name: r for r in load_runs(runs_module, [])}
    for runs, _ in jobs:
        for run in runs:
            if run.name not in known or known[run.name].config_sha256 != run.config_sha256:
                raise GoldenError(f"run {run.name!r}: {runs_module}.RUNS has no run of that name "
                                  "with the same config; the ranks could not run it")
    payload = [([r.name for r in runs], bool(reduce)) for runs, reduce in jobs]
    per_rank = spawn_group(_golden_rank_worker, world_size, runs_module, payload, str(device),
                           timeout=timeout, hang_after=hang_after)
    return [{name: [{m: (list(st), list(vals)) for m, (st, vals) in ranks[j][name].items()}
                    for ranks in per_rank] for name in names}
            for j, (names, _) in enumerate(payload)]


@invariant_check("golden")
def assert_ranks_logged_same_curves(run_name: str, per_rank: Sequence[Curves]) -> None:
    """Every rank logged the same metrics, steps and values as rank 0 (exactly).

    A data-parallel run reduces its metrics over the ranks; a metric that was not
    reduced shows up as a rank logging its own shard's value.

    Raises:
      InvariantViolation: naming the earliest step at which a rank disagrees, the
        metric, both values, and every other metric that disagrees.
    """
    __tracebackhide__ = True
    ref = per_rank[0]
    disagreements = []   # (step, metric, rank, rank-0 value, rank value)
    for rank, curves in enumerate(per_rank[1:], start=1):
        if set(curves) != set(ref):
            raise InvariantViolation(
                f"run {run_name!r}: rank {rank} logged metrics {sorted(curves)}, rank 0 logged "
                f"{sorted(ref)}")
        for metric in sorted(ref):
            (s0, v0), (s1, v1) = ref[metric], curves[metric]
            if list(s0) != list(s1):
                raise InvariantViolation(
                    f"run {run_name!r}: rank {rank} logged {metric!r} at steps {list(s1)[:5]}..., "
                    f"rank 0 at {list(s0)[:5]}... ({len(s1)} vs {len(s0)} points)")
            for step, a, b in zip(s0, v0, v1):
                same = a == b or (isinstance(a, float) and isinstance(b, float)
                                  and math.isnan(a) and math.isnan(b))
                if not same:
                    disagreements.append((step, metric, rank, a, b))
                    break
    if disagreements:
        step, metric, rank, a, b = min(disagreements, key=lambda d: (d[0], d[2], d[1]))
        others = sorted({f"{m} (rank {r}, step {st})" for st, m, r, _, _ in disagreements
                         if (m, r) != (metric, rank)})
        raise InvariantViolation(
            f"run {run_name!r}: rank {rank} disagreed with rank 0 on {metric!r} at step {step}: "
            f"rank 0 logged {a!r}, rank {rank} logged {b!r} (every rank must log the "
            f"full-batch value: is the metric reduced over the ranks?)"
            + (f"\n  also disagreeing, first step each: {', '.join(others)}" if others else ""))
