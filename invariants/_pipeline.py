"""Training-pipeline invariants (SPEC seed 002, P1-P9).

Every check takes the caller's own objects, not our reference classes:

* P1 any ``torch.optim.Optimizer`` (and optionally its LR scheduler) plus a
  zero-argument ``transition()`` that performs the stage change;
* P2 the curriculum as a list of stages, each a sequence of hashable samples;
* P3 any early-stopping object with ``step(val_loss) -> bool`` (True = stop now);
* P4 any best-checkpoint tracker with ``update(val_loss) -> bool`` (True = a
  checkpoint was written) and a ``best`` attribute;
* P5 any clipping function ``clip(parameters, max_norm)`` shaped like
  ``torch.nn.utils.clip_grad_norm_``;
* P6 any ``torch.optim.lr_scheduler`` instance, a ``step -> lr`` callable or
  the list of learning rates;
* P7 any stateful Grokfast filter ``filter_step(grads) -> filtered grads``;
* P8 any ``split(samples, seed) -> (train, val)`` returning index sequences or
  ``torch.utils.data.Subset``s;
* P9 the source label of every sample of the balanced dataset.

"Improvement" means ``value < best - min_delta`` evaluated in Python floats
(float64), with ``best`` starting at +inf; a NaN value is never an
improvement.  Mathematically equivalent spellings (``best - value >
min_delta``) can round differently when the gap is within an ulp of
``min_delta``; see docs/curriculum_lm.md.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
from hypothesis import strategies as st

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (finite_number, require, require_non_negative, require_positive,
                                  require_tensor, unravel)
from invariants._strategies import _as_strategy, values_around
from invariants._tolerances import tolerance_for

__all__ = [
    "LRScheduleConfig",
    "assert_best_checkpoint_tracks_minimum",
    "assert_curriculum_progresses",
    "assert_early_stopping_follows_patience",
    "assert_gradients_clipped",
    "assert_grokfast_filter_exact",
    "assert_lr_schedule_warmup_cosine",
    "assert_sources_balanced",
    "assert_stage_boundary_keeps_optimizer_state",
    "assert_validation_split_sound",
    "expected_early_stop",
    "gradient_sets",
    "lr_schedule_configs",
    "split_sizes",
    "val_loss_sequences",
]

# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6): just below the
# cap the coefficient is already < 1 (measured; see docs/curriculum_lm.md).
TORCH_CLIP_EPS = 1e-6


# ------------------------------------------------------------------ validation
def require_patience(patience: Any) -> None:
    require(isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1,
            "patience", patience, "must be an integer >= 1 (checks without improvement "
            "before stopping)")


def require_min_delta(min_delta: Any) -> None:
    require(finite_number(min_delta) and min_delta >= 0, "min_delta", min_delta,
            "must be a finite number >= 0 (the improvement a new best must exceed)")


def require_max_norm(max_norm: Any) -> None:
    require(finite_number(max_norm) and max_norm > 0, "max_norm", max_norm,
            "must be a finite number > 0 (the cap on the total gradient norm)")



def _losses(name: str, values: Any) -> list[float]:
    """``values`` as a non-empty list of Python floats (NaN allowed: never an improvement)."""
    require(isinstance(values, Sequence) and not isinstance(values, (str, bytes)), name,
            values, "must be a sequence of numbers")
    require(len(values) > 0, name, values, "must be non-empty (a run with no check proves "
            "nothing)")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(float(v))
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(f"{name}[{i}]={v!r:.60}: must be a number") from None
    return out


def _is_improvement(value: float, best: float, min_delta: float) -> bool:
    return value < best - min_delta


def expected_early_stop(val_losses: Sequence[float], *, patience: int,
                        min_delta: float) -> int | None:
    """The 0-based check index at which early stopping must stop, or None.

    The counter of checks without improvement resets on every improvement
    (``value < best - min_delta``) and stopping happens on the check where it
    reaches ``patience``.
    """
    require_patience(patience)
    require_min_delta(min_delta)
    best, bad = math.inf, 0
    for i, value in enumerate(val_losses):
        if _is_improvement(float(value), best, min_delta):
            best, bad = float(value), 0
        else:
            bad += 1
            if bad >= patience:
                return i
    return None


# ---------------------------------------------------------------------- P1
def _state_snapshot(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy(optimizer.state_dict())


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return f"tensor({float(value):.6g})"
        return f"Tensor(shape={tuple(value.shape)}, norm={float(value.double().norm()):.6g})"
    return repr(value)


@invariant_check("P1")
def assert_stage_boundary_keeps_optimizer_state(
        optimizer: torch.optim.Optimizer, transition: Callable[[], Any], *,
        scheduler: Any = None) -> None:
    """Assert a curriculum stage change leaves optimizer and LR schedule untouched.

    Snapshots ``optimizer.state_dict()`` (and ``scheduler.state_dict()``), calls
    ``transition()`` — the caller's stage change — and compares with the
    optimizer (and scheduler) in use afterwards.  ``transition`` returns the
    optimizer to use from now on, or ``(optimizer, scheduler)``, or None (the
    same objects).  Per-parameter state (moments, step counts, any filter
    buffers) must be bit-identical, every param-group hyper-parameter (lr
    included) equal, and the scheduler's position (``last_epoch``) and last LR
    unchanged: the schedule continues without a jump.

    Raises:
      InvariantViolation: naming the first parameter/key whose state was lost or
        changed, or the param-group/scheduler field that jumped.
      InvalidArgumentError: if ``optimizer`` is not an Optimizer or
        ``transition`` is not callable.
    """
    __tracebackhide__ = True
    require(isinstance(optimizer, torch.optim.Optimizer), "optimizer", optimizer,
            "must be a torch.optim.Optimizer")
    require(callable(transition), "transition", transition,
            "must be a zero-argument callable performing the stage change")
    before = _state_snapshot(optimizer)
    for pid, state in before["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                require(bool(torch.isfinite(value).all()), f"optimizer.state[{pid}][{key!r}]",
                        value, "must be finite before the stage boundary (NaN state cannot "
                        "be shown to survive: NaN equals nothing)")
    sched_before = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    result = transition()
    new_opt, new_sched = optimizer, scheduler
    if isinstance(result, tuple):
        require(len(result) == 2, "transition()", result, "must return opt or (opt, scheduler)")
        new_opt, new_sched = result
    elif result is not None:
        new_opt = result
    require(isinstance(new_opt, torch.optim.Optimizer), "transition()", new_opt,
            "must return the optimizer in use after the stage change")
    after = new_opt.state_dict()
    hint = "keep one optimizer (and scheduler) for the whole run; switch only the data"
    lost = [k for k in before["state"] if k not in after["state"]]
    if lost:
        keys = sorted(before["state"][lost[0]])
        fail("per-parameter optimizer state to survive the stage boundary",
             f"state of {len(lost)} of {len(before['state'])} parameters was dropped "
             f"(first: param {lost[0]}, keys {keys}); was the optimizer re-created?", hint=hint)
    for pid, state in before["state"].items():
        new_state = after["state"][pid]
        for key, value in state.items():
            if key not in new_state:
                fail("per-parameter optimizer state to survive the stage boundary",
                     f"param {pid}: key {key!r} missing after the boundary", hint=hint)
            new_value = new_state[key]
            if isinstance(value, torch.Tensor):
                same = isinstance(new_value, torch.Tensor) and value.shape == new_value.shape \
                    and (torch.equal(new_value, value) or compare_tensors(new_value, value, tolerance_for(torch.float64),
                                        what=f"param {pid} {key!r}", exact=True) is None)
            else:
                same = new_value == value
            if not same:
                fail("per-parameter optimizer state bit-identical across the stage boundary",
                     f"param {pid} {key!r}: before {_describe(value)}, after "
                     f"{_describe(new_value)}", hint=hint)
    if len(before["param_groups"]) != len(after["param_groups"]):
        fail("the same param groups after the stage boundary",
             f"{len(before['param_groups'])} groups before, {len(after['param_groups'])} after")
    for g, (group, new_group) in enumerate(zip(before["param_groups"], after["param_groups"])):
        for key, value in group.items():
            if key == "params":
                continue
            if new_group.get(key) != value:
                fail("param-group hyper-parameters (lr included) unchanged by the stage boundary",
                     f"group {g} {key!r}: {value!r} before, {new_group.get(key)!r} after"
                     + (" (an LR jump)" if key == "lr" else ""), hint=hint)
    if sched_before is not None:
        require(new_sched is not None and callable(getattr(new_sched, "state_dict", None)),
                "scheduler after transition", new_sched, "must be an LR scheduler")
        sched_after = new_sched.state_dict()
        for key in ("last_epoch", "_last_lr"):
            if key in sched_before and sched_before[key] != sched_after.get(key):
                fail("the LR schedule to continue across the stage boundary",
                     f"scheduler {key}: {sched_before[key]!r} before, "
                     f"{sched_after.get(key)!r} after (the schedule restarted)", hint=hint)


# ---------------------------------------------------------------------- P2
@invariant_check("P2")
def assert_curriculum_progresses(stages: Sequence[Sequence[Hashable]], *,
                                 difficulty: Callable[[Any], float] = len) -> None:
    """Assert each stage's data differs from the previous one and difficulty never drops.

    Args:
      stages: the curriculum, one sequence of hashable samples per stage, in order.
      difficulty: sample -> number; the stage's difficulty is its maximum
        (default ``len``: the longest sample, the seed's "filter by length").

    Raises:
      InvariantViolation: if a stage is empty, holds the same set of samples as
        the stage before it (the seed's stage 3 = stage 2), or its maximum
        difficulty is lower than the previous stage's.
      InvalidArgumentError: if fewer than one stage is given.
    """
    __tracebackhide__ = True
    require(isinstance(stages, Sequence) and len(stages) >= 1, "stages", stages,
            "must be a non-empty sequence of stages")
    require(callable(difficulty), "difficulty", difficulty, "must be callable sample -> number")
    prev_set: set | None = None
    prev_max = -math.inf
    for k, stage in enumerate(stages, start=1):
        require(isinstance(stage, Sequence) and not isinstance(stage, (str, bytes)),
                f"stages[{k - 1}]", stage, "must be a sequence of samples")
        if len(stage) == 0:
            fail("every curriculum stage to hold data", f"stage {k} is empty")
        try:
            current = set(stage)
        except TypeError:
            raise InvalidArgumentError(
                f"stages[{k - 1}]={stage!r:.60}: samples must be hashable") from None
        levels = []
        for sample in stage:
            try:
                levels.append(float(difficulty(sample)))
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(
                    f"difficulty({sample!r:.40}): must return a number (stage {k}); it failed "
                    f"with {type(exc).__name__}: {str(exc)[:60]}") from None
            require(math.isfinite(levels[-1]), f"difficulty({sample!r:.40})", levels[-1],
                    f"must be finite (stage {k}); NaN compares False with every bound")
        j = max(range(len(levels)), key=levels.__getitem__)
        hardest, level = stage[j], levels[j]
        if prev_set is not None and current == prev_set:
            fail("each curriculum stage to differ from the previous one",
                 f"stage {k} holds exactly the same {len(current)} distinct samples as "
                 f"stage {k - 1}", hint="a stage that repeats its predecessor adds no "
                 "difficulty (seed 002: ADVANCED = REASONING)")
        if level < prev_max:
            fail("non-decreasing difficulty (max over each stage)",
                 f"stage {k} max difficulty {level:g} < stage {k - 1} max {prev_max:g} "
                 f"(hardest of stage {k}: {hardest!r})")
        prev_set, prev_max = current, level


# ---------------------------------------------------------------------- P3
@invariant_check("P3")
def assert_early_stopping_follows_patience(stopper: Any, val_losses: Sequence[float], *,
                                           patience: int, min_delta: float) -> None:
    """Assert ``stopper`` stops exactly after ``patience`` checks without improvement.

    Protocol: ``stopper.step(val_loss) -> bool`` is called once per validation
    check with a fresh stopper and returns True when training must stop.  The
    expected stop is ``expected_early_stop(val_losses, ...)``: never while
    improving by more than ``min_delta``, counter reset on every improvement.
    Feeding ends at the first True.

    Raises:
      InvariantViolation: if it stops at a different check, or not at all.
      InvalidArgumentError: for patience < 1, negative min_delta, or a stopper
        without ``step``.
    """
    __tracebackhide__ = True
    require_patience(patience)
    require_min_delta(min_delta)
    require(callable(getattr(stopper, "step", None)), "stopper", stopper,
            "must have a step(val_loss) -> bool method")
    val_losses = _losses("val_losses", val_losses)
    want = expected_early_stop(val_losses, patience=patience, min_delta=min_delta)
    got = None
    for i, value in enumerate(val_losses):
        if bool(stopper.step(float(value))):
            got = i
            break
    if got == want:
        return
    shown = ", ".join(f"{float(v):.6g}" for v in val_losses[: (want if want is not None
                                                                else len(val_losses)) + 1])
    if want is None:
        fail(f"no stop: no run of {patience} checks without improvement > {min_delta:g}",
             f"stopped at check {got + 1} of {len(val_losses)} (val_loss "
             f"{float(val_losses[got]):.6g}); sequence {shown}",
             hint="stop only after `patience` consecutive non-improving checks; reset the "
                  "counter on improvement")
    fail(f"a stop at check {want + 1}: {patience} consecutive checks without improvement "
         f"> min_delta={min_delta:g}",
         ("never stopped" if got is None else f"stopped at check {got + 1}")
         + f" (val_loss up to check {want + 1}: {shown})",
         hint="no early stopping at all? the seed trained 10 epochs on a flat val_loss 2.5"
         if got is None else "count checks without improvement > min_delta; reset on improvement")


# ---------------------------------------------------------------------- P4
@invariant_check("P4")
def assert_best_checkpoint_tracks_minimum(tracker: Any, val_losses: Sequence[float], *,
                                          min_delta: float) -> None:
    """Assert a checkpoint is written iff ``val_loss < best - min_delta``.

    Protocol: a fresh ``tracker``; ``tracker.update(val_loss) -> bool`` per
    check returns True iff it wrote a checkpoint; ``tracker.best`` is the
    value of the best checkpoint.  ``best`` must be the val_loss of the last
    checkpoint written, which is the running minimum when ``min_delta == 0``
    and within ``min_delta`` of it otherwise.

    Raises:
      InvariantViolation: at the first check where a save happened that should
        not have, or did not happen when it should, or ``best`` is wrong.
      InvalidArgumentError: for negative min_delta or a tracker without ``update``.
    """
    __tracebackhide__ = True
    require_min_delta(min_delta)
    require(callable(getattr(tracker, "update", None)) and hasattr(tracker, "best"), "tracker",
            tracker, "must have an update(val_loss) -> bool method and a best attribute")
    val_losses = _losses("val_losses", val_losses)
    best, best_at = math.inf, None
    running_min = math.inf
    for i, raw in enumerate(val_losses):
        value = float(raw)
        running_min = min(running_min, value) if not math.isnan(value) else running_min
        should = _is_improvement(value, best, min_delta)
        saved = bool(tracker.update(value))
        if saved != should:
            where = "never" if best_at is None else f"at check {best_at + 1}"
            fail(f"a checkpoint at check {i + 1} iff val_loss < best - min_delta "
                 f"({value:.6g} < {best:.6g} - {min_delta:g} is {should})",
                 f"{'wrote' if saved else 'did not write'} one (best so far {best:.6g}, "
                 f"saved {where}; running minimum {running_min:.6g})",
                 hint="compare against the best validation loss, and require the improvement "
                      "to exceed min_delta" if not saved else
                      "apply min_delta: only a real improvement may replace the best checkpoint")
        if should:
            best, best_at = value, i
        try:
            got_best = float(getattr(tracker, "best"))
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(f"tracker.best={tracker.best!r:.60}: must be a number") \
                from None
        if not got_best == best:  # exact; inf == inf, and NaN or -inf never equals +inf
            fail(f"tracker.best == val_loss of the last checkpoint ({best:.6g}) after check "
                 f"{i + 1}", f"tracker.best = {got_best:.6g}")


# ---------------------------------------------------------------------- P5
@invariant_check("P5")
def assert_gradients_clipped(clip: Callable[..., Any], grads: Sequence[torch.Tensor], *,
                             max_norm: float) -> None:
    """Assert clipping caps the total L2 norm, keeps the direction, and is a no-op below the cap.

    The check builds one leaf parameter per gradient (clones; ``grads`` are not
    modified), calls ``clip(parameters, max_norm)`` and compares:

    * total norm after ≤ max_norm·(1 + rtol) + atol (dtype table);
    * every gradient is ``c · g`` with one common ``c`` in [0, 1] (within tolerance);
    * if the total norm is ≤ max_norm·(1 − rtol) − 1e-6, the gradients are
      bit-identical.  The 1e-6 is torch's own: ``clip_grad_norm_`` scales by
      ``max_norm / (total + 1e-6)``, so just below the cap it already shrinks.

    Raises:
      InvariantViolation: naming which of the three failed, with norms; a
        non-finite gradient element after clipping always fails (first one named).
      InvalidArgumentError: for max_norm <= 0, an empty or non-finite gradient set,
        an empty gradient tensor, or mixed dtypes.
    """
    __tracebackhide__ = True
    require_max_norm(max_norm)
    require(callable(clip), "clip", clip, "must be callable (parameters, max_norm)")
    require(isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)), "grads", grads,
            "must be a sequence of gradient tensors")
    require(len(grads) >= 1, "grads", grads, "must hold at least one gradient tensor")
    for i, g in enumerate(grads):
        require_tensor(f"grads[{i}]", g)
        require(g.is_floating_point(), f"grads[{i}].dtype", g.dtype, "must be floating")
        require(g.numel() > 0, f"grads[{i}].shape", tuple(g.shape),
                "must be non-empty (clipping no element proves nothing)")
        require(bool(torch.isfinite(g).all()), f"grads[{i}]", g, "must be finite")
        require(g.dtype == grads[0].dtype, f"grads[{i}].dtype", g.dtype,
                f"must equal grads[0].dtype={grads[0].dtype}")
    tol = tolerance_for(grads[0].dtype)
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g.clone()
        params.append(p)
    clip(params, max_norm)
    before = torch.cat([g.detach().double().flatten() for g in grads])
    after = torch.cat([p.grad.detach().double().flatten() for p in params])
    norm_before, norm_after = float(before.norm()), float(after.norm())
    nonfinite = ~torch.isfinite(after)
    if bool(nonfinite.any()):
        sizes = [p.grad.numel() for p in params]
        flat = int(torch.nonzero(nonfinite)[0])
        i = next(k for k in range(len(sizes)) if flat < sum(sizes[:k + 1]))
        local = flat - sum(sizes[:i])
        index = unravel(local, params[i].grad.shape)
        fail(f"finite gradients after clipping to max_norm={max_norm:g}",
             f"{int(nonfinite.sum())} of {after.numel()} elements are non-finite; first "
             f"grads[{i}]{list(index)} = {float(params[i].grad[index])!r} (was "
             f"{float(grads[i][index])!r}; total norm before {norm_before:.9g})",
             hint="divide by (total_norm + eps), never by a norm that can be 0")
    allowed = max_norm * (1 + tol.rtol) + tol.atol
    if norm_after > allowed:
        fail(f"total grad norm <= max_norm={max_norm:g} after clipping (allowed {allowed:.9g} "
             f"with {grads[0].dtype} tolerance)",
             f"{norm_after:.9g} (before clipping {norm_before:.9g}; {len(grads)} tensors)",
             hint="call torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) "
                  "between backward() and optimizer.step()")
    if norm_before <= max_norm * (1 - tol.rtol) - TORCH_CLIP_EPS:
        for i, (g, p) in enumerate(zip(grads, params)):
            report = compare_tensors(p.grad, g, tol, what=f"grads[{i}] after vs before",
                                     exact=True)
            if report:
                fail(f"no change below the cap (total norm {norm_before:.9g} <= "
                     f"max_norm={max_norm:g})", report)
        return
    denom = float(before @ before)
    coef = float(after @ before) / denom if denom > 0 else 1.0
    if not -tol.rtol <= coef <= 1 + tol.rtol:
        fail("a scaling coefficient in [0, 1]", f"c = {coef:.9g}")
    for i, (g, p) in enumerate(zip(grads, params)):
        report = compare_tensors(p.grad.double(), coef * g.double(),
                                 tolerance_for(torch.float64, rtol=tol.rtol, atol=tol.atol),
                                 what=f"grads[{i}] after vs c·before (c = {coef:.6g})")
        if report:
            fail("clipping to scale every gradient by one common factor (direction kept)",
                 report, hint="clip the total norm over all parameters, not each tensor "
                              "or element separately")


# ---------------------------------------------------------------------- P6
def _lr_values(schedule: Any, total_steps: int) -> list[float]:
    if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
        values = [float(schedule.get_last_lr()[0])]
        with warnings.catch_warnings():  # stepping without optimizer.step() warns
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(total_steps):
                schedule.step()
                values.append(float(schedule.get_last_lr()[0]))
        return values
    if callable(schedule):
        values = [schedule(t) for t in range(total_steps + 1)]
        name = "schedule(step)"
    else:
        require(isinstance(schedule, Sequence) and len(schedule) == total_steps + 1, "schedule",
                schedule, f"must be an LR scheduler, a callable step -> lr, or total_steps + 1 = "
                          f"{total_steps + 1} learning rates")
        values, name = list(schedule), "schedule"
    out = []
    for t, v in enumerate(values):
        try:
            out.append(float(v))
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(f"{name}[{t}]={v!r:.60}: must be a number") from None
    return out


@invariant_check("P6")
def assert_lr_schedule_warmup_cosine(schedule: Any, *, total_steps: int, warmup_steps: int,
                                     peak_lr: float, eta_min: float = 0.0,
                                     rtol: float = 1e-9) -> None:
    """Assert a linear-warmup + cosine-decay learning-rate schedule.

    ``schedule`` is a fresh ``torch.optim.lr_scheduler`` (group 0 is read, then
    it is stepped ``total_steps`` times), a callable ``step -> lr`` or the list
    ``lr(0..total_steps)``.  With slack ``rtol·peak_lr``:

    * non-decreasing for steps 0..warmup_steps, non-increasing afterwards;
    * within [0, peak] during warmup and [eta_min, peak] afterwards;
    * ``lr(warmup_steps) == peak`` and ``lr(total_steps) == eta_min``;
    * continuous: no step changes the LR by more than the larger of the warmup
      increment ``peak/warmup_steps`` and the steepest cosine step
      ``(peak - eta_min)·π / (2·(total_steps - warmup_steps))``.

    Raises:
      InvariantViolation: naming the first step that breaks a rule.
      InvalidArgumentError: warmup_steps >= total_steps, eta_min > peak_lr, ...
    """
    __tracebackhide__ = True
    require(isinstance(total_steps, int) and total_steps >= 1, "total_steps", total_steps,
            "must be an integer >= 1")
    require(isinstance(warmup_steps, int) and warmup_steps >= 0, "warmup_steps", warmup_steps,
            "must be an integer >= 0")
    require(warmup_steps < total_steps, "warmup_steps", warmup_steps,
            f"must be < total_steps={total_steps} (warmup longer than the schedule)")
    require_positive("peak_lr", peak_lr)
    require_non_negative("eta_min", eta_min)
    require(eta_min <= peak_lr, "eta_min", eta_min, f"must be <= peak_lr={peak_lr:g}")
    require_non_negative("rtol", rtol)
    lrs = _lr_values(schedule, total_steps)
    slack = rtol * peak_lr
    w, t = warmup_steps, total_steps
    for step, lr in enumerate(lrs):
        if not math.isfinite(lr):
            fail("a finite learning rate at every step", f"lr({step}) = {lr}")
        low = 0.0 if step < w else eta_min
        if not low - slack <= lr <= peak_lr + slack:
            fail(f"lr within [{low:g}, peak={peak_lr:g}] at step {step}",
                 f"lr({step}) = {lr:.9g}")
    for step in range(1, t + 1):
        prev, cur = lrs[step - 1], lrs[step]
        if step <= w and cur < prev - slack:
            fail("a non-decreasing LR during warmup",
                 f"lr({step}) = {cur:.9g} < lr({step - 1}) = {prev:.9g}")
        if step > w and cur > prev + slack:
            fail(f"a non-increasing LR after warmup (step {w})",
                 f"lr({step}) = {cur:.9g} > lr({step - 1}) = {prev:.9g}")
    if abs(lrs[w] - peak_lr) > slack:
        fail(f"lr(warmup_steps={w}) == peak_lr={peak_lr:g}", f"lr({w}) = {lrs[w]:.9g}")
    if abs(lrs[t] - eta_min) > slack:
        fail(f"the schedule to reach eta_min={eta_min:g} at step total_steps={t}",
             f"lr({t}) = {lrs[t]:.9g} (lr(0) = {lrs[0]:.9g}, a constant LR?)",
             hint="decay the LR: linear warmup then cosine to eta_min")
    max_jump = max(peak_lr / w if w else 0.0,
                   (peak_lr - eta_min) * math.pi / (2 * (t - w))) * (1 + 1e-9) + slack
    jumps = [abs(lrs[s] - lrs[s - 1]) for s in range(1, t + 1)]
    worst = max(range(len(jumps)), key=jumps.__getitem__)
    if jumps[worst] > max_jump:
        fail(f"a continuous schedule: |lr(s) - lr(s-1)| <= {max_jump:.9g}",
             f"jump of {jumps[worst]:.9g} at step {worst + 1} (lr {lrs[worst]:.9g} -> "
             f"{lrs[worst + 1]:.9g})")


# ---------------------------------------------------------------------- P7
@invariant_check("P7")
def assert_grokfast_filter_exact(filter_step: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
                                 grad_steps: Sequence[Sequence[torch.Tensor]], *,
                                 alpha: float, lamb: float) -> None:
    """Assert the Grokfast-EMA filter ``g ← g + λ·EMA(g)`` step by step.

    ``filter_step`` is stateful (a fresh filter) and is called once per step
    with that step's gradient list.  Reference recursion (Lee et al. 2024,
    ``gradfilter_ema``), computed in float64: ``ema₁ = g₁``;
    ``emaₜ = α·emaₜ₋₁ + (1 − α)·gₜ``; output ``gₜ + λ·emaₜ``.  With λ = 0 the
    output must equal the input bit for bit; otherwise within the dtype
    tolerance scaled by the number of steps.

    Raises:
      InvariantViolation: at the first step/tensor that differs, with the worst element.
      InvalidArgumentError: alpha outside [0, 1], negative λ, ragged gradient lists.
    """
    __tracebackhide__ = True
    require(isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0, "alpha", alpha,
            "must lie in [0, 1] (EMA momentum)")
    require_non_negative("lamb", lamb)
    require(callable(filter_step), "filter_step", filter_step,
            "must be callable list[Tensor] -> list[Tensor]")
    require(isinstance(grad_steps, Sequence) and not isinstance(grad_steps, (str, bytes)),
            "grad_steps", grad_steps, "must be a sequence of steps, each a list of tensors")
    require(len(grad_steps) >= 1, "grad_steps", grad_steps, "must hold at least one step")
    for t, grads in enumerate(grad_steps):
        require(isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)),
                f"grad_steps[{t}]", grads, "must be a list of gradient tensors")
    n = len(grad_steps[0])
    require(n >= 1, "grad_steps[0]", grad_steps[0], "must be non-empty (hold at least one tensor)")
    for t, grads in enumerate(grad_steps):
        for i, g in enumerate(grads):
            require_tensor(f"grad_steps[{t}][{i}]", g)
            require(g.numel() > 0, f"grad_steps[{t}][{i}].shape", tuple(g.shape),
                    "must be non-empty")
            require(bool(torch.isfinite(g).all()), f"grad_steps[{t}][{i}]", g, "must be finite")
    emas: list[torch.Tensor] | None = None
    for step, grads in enumerate(grad_steps, start=1):
        require(len(grads) == n, f"grad_steps[{step - 1}]", grads,
                f"must hold {n} tensors like grad_steps[0]")
        inputs = [g.clone() for g in grads]
        out = list(filter_step(inputs))
        require(len(out) == n, "filter_step(...)", out, f"must return {n} tensors")
        for i, o in enumerate(out):
            require_tensor(f"filter_step(...)[{i}]", o)
        g64 = [g.double() for g in grads]
        emas = g64 if emas is None else [alpha * e + (1 - alpha) * g for e, g in zip(emas, g64)]
        for i, (g, o, e) in enumerate(zip(grads, out, emas)):
            if lamb == 0:
                report = compare_tensors(o, g, tolerance_for(g.dtype),
                                         what=f"step {step} grads[{i}] filtered vs raw", exact=True)
                if report:
                    fail("lamb = 0 to leave gradients unchanged (identity filter)", report)
                continue
            tol = tolerance_for(g.dtype)
            scaled = tolerance_for(g.dtype, rtol=tol.rtol * (2 + step), atol=tol.atol)
            report = compare_tensors(o.double(), g.double() + lamb * e, scaled,
                                     what=f"step {step} grads[{i}] vs g + λ·EMA(g)")
            if report:
                fail(f"the EMA recursion ema = {alpha:g}·ema + {1 - alpha:g}·g, output g + "
                     f"{lamb:g}·ema", report,
                     hint="alpha weighs the old EMA (Grokfast's momentum), 1-alpha the new grad")


# ---------------------------------------------------------------------- P8
def _indices(part: Any, name: str) -> list[int]:
    raw = getattr(part, "indices", part)
    try:
        out = [int(i) for i in raw]
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"{name}={part!r:.80}: must be a sequence of sample indices or a Subset") from None
    return out


@invariant_check("P8")
def assert_validation_split_sound(split: Callable[[Sequence[Any], int], Any],
                                  samples: Sequence[Any], *, fraction: float = 0.2,
                                  seed: int = 0) -> None:
    """Assert a validation split is disjoint, complete, the right size and deterministic.

    ``split(samples, seed) -> (train, val)``, each a sequence of indices into
    ``samples`` or a ``torch.utils.data.Subset``.  Rules: no index in both
    parts (nor twice in one), every index in exactly one part,
    ``|val| == round(fraction · n)`` ± 1, and a second call with the same seed
    gives the same split.  Indices, not contents: de-duplicate the data before
    splitting (the reference pipeline does) if repeated samples are possible.

    Raises:
      InvariantViolation: for overlap (count and first index), missing samples,
        a wrong size or a non-deterministic split.
      InvalidArgumentError: fraction outside (0, 1) or an empty sample list.
    """
    __tracebackhide__ = True
    require(isinstance(fraction, float) and 0.0 < fraction < 1.0, "fraction", fraction,
            "must be a float in (0, 1)")
    require(hasattr(samples, "__len__") and len(samples) >= 1, "samples", samples,
            "must be a non-empty sequence (hold at least one sample)")
    require(callable(split), "split", split, "must be callable split(samples, seed)")
    n = len(samples)
    train, val = (_indices(p, name) for p, name in zip(split(samples, seed), ("train", "val")))
    overlap = sorted(set(train) & set(val))
    if overlap:
        fail("validation samples disjoint from training samples",
             f"{len(overlap)} of {len(val)} validation indices are also in training "
             f"(first: {overlap[0]}); n={n}",
             hint="split once: a permutation, the first round(0.2·n) to validation and "
                  "the rest to training; never draw validation from the training set")
    for name, part in (("train", train), ("val", val)):
        dupes = [i for i, c in Counter(part).items() if c > 1]
        if dupes:
            fail(f"each index at most once in {name}",
                 f"{len(dupes)} repeated (first: {dupes[0]})")
    missing = sorted(set(range(n)) - set(train) - set(val))
    outside = sorted((set(train) | set(val)) - set(range(n)))
    if missing or outside:
        fail(f"every sample index 0..{n - 1} in exactly one part",
             f"{len(missing)} missing (first: {missing[:1]}), {len(outside)} out of range "
             f"(first: {outside[:1]})")
    want = round(fraction * n)
    if abs(len(val) - want) > 1:
        fail(f"|val| = round({fraction:g}·{n}) = {want} ± 1", f"|val| = {len(val)}, "
             f"|train| = {len(train)}")
    again = tuple(_indices(p, name) for p, name in zip(split(samples, seed), ("train", "val")))
    if again != (train, val):
        fail(f"the same split for the same seed={seed}", "a second call differs",
             hint="draw the permutation from a torch.Generator seeded with `seed`")


# ---------------------------------------------------------------------- P9
@invariant_check("P9")
def assert_sources_balanced(sources: Sequence[str], *, caps: Mapping[str, int],
                            available: Mapping[str, int] | None = None) -> None:
    """Assert every data source contributes at most its cap (and no less than it can).

    Args:
      sources: the source name of every sample in the balanced dataset.
      caps: source -> the configured maximum count.
      available: source -> samples it had before balancing; if given, each
        source must contribute exactly ``min(cap, available)`` (none starved).

    Raises:
      InvariantViolation: naming the source furthest over its cap (with its share
        of the dataset), an uncapped source, or a starved source.
      InvalidArgumentError: for a negative or non-integer cap.
    """
    __tracebackhide__ = True
    require(isinstance(caps, Mapping) and len(caps) > 0, "caps", caps,
            "must be a non-empty mapping source -> cap")
    for name, cap in caps.items():
        require(isinstance(cap, int) and cap >= 0, f"caps[{name!r}]", cap,
                "must be an integer >= 0")
    require(isinstance(sources, Sequence) and not isinstance(sources, (str, bytes)), "sources",
            sources, "must be a sequence of source names (one per sample)")
    # empty is meaningful only against `available` (every source must then have had none)
    require(len(sources) > 0 or available is not None, "sources", sources,
            "must be non-empty unless `available` is given (caps on no sample prove nothing)")
    if available is not None:
        for name, n in available.items():
            require(isinstance(n, int) and n >= 0, f"available[{name!r}]", n,
                    "must be an integer >= 0")
    counts = Counter(sources)
    total = max(1, len(sources))
    uncapped = sorted(set(counts) - set(caps))
    if uncapped:
        fail("only capped sources in the balanced dataset",
             f"{len(uncapped)} source(s) without a cap, first {uncapped[0]!r} with "
             f"{counts[uncapped[0]]} samples")
    over = {s: counts[s] - caps[s] for s in counts if counts[s] > caps[s]}
    if over:
        worst = max(over, key=over.__getitem__)
        fail("each source capped at its configured count",
             f"{len(over)} source(s) over their cap; worst {worst!r}: {counts[worst]} samples "
             f"> cap {caps[worst]} ({100.0 * counts[worst] / total:.1f}% of {len(sources)})",
             hint="down-sample each source to its cap before concatenating (seed 002: "
                  "HellaSwag was 45% of the data)")
    if available is not None:
        for name, cap in caps.items():
            want = min(cap, int(available.get(name, 0)))
            if counts.get(name, 0) != want:
                fail(f"source {name!r} to contribute min(cap={cap}, available="
                     f"{available.get(name, 0)}) = {want} samples", f"{counts.get(name, 0)}")


# ---------------------------------------------------------------- strategies
@dataclass(frozen=True)
class LRScheduleConfig:
    """A warmup + cosine schedule: ``total_steps`` scheduler steps, the first ``warmup_steps`` linear."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        require(isinstance(self.total_steps, int) and self.total_steps >= 1, "total_steps",
                self.total_steps, "must be an integer >= 1")
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
                self.warmup_steps, "must be an integer >= 0")
        require(self.warmup_steps < self.total_steps, "warmup_steps", self.warmup_steps,
                f"must be < total_steps={self.total_steps} (warmup longer than the schedule)")
        require_positive("peak_lr", self.peak_lr)
        require_non_negative("eta_min", self.eta_min)
        require(self.eta_min <= self.peak_lr, "eta_min", self.eta_min,
                f"must be <= peak_lr={self.peak_lr:g}")


