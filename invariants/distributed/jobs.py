"""DDP step jobs by name: one resolver, one DDP step per job, and the single-process reference.

``ddp_equivalence(factory)`` / ``ddp_equivalences(jobs)`` produce the states that
``assert_ddp_step_equivalent`` compares: a factory ``"package.module:function"`` builds a
``StepSpec`` from a seed; one spawned group can run many factories (spawning costs
seconds, a step costs ms). ``resolve`` is the ONE way code is found by name in a spawned
rank (a closure cannot be sent to another process): DDP factories here, and the golden
runs' ``RUNS`` registry (``invariants.golden.run.load_runs``) through the same function.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from invariants._determinism import one_thread
from invariants._errors import InvalidArgumentError
from invariants._validate import require
from invariants.distributed.shard import shard_batch
from invariants.distributed.spawn import HANG_AFTER_S, spawn_group

__all__ = ["StepSpec", "ddp_equivalence", "ddp_equivalences", "run_ddp_jobs"]


class UnresolvedName(InvalidArgumentError):
    """``resolve`` could not import the module or find the attribute (``cause`` says which)."""

    def __init__(self, message: str, cause: Exception):
        super().__init__(message)
        self.cause = cause


def resolve(path: str, *, argument: str = "factory") -> Any:
    """The object a ``"package.module:attribute"`` path names.

    Raises:
      InvalidArgumentError: ``argument=path: must be 'package.module:function'`` for a
        malformed path; ``UnresolvedName`` (an InvalidArgumentError whose ``cause`` is the
        ImportError or AttributeError) when the module or the attribute is missing.
    """
    require(isinstance(path, str), argument, path, "must be 'package.module:function'")
    module, _, attr = path.partition(":")
    require(bool(module and attr), argument, path, "must be 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UnresolvedName(f"{argument}={path!r}: cannot resolve it ({exc})", exc) from None


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
            spec = resolve(job["factory"])(job["seed"])
            shard = shard_batch(spec.batch, rank, world_size, equal=True)
            out[name] = one_step(spec, shard, ddp=True, clip=job["clip"], process_group=group)
        except Exception as exc:  # noqa: BLE001 - recorded for the caller to judge
            if not capture_errors:
                raise
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            dist.barrier()
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
    return out


def single_process_state(job: Any) -> dict[str, torch.Tensor]:
    """The single-process step of a job's reference factory on the whole batch (1 thread)."""
    job = _job(job)
    with one_thread():  # the ranks run one thread each; same kernels, same order
        spec = resolve(job["reference"])(job["seed"])
        return one_step(spec, spec.batch)


def ddp_equivalence(factory: str, *, reference: str | None = None, seed: int = 0,
                    world_size: int = 2, clip: str = "global", timeout: float | None = None,
                    hang_after: float = HANG_AFTER_S
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(single-process state, per-rank DDP states) for one step of ``factory(seed)``.

    ``reference`` (default: ``factory``) builds the single-process step, e.g. the
    non-checkpointed model when ``factory`` checkpoints. One spawned group;
    ``timeout`` and ``hang_after`` as in ``spawn_group``.
    """
    job = {"factory": factory, "reference": reference or factory, "seed": seed, "clip": clip}
    return ddp_equivalences({"job": job}, world_size=world_size, timeout=timeout,
                            hang_after=hang_after)["job"]


def _jobs_worker(rank: int, world_size: int, jobs: dict, capture_errors: bool) -> dict:
    return run_ddp_jobs(rank, world_size, jobs, capture_errors=capture_errors)


def ddp_equivalences(jobs: Mapping[str, Any], *, world_size: int = 2,
                     timeout: float | None = None, hang_after: float = HANG_AFTER_S,
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
        spec = resolve(job["factory"])(job["seed"])
        require(isinstance(spec, StepSpec), "factory", job["factory"],
                f"must return a StepSpec, got {type(spec).__name__}")
        shard_batch(spec.batch, 0, world_size, equal=True)
        singles[name] = single_process_state(job)
    per_rank = spawn_group(_jobs_worker, world_size, normalised, capture_errors,
                           timeout=timeout, hang_after=hang_after)
    return {name: (singles[name], [r[name] for r in per_rank]) for name in normalised}
