"""torch.distributed on CPU: rank-consistent decisions and DDP equivalence, on real gloo.

* ``spawn_group(fn, world_size, ...)`` starts ``world_size`` spawned processes, each
  with a gloo process group on a free loopback port, runs ``fn(rank, world_size,
  *args)`` and returns every rank's result (passed back with ``torch.save`` and read
  with ``torch.load(weights_only=True)``). It has a hard timeout and always reaps its
  processes, also when a rank fails or hangs.
* ``agree_across_ranks(flag)`` reduces a local decision (stop / kill / early stop)
  so every rank takes it at the same step. ``RankConsistentGuard`` wraps a
  ``CollapseGuard`` that way: a guard that stops one rank while the others wait in
  the next collective is the classic distributed hang.
* ``assert_ranks_agree(histories)`` and ``assert_ddp_step_equivalent(...)`` are the
  invariants: decisions equal on every rank at every step; one DDP step on world
  size 2 equals a single-process step on the concatenated batch.
* ``ddp_equivalence(factory)`` / ``ddp_equivalences(jobs)`` produce the states to
  compare: a factory ``"package.module:function"`` builds a ``StepSpec`` from a seed;
  one spawned group can run many factories (spawning costs seconds, a step costs ms).
* DDP averages gradients over ranks, so a loss that is a per-rank *mean over equal
  shards* gives the full-batch gradient, and anything else does not:
  ``sum_reduction_scale()`` rescales a term summed over samples, ``ddp_token_mean``
  turns a per-rank token mean (padding ignored) into the full-batch token mean.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import require, require_positive
from invariants._tolerances import tolerance_for

__all__ = [
    "RankConsistentGuard",
    "StepSpec",
    "agree_across_ranks",
    "assert_ddp_step_equivalent",
    "assert_ranks_agree",
    "ddp_equivalence",
    "ddp_equivalences",
    "ddp_token_mean",
    "run_ddp_jobs",
    "spawn_group",
    "sum_reduction_scale",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, outdir: str,
           timeout_s: float) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}",
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def spawn_group(fn: Callable[..., Any], world_size: int = 2, *args: Any,
                timeout: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    ``fn`` must be a module-level function (it is pickled by name for ``spawn``).
    Raises RuntimeError naming the rank and its traceback if a rank fails, and
    TimeoutError (after killing every process) if the group does not finish in time.
    """
    require(callable(fn), "fn", fn, "must be a module-level callable")
    require(isinstance(world_size, int) and not isinstance(world_size, bool)
            and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
    require_positive("timeout", timeout)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="invariants-dist-") as outdir:
        ctx = mp.start_processes(_entry, args=(world_size, _free_port(), fn, args, outdir,
                                               timeout), nprocs=world_size, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if ctx.join(timeout=0.2):
                        break
                except Exception:  # a rank raised: report its own traceback
                    errors = sorted(Path(outdir).glob("rank*.err"))
                    detail = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errors)
                    raise RuntimeError(f"a rank of the {world_size}-process gloo group failed:\n"
                                       f"{detail or 'no traceback captured'}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the {world_size}-process gloo group did not finish in {timeout:g}s "
                        "(a rank waiting in a collective the others never reached?); all "
                        "processes were killed")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=True)
                for r in range(world_size)]


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
        from invariants._guard import CollapseDetected
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


@dataclass
class StepSpec:
    """One training step, as a factory ``f(seed) -> StepSpec`` builds it.

    Attributes:
      model: the module (same seed -> same weights on every rank; DDP also broadcasts
        rank 0's weights when it wraps the model).
      make_optimizer: ``params -> optimizer`` (called with the trainable parameters).
      loss_fn: ``(net, *batch) -> scalar`` mean loss; ``net`` is the DDP wrapper under
        DDP, so call ``net(...)`` (not ``model(...)``) for the reducer to see the forward.
      batch: the full batch, tensors with the batch on dim 0 (sharded evenly by rank).
      max_norm: the global clipping cap; ``None``: no clipping.
      observe: ``model -> {name: tensor}`` extra observables after the step (clamp norms
        on the batch, EMA weights, contexts ...). Evaluate them on the *full* batch so
        every rank reports the same quantity as the single process.
      after_step: ``model -> None`` run after ``optimizer.step()`` (e.g. an EMA update).
      ddp_kwargs: keyword arguments for ``DistributedDataParallel`` (e.g.
        ``find_unused_parameters=True`` for staged modules).
    """

    model: torch.nn.Module
    make_optimizer: Callable[[list], torch.optim.Optimizer]
    loss_fn: Callable[..., torch.Tensor]
    batch: tuple[torch.Tensor, ...]
    max_norm: float | None = 1.0
    observe: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None
    after_step: Callable[[torch.nn.Module], None] | None = None
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)


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