@st.composite
def _lr_schedule_config(draw, total, fraction, peak, eta_ratio):
    t = draw(total)
    f = draw(fraction)
    w = min(t - 1, int(f * t))
    p = draw(peak)
    return LRScheduleConfig(total_steps=t, warmup_steps=w, peak_lr=p, eta_min=p * draw(eta_ratio))


def lr_schedule_configs(*, min_total_steps: int = 1, max_total_steps: int = 300,
                        warmup_fraction: Any = None, peak_lr: Any = None,
                        eta_min_ratio: Any = None) -> st.SearchStrategy[LRScheduleConfig]:
    """Schedules from 1 step up, warmup fractions 0, tiny, 0.1, 0.5 and just below 1.

    ``warmup_steps = min(total - 1, int(fraction·total))``; ``eta_min = ratio·peak``
    with ratios 0, 1e-4 (the seed's 1e-6 against lr 0.01) and up to 1.
    """
    require(isinstance(min_total_steps, int) and min_total_steps >= 1, "min_total_steps",
            min_total_steps, "must be an integer >= 1")
    if max_total_steps < min_total_steps:
        raise InvalidArgumentError(f"Cannot have max_total_steps={max_total_steps} < "
                                   f"min_total_steps={min_total_steps}")
    total = st.one_of(st.sampled_from(sorted({min_total_steps, min(min_total_steps + 1,
                                                                   max_total_steps),
                                              max_total_steps})),
                      st.integers(min_total_steps, max_total_steps))
    frac = st.one_of(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.999]), st.floats(0.0, 0.999)) \
        if warmup_fraction is None else _as_strategy(warmup_fraction, "warmup_fraction")
    peak = st.one_of(st.sampled_from([0.01, 0.005, 1.0]), st.floats(1e-6, 10.0)) \
        if peak_lr is None else _as_strategy(peak_lr, "peak_lr")
    ratio = st.one_of(st.sampled_from([0.0, 1e-4, 0.1]), st.floats(0.0, 1.0)) \
        if eta_min_ratio is None else _as_strategy(eta_min_ratio, "eta_min_ratio")
    return _lr_schedule_config(total, frac, peak, ratio)


