"""Rank consistency: one decision on every rank, and one DDP step equal to one process.

* ``agree_across_ranks(flag)`` reduces a local decision (stop / kill / early stop) so
  every rank takes it at the same step. ``RankConsistentGuard`` wraps a
  ``CollapseGuard`` that way: a guard that stops one rank while the others wait in the
  next collective is the classic distributed hang.
* ``assert_ranks_agree(histories)`` and ``assert_ddp_step_equivalent(...)`` are the
  invariants: decisions equal on every rank at every step; one DDP step on world size 2
  equals a single-process step on the concatenated batch (the states to compare come
  from ``invariants.distributed.jobs``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._tolerances import tolerance_for
from invariants._validate import require

__all__ = ["RankConsistentGuard", "agree_across_ranks", "assert_ddp_step_equivalent",
           "assert_ranks_agree"]


def agree_across_ranks(flag: bool | torch.Tensor, *, op: str = "any") -> bool:
    """The same decision on every rank: ``any`` (a stop anywhere stops all) or ``all``.

    Without an initialised process group it returns the local flag.
    """
    require(op in ("any", "all"), "op", op, "must be 'any' or 'all'")
    local = bool(flag)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    t = torch.tensor([int(local) if op == "any" else int(not local)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item()) if op == "any" else not bool(t.item())


class RankConsistentGuard:
    """Wrap a ``CollapseGuard`` so ``should_stop`` is decided jointly by every rank.

    Call ``update`` on every rank at every step (it is a collective). A finding on any
    rank stops all ranks at the same step; in ``raise`` mode every rank raises.
    """

    def __init__(self, guard: Any):
        require(hasattr(guard, "update") and hasattr(guard, "should_stop"), "guard", guard,
                "must be a CollapseGuard (update(step, metrics), should_stop)")
        self.guard = guard
        self.should_stop = False

    @property
    def findings(self):
        return self.guard.findings

    def update(self, step: int, metrics: Mapping[str, Any]):
        from invariants.signatures import CollapseDetected
        raised: CollapseDetected | None = None
        try:
            new = self.guard.update(step, metrics)
        except CollapseDetected as exc:
            raised, new = exc, exc.findings
        local = bool(self.guard.should_stop) or raised is not None
        self.should_stop = agree_across_ranks(local)
        if self.should_stop and getattr(self.guard, "mode", None) == "raise":
            raise raised or CollapseDetected(
                f"step {step}: another rank detected a collapse signature", [])
        return new


@invariant_check("DDP")
def assert_ranks_agree(histories: Sequence[Sequence[tuple[int, bool]]], *,
                       what: str = "stop decision") -> None:
    """Assert every rank took the same decision at every step.

    Args:
      histories: per rank, the list of ``(step, decision)`` it recorded.

    Raises:
      InvariantViolation: naming the earliest step at which a rank disagreed with rank 0
        (and every rank's decision there), ranks at different steps, or ranks that ran
        different numbers of steps.
    """
    __tracebackhide__ = True
    require(len(histories) >= 1, "histories", histories, "needs at least one rank")
    histories = [list(h) for h in histories]
    ref = histories[0]
    for i in range(min(len(h) for h in histories)):  # the earliest step over all ranks
        s0, d0 = ref[i]
        for rank, hist in enumerate(histories[1:], start=1):
            s, d = hist[i]
            if s0 != s:
                fail("every rank at the same step", f"rank 0 at step {s0}, rank {rank} at step {s}")
            if d0 != d:
                by_rank = [h[i][1] for h in histories]
                fail(f"the same {what} on every rank at every step",
                     f"rank {rank} disagreed at step {s}: rank 0 decided {d0}, rank {rank} "
                     f"decided {d} (decisions by rank at step {s}: {by_rank})",
                     hint="reduce the decision across ranks (agree_across_ranks) before acting "
                          "on it; a rank that stops alone hangs the others in the next collective")
    for rank, hist in enumerate(histories[1:], start=1):
        if len(hist) != len(ref):
            fail("every rank to run the same number of steps",
                 f"rank 0 ran {len(ref)} steps, rank {rank} ran {len(hist)}")


@invariant_check("DDP")
def assert_ddp_step_equivalent(single: Mapping[str, torch.Tensor],
                               per_rank: Sequence[Mapping[str, Any]], *,
                               rtol: float | None = None, atol: float | None = None) -> None:
    """Assert each rank's post-step state equals the single-process step on the full batch.

    Args:
      single: name -> tensor after one single-process step on the concatenated batch
        (``param.*``, the clipped ``grad.*``, ``grad_norm_before_clip``, clamp norms,
        EMA weights ...), as ``one_step`` returns it.
      per_rank: the same names from every DDP rank after one step on its shard. A rank
        state with an ``"error"`` entry (captured by ``run_ddp_jobs``) is a violation.
      rtol, atol: override the dtype table (``tolerance_for``) for every quantity.

    Raises:
      InvariantViolation: naming the rank and the quantity that differs (the first in
        ``single``'s order, with the assert_close-style report, plus how many others
        differ), a gradient that is None on a rank but not in the single process,
        or a rank that raised.
    """
    __tracebackhide__ = True
    require(len(per_rank) >= 1, "per_rank", per_rank, "needs at least one rank")
    expectation = (f"a DDP step on world size {len(per_rank)} to equal the single-process step "
                   "on the concatenated batch")
    for rank, state in enumerate(per_rank):
        if "error" in state:
            fail(expectation, f"rank {rank} raised: {state['error']}")
        reports: list[str] = []
        for name, ref in single.items():
            if name not in state:
                reports.append(f"rank {rank}: {name} is missing on the rank (a None gradient: "
                               "the parameter got no gradient under DDP) but exists in the "
                               "single-process step")
                continue
            tol = tolerance_for(ref.dtype if ref.is_floating_point() else torch.float64,
                                rtol=rtol, atol=atol)
            report = compare_tensors(state[name], ref, tol, what=f"rank {rank}: {name}")
            if report:
                reports.append(report)
        has_grads = any(k.startswith("grad.") for k in single)  # else: a chosen subset
        extra = sorted(k for k in state if has_grads and k not in single
                       and k.startswith("grad."))
        for name in extra:
            reports.append(f"rank {rank}: {name} has a gradient on the rank but is None in the "
                           "single-process step")
        if reports:
            others = "" if len(reports) == 1 else \
                f"\n  ({len(reports) - 1} more quantities differ on rank {rank}: " + ", ".join(
                    r.split(":")[1].strip() for r in reports[1:6]) + \
                (" ..." if len(reports) > 6 else "") + ")"
            fail(expectation, reports[0] + others,
                 hint="is a quantity computed per rank that must be global (clip the "
                      "all-reduced gradient, not the local one; rescale summed loss terms; "
                      "token means need the global count)?")