# ------------------------------------------------------------ one DDP step vs one process
def _resolve(path: str) -> Callable[..., Any]:
    import importlib
    require(isinstance(path, str), "factory", path, "must be 'package.module:function'")
    module, _, attr = path.partition(":")
    require(bool(module and attr), "factory", path, "must be 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError(f"factory={path!r}: cannot resolve it ({exc})") from None


def _shard(batch: Sequence[torch.Tensor], rank: int, world_size: int) -> tuple:
    require(len(batch) >= 1, "batch", batch, "needs at least one tensor")
    n = batch[0].shape[0]
    require(n % world_size == 0 and n >= world_size, "batch size", n,
            f"must be a positive multiple of world_size={world_size} (equal shards: DDP "
            "averages per-rank means)")
    require(all(t.shape[0] == n for t in batch), "batch", [tuple(t.shape) for t in batch],
            "tensors must share the batch size on dim 0")
    k = n // world_size
    return tuple(t[rank * k:(rank + 1) * k] for t in batch)


CLIPS = ("global", "per_rank")


def one_step(spec: StepSpec, batch: Sequence[torch.Tensor], *, ddp: bool = False,
             clip: str = "global", process_group: Any = None) -> dict[str, torch.Tensor]:
    """One optimizer step of ``spec`` on ``batch``; returns its observable state.

    State: ``param.<name>`` after the step, ``grad.<name>`` (the clipped gradient the
    optimizer used; None gradients are absent), ``grad_norm_before_clip`` (0 without
    clipping), and ``spec.observe(model)``. The gradients are what makes the check
    sharp: a first Adam step is ≈ lr·sign(g), blind to any rescaling of g.
    ``clip="global"`` clips the all-reduced gradient (correct); ``"per_rank"`` clips each
    rank's local gradient before averaging (the broken variant).
    """
    require(clip in CLIPS, "clip", clip, f"must be one of {CLIPS}")
    model = spec.model
    net = torch.nn.parallel.DistributedDataParallel(
        model, process_group=process_group, **spec.ddp_kwargs) if ddp else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = spec.make_optimizer(params)
    opt.zero_grad(set_to_none=True)
    if ddp and clip == "per_rank" and spec.max_norm is not None:
        with net.no_sync():
            spec.loss_fn(net, *batch).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, spec.max_norm)  # local: wrong
        world = dist.get_world_size(process_group)
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=process_group)
                p.grad /= world
    else:
        spec.loss_fn(net, *batch).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, spec.max_norm) \
            if spec.max_norm is not None else torch.tensor(0.0)
    state = {f"grad.{name}": p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    opt.step()
    if spec.after_step is not None:
        spec.after_step(model)
    state.update({f"param.{name}": p.detach().clone() for name, p in model.named_parameters()})
    state["grad_norm_before_clip"] = norm.detach().clone().reshape(())
    if spec.observe is not None:
        with torch.no_grad():
            state.update({k: v.detach().clone() for k, v in spec.observe(model).items()})
    return state


def _job(value: Any) -> dict[str, Any]:
    job = {"factory": value} if isinstance(value, str) else dict(value)
    require("factory" in job, "job", value, "needs a 'factory' ('package.module:function')")
    unknown = sorted(set(job) - {"factory", "reference", "seed", "clip"})
    require(not unknown, "job", value, f"has unknown keys {unknown}")
    job.setdefault("reference", job["factory"])
    job.setdefault("seed", 0)
    job.setdefault("clip", "global")
    require(job["clip"] in CLIPS, "clip", job["clip"], f"must be one of {CLIPS}")
    return job


def run_ddp_jobs(rank: int, world_size: int, jobs: Mapping[str, Any], *,
                 capture_errors: bool = False) -> dict[str, dict[str, Any]]:
    """Inside a spawned rank: one DDP step per job, each on a fresh gloo group.

    ``jobs``: name -> factory string or ``{"factory", "seed", "clip"}``. A fresh
    subgroup per job keeps a job whose DDP reducer failed from leaving collectives
    half-done for the next one. With ``capture_errors`` a job that raises records
    ``{"error": "<Type>: <message>"}`` instead of failing the whole group.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, value in jobs.items():
        job = _job(value)
        group = dist.new_group(backend="gloo")
        try:
            spec = _resolve(job["factory"])(job["seed"])
            out[name] = one_step(spec, _shard(spec.batch, rank, world_size), ddp=True,
                                 clip=job["clip"], process_group=group)
        except Exception as exc:  # noqa: BLE001 - recorded for the caller to judge
            if not capture_errors:
                raise
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            dist.barrier()
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
    return out


def ddp_step_worker(rank: int, world_size: int, factory: str, seed: int,
                    clip: str) -> dict[str, torch.Tensor]:
    """Spawned worker: build the spec from ``factory(seed)``, take one DDP step on the shard."""
    return run_ddp_jobs(rank, world_size, {"job": {"factory": factory, "seed": seed,
                                                   "clip": clip}})["job"]


def single_process_state(job: Any) -> dict[str, torch.Tensor]:
    """The single-process step of a job's reference factory on the whole batch (1 thread)."""
    job = _job(job)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each; same kernels, same order
    try:
        spec = _resolve(job["reference"])(job["seed"])
        return one_step(spec, spec.batch)
    finally:
        torch.set_num_threads(threads)


def ddp_equivalence(factory: str, *, reference: str | None = None, seed: int = 0,
                    world_size: int = 2, clip: str = "global", timeout: float = 60.0
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(single-process state, per-rank DDP states) for one step of ``factory(seed)``.

    ``reference`` (default: ``factory``) builds the single-process step, e.g. the
    non-checkpointed model when ``factory`` checkpoints. One spawned group.
    """
    job = {"factory": factory, "reference": reference or factory, "seed": seed, "clip": clip}
    return ddp_equivalences({"job": job}, world_size=world_size, timeout=timeout)["job"]


def _jobs_worker(rank: int, world_size: int, jobs: dict, capture_errors: bool) -> dict:
    return run_ddp_jobs(rank, world_size, jobs, capture_errors=capture_errors)


def ddp_equivalences(jobs: Mapping[str, Any], *, world_size: int = 2, timeout: float = 60.0,
                     capture_errors: bool = False
                     ) -> dict[str, tuple[dict[str, torch.Tensor], list[dict[str, Any]]]]:
    """Several ``ddp_equivalence`` jobs in ONE spawned group: name -> (single, per_rank).

    ``jobs``: name -> factory string or ``{"factory", "reference", "seed", "clip"}``.
    """
    require(isinstance(jobs, Mapping) and len(jobs) >= 1, "jobs", jobs,
            "must be a non-empty mapping name -> factory or job dict")
    normalised = {name: _job(value) for name, value in jobs.items()}
    singles = {}
    for name, job in normalised.items():  # fail here, not in a rank: bad factory, bad batch
        spec = _resolve(job["factory"])(job["seed"])
        require(isinstance(spec, StepSpec), "factory", job["factory"],
                f"must return a StepSpec, got {type(spec).__name__}")
        _shard(spec.batch, 0, world_size)
        singles[name] = single_process_state(job)
    per_rank = spawn_group(_jobs_worker, world_size, normalised, capture_errors,
                           timeout=timeout)
    return {name: (singles[name], [r[name] for r in per_rank]) for name in normalised}