VAL_LOSS_KINDS = ("flat", "improving", "noisy", "improving_then_diverging")


@st.composite
def _val_losses(draw, kind, size, start, step, min_value, max_value):
    k = draw(kind)
    n = draw(size)
    v0 = draw(start)
    if k == "flat":
        return [v0] * n
    if k == "noisy":
        return [draw(st.floats(min_value, max_value)) for _ in range(n)]
    turn = n if k == "improving" else draw(st.integers(1, n))
    out, v = [], v0
    for i in range(n):
        out.append(v)
        d = draw(step)
        v = max(min_value, v - d) if i + 1 < turn else min(max_value, v + d)
    return out


def val_loss_sequences(*, kind: Any = None, min_size: int = 1, max_size: int = 12,
                       min_delta: float = 0.01, min_value: float = 0.1,
                       max_value: float = 5.0) -> st.SearchStrategy[list[float]]:
    """Validation-loss curves: flat (the seed's 2.5 forever), improving, noisy, improving-then-diverging.

    Step sizes sit on the ``min_delta`` edge (0, half, just below, at, just
    above, double) as well as large, so "improvement" decisions are tested
    where they flip.
    """
    require(isinstance(min_size, int) and min_size >= 1, "min_size", min_size,
            "must be an integer >= 1")
    if max_size < min_size:
        raise InvalidArgumentError(f"Cannot have max_size={max_size} < min_size={min_size}")
    require_min_delta(min_delta)
    if not 0 <= min_value < max_value:
        raise InvalidArgumentError(f"Cannot have max_value={max_value} <= min_value={min_value}"
                                   " (min_value must be >= 0)")
    if kind is not None and not isinstance(kind, st.SearchStrategy):
        require(kind in VAL_LOSS_KINDS, "kind", kind, f"must be one of {VAL_LOSS_KINDS}")
    kinds = st.sampled_from(VAL_LOSS_KINDS) if kind is None else _as_strategy(kind, "kind")
    size = st.one_of(st.sampled_from(sorted({min_size, max_size})),
                     st.integers(min_size, max_size))
    start = st.one_of(st.just(min(max(2.5, min_value), max_value)),
                      st.floats(min_value, max_value))
    d = min_delta
    edges = sorted({0.0, d / 2, math.nextafter(d, 0.0), d, math.nextafter(d, math.inf), 2 * d,
                    d + 1e-3, 0.3})
    step = st.one_of(st.sampled_from(edges), st.floats(0.0, 0.5))
    return _val_losses(kinds, size, start, step, min_value, max_value)


