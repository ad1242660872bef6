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
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError, require
from invariants._tolerances import tolerance_for

__all__ = [
    "RankConsistentGuard",
    "agree_across_ranks",
    "assert_ddp_step_equivalent",
    "assert_ranks_agree",
    "ddp_equivalence",
    "spawn_group",
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
    require(isinstance(world_size, int) and world_size >= 1, "world_size", world_size,
            "must be an integer >= 1")
    require(timeout > 0, "timeout", timeout, "must be > 0")
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
      InvariantViolation: naming the first step at which a rank disagreed with rank 0.
    """
    __tracebackhide__ = True
    require(len(histories) >= 1, "histories", histories, "needs at least one rank")
    ref = list(histories[0])
    for rank, hist in enumerate(histories[1:], start=1):
        for (s0, d0), (s, d) in zip(ref, hist):
            if s0 != s:
                fail("every rank at the same step", f"rank 0 at step {s0}, rank {rank} at step {s}")
            if d0 != d:
                fail(f"the same {what} on every rank at every step",
                     f"rank {rank} disagreed at step {s}: rank 0 decided {d0}, rank {rank} "
                     f"decided {d}",
                     hint="reduce the decision across ranks (agree_across_ranks) before acting "
                          "on it; a rank that stops alone hangs the others in the next collective")
        if len(hist) != len(ref):
            fail("every rank to run the same number of steps",
                 f"rank 0 ran {len(ref)} steps, rank {rank} ran {len(hist)}")


@invariant_check("DDP")
def assert_ddp_step_equivalent(single: Mapping[str, torch.Tensor],
                               per_rank: Sequence[Mapping[str, torch.Tensor]], *,
                               rtol: float | None = None, atol: float | None = None) -> None:
    """Assert each rank's post-step state equals the single-process step on the full batch.

    Args:
      single: name -> tensor after one single-process step on the concatenated batch
        (parameters, clipped grad norm, clamped delta norms, EMA weights ...).
      per_rank: the same names from every DDP rank after one step on its shard.

    Raises:
      InvariantViolation: naming the rank and the quantity that differs, with the
        assert_close-style report.
    """
    __tracebackhide__ = True
    for rank, state in enumerate(per_rank):
        missing = sorted(set(single) - set(state))
        if missing:
            raise InvalidArgumentError(f"per_rank[{rank}] lacks {missing}")
        for name, ref in single.items():
            got = state[name]
            tol = tolerance_for(ref.dtype if ref.is_floating_point() else torch.float64,
                                rtol=rtol, atol=atol)
            report = compare_tensors(got, ref, tol, what=f"rank {rank}: {name}")
            if report:
                fail("a DDP step on world size "
                     f"{len(per_rank)} to equal the single-process step on the concatenated batch",
                     report, hint="is a quantity computed per rank that must be global "
                                  "(clip the all-reduced gradient, not the local one)?")


# ------------------------------------------------------------ one DDP step vs one process
def _resolve(path: str) -> Callable[..., Any]:
    import importlib
    module, _, attr = path.partition(":")
    require(bool(module and attr), "factory", path, "must be 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError(f"factory={path!r}: cannot resolve it ({exc})") from None


def _shard(batch: Sequence[torch.Tensor], rank: int, world_size: int) -> tuple:
    n = batch[0].shape[0]
    require(n % world_size == 0, "batch size", n, f"must divide by world_size={world_size}")
    k = n // world_size
    return tuple(t[rank * k:(rank + 1) * k] for t in batch)


def one_step(spec: Any, batch: Sequence[torch.Tensor], *, ddp: bool = False,
             clip: str = "global") -> dict[str, torch.Tensor]:
    """One optimizer step of ``spec`` on ``batch``; returns its observable state.

    ``spec`` (from a factory) has: ``model``, ``make_optimizer(params)``,
    ``loss_fn(model, *batch) -> scalar mean loss``, ``max_norm`` (None: no clipping),
    ``observe(model) -> {name: tensor}`` (optional extras: clamp norms, EMA weights).
    ``clip="global"`` clips the all-reduced gradient (correct); ``"per_rank"`` clips each
    rank's local gradient before averaging (the broken variant).
    """
    model = spec.model
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = spec.make_optimizer([p for p in model.parameters() if p.requires_grad])
    opt.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if ddp and clip == "per_rank" and spec.max_norm is not None:
        with net.no_sync():
            spec.loss_fn(net, *batch).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, spec.max_norm)  # local: wrong
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
    else:
        spec.loss_fn(net, *batch).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, spec.max_norm) \
            if spec.max_norm is not None else torch.tensor(0.0)
    opt.step()
    state = {f"param.{name}": p.detach().clone() for name, p in model.named_parameters()}
    state["grad_norm_before_clip"] = norm.detach().clone().reshape(())
    if getattr(spec, "observe", None) is not None:
        state.update({k: v.detach().clone() for k, v in spec.observe(model).items()})
    return state


def ddp_step_worker(rank: int, world_size: int, factory: str, seed: int,
                    clip: str) -> dict[str, torch.Tensor]:
    """Spawned worker: build the spec from ``factory(seed)``, take one DDP step on the shard."""
    spec = _resolve(factory)(seed)
    return one_step(spec, _shard(spec.batch, rank, world_size), ddp=True, clip=clip)


def ddp_equivalence(factory: str, *, seed: int = 0, world_size: int = 2,
                    clip: str = "global", timeout: float = 60.0
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(single-process state, per-rank DDP states) for one step of ``factory(seed)``."""
    require(clip in ("global", "per_rank"), "clip", clip, "must be 'global' or 'per_rank'")
    spec = _resolve(factory)(seed)
    single = one_step(spec, spec.batch)
    per_rank = spawn_group(ddp_step_worker, world_size, factory, seed, clip, timeout=timeout)
    return single, per_rank
