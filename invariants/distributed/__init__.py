"""torch.distributed on CPU: spawned gloo groups, rank-consistent decisions, DDP equivalence.

The machinery behind the distributed checks, one concern per module:

* ``spawn``: ``spawn_group`` (a gloo group of spawned processes on loopback, watched for
  hangs by heartbeats rather than timed, every rank reported once, always reaped;
  ``GroupFailed`` / ``GroupHung``), with its parts ``rank`` (what runs in a rank:
  heartbeat, dying with the parent, fault stacks), ``rendezvous`` (the store, served by
  the parent on 127.0.0.1 only) and ``progress`` (the one "made progress" rule, which the
  pytest plugin's ``distributed`` time limit reads too);
* ``shard``: ``shard_batch`` / ``shard_bounds``, the one way a batch is split over ranks;
* ``reduction``: the metric-reduction switch the library owns (``metrics_reduced``,
  ``metric_reduction``) and DDP-correct losses (``sum_reduction_scale``, ``ddp_token_mean``);
* ``consistency``: ``agree_across_ranks``, ``RankConsistentGuard``, ``assert_ranks_agree``,
  ``assert_ddp_step_equivalent``;
* ``jobs``: DDP step jobs found by name through one resolver (``resolve``),
  ``ddp_equivalence(s)``, ``run_ddp_jobs``.

Users import the public names from ``invariants``; this package's ``__all__`` is what
``invariants`` re-exports.
"""
from invariants.distributed.consistency import (RankConsistentGuard, agree_across_ranks,
                                                assert_ddp_step_equivalent, assert_ranks_agree)
from invariants.distributed.jobs import StepSpec, ddp_equivalence, ddp_equivalences, run_ddp_jobs
from invariants.distributed.reduction import (ddp_token_mean, metric_reduction, metrics_reduced,
                                              sum_reduction_scale)
from invariants.distributed.shard import shard_batch, shard_bounds
from invariants.distributed.spawn import spawn_group

__all__ = [
    "RankConsistentGuard",
    "StepSpec",
    "agree_across_ranks",
    "assert_ddp_step_equivalent",
    "assert_ranks_agree",
    "ddp_equivalence",
    "ddp_equivalences",
    "ddp_token_mean",
    "metric_reduction",
    "metrics_reduced",
    "run_ddp_jobs",
    "shard_batch",
    "shard_bounds",
    "spawn_group",
    "sum_reduction_scale",
]