@st.composite
def _gradient_set(draw, max_norm, dtype, max_tensors, max_side):
    k = draw(st.integers(1, max_tensors))
    shapes = [tuple(draw(st.lists(st.integers(1, max_side), min_size=1, max_size=2)))
              for _ in range(k)]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    raw = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if draw(st.booleans()):  # exact zeros somewhere (a frozen or dead parameter)
        raw[draw(st.integers(0, k - 1))].zero_()
    norm = float(torch.cat([r.flatten() for r in raw]).norm())
    target = draw(st.one_of(values_around(max_norm, dtype=torch.float64),
                            st.sampled_from([0.0, 1e-6 * max_norm, 1e3 * max_norm]),
                            st.floats(0.0, 10.0 * max_norm)))
    scale = target / norm if norm > 0 else 0.0
    d = draw(dtype)
    return [(r * scale).to(d) for r in raw]


def gradient_sets(*, max_norm: float = 1.0, dtype: Any = torch.float32, max_tensors: int = 3,
                  max_side: int = 5) -> st.SearchStrategy[list[torch.Tensor]]:
    """Lists of 1..max_tensors finite gradients whose total L2 norm sits around ``max_norm``.

    Total norms: exact ulp-neighbours of the cap (``values_around``), zero,
    tiny, 1000× the cap and uniform up to 10×; sometimes one tensor all zero.
    """
    require_max_norm(max_norm)
    require(isinstance(max_tensors, int) and max_tensors >= 1, "max_tensors", max_tensors,
            "must be an integer >= 1")
    require(isinstance(max_side, int) and max_side >= 1, "max_side", max_side,
            "must be an integer >= 1")
    return _gradient_set(max_norm, _as_strategy(dtype, "dtype"), max_tensors, max_side)


def split_sizes(*, fraction: float = 0.2, min_size: int = 1,
                max_size: int = 400) -> st.SearchStrategy[int]:
    """Dataset sizes where ``round(fraction·n)`` is about to change, plus 1, 2 and uniform."""
    require(isinstance(fraction, float) and 0 < fraction < 1, "fraction", fraction,
            "must be a float in (0, 1)")
    require(isinstance(min_size, int) and min_size >= 1, "min_size", min_size,
            "must be an integer >= 1")
    if max_size < min_size:
        raise InvalidArgumentError(f"Cannot have max_size={max_size} < min_size={min_size}")
    flips = set()
    for k in range(0, int(fraction * max_size) + 2):
        n = (k + 0.5) / fraction  # round(fraction·n) flips near here
        flips.update({math.floor(n) - 1, math.floor(n), math.ceil(n), math.ceil(n) + 1})
    flips |= {min_size, min_size + 1, max_size}
    edges = sorted(n for n in flips if min_size <= n <= max_size)
    return st.one_of(st.sampled_from(edges), st.integers(min_size, max_size))
