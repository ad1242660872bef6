"""Owns the training-loop invariants of the curriculum pipeline, P1-P5 (SPEC seed 002): optimizer
state across a stage change, curriculum progression, early stopping, best-checkpoint tracking,
gradient clipping; and ``expected_early_stop``, the reference stopping rule.

Every check takes the caller's own objects (any optimizer and ``transition()``; stages of
hashable samples; any ``step(val_loss) -> bool`` stopper; any ``update(val_loss) -> bool``
tracker with ``best``; any ``clip(parameters, max_norm)`` shaped like
``torch.nn.utils.clip_grad_norm_``). "Improvement" means ``value < best - min_delta`` in Python
floats (float64), ``best`` starting at +inf, NaN never an improvement.

Which comparisons are exact (docs/curriculum_lm.md): P3 decides every check exactly except a
gap ``best - value`` within one rounding step of ``min_delta`` (``_within_one_rounding``): there
the equivalent spellings ``v < best - d``, ``best - v > d`` (transformers'
``EarlyStoppingCallback``), ``v + d < best`` round differently, and either decision is accepted.
``best`` itself is compared exactly: a stopper whose best moves on a sub-``min_delta`` gain
(transformers' callback reads ``state.best_metric``, which moves on any gain) is caught. P4
decides exactly, by the first spelling (the seed's own fix).
"""
from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import Any, Callable, Hashable, Sequence

import torch

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_tensor, unravel)
from invariants._tolerances import tolerance_for
from invariants._validate import require_max_norm, require_min_delta, require_patience

__all__ = [
    "assert_best_checkpoint_tracks_minimum",
    "assert_curriculum_progresses",
    "assert_early_stopping_follows_patience",
    "assert_gradients_clipped",
    "assert_stage_boundary_keeps_optimizer_state",
    "expected_early_stop",
]

# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6): just below the
# cap the coefficient is already < 1 (measured; see docs/curriculum_lm.md).
TORCH_CLIP_EPS = 1e-6


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


def _within_one_rounding(value: float, best: float, min_delta: float) -> bool:
    """True if the exact gap ``best - value`` is within one ulp (of the largest operand) of
    ``min_delta > 0``: where ``v < best - d``, ``best - v > d`` and ``v + d < best``, each one
    rounding of a float64 operation, can disagree. With ``min_delta == 0`` every spelling is
    exact (a float difference is 0 only for equal floats)."""
    if min_delta == 0 or not (math.isfinite(value) and math.isfinite(best)):
        return False
    gap = Fraction(best) - Fraction(value) - Fraction(min_delta)
    return abs(gap) <= Fraction(math.ulp(max(abs(best), abs(value), min_delta)))


def _accepted_stops(val_losses: Sequence[float], patience: int,
                    min_delta: float) -> tuple[set[int], bool]:
    """Every check at which a correct stopper may stop, and whether it may never stop.

    Follows every path the rounding edge allows (``_within_one_rounding``: either decision);
    without an edge this is ``{expected_early_stop(...)}``. States are (best, bad) pairs."""
    states = {(math.inf, 0)}
    stops: set[int] = set()
    for i, value in enumerate(val_losses):
        nxt = set()
        for best, bad in states:
            if _within_one_rounding(value, best, min_delta):
                choices = (True, False)
            else:
                choices = (_is_improvement(value, best, min_delta),)
            for improved in choices:
                nxt.add((value, 0) if improved else (best, bad + 1))
        if any(bad >= patience for _, bad in nxt):
            stops.add(i)
        states = {s for s in nxt if s[1] < patience}
        if not states:
            return stops, False
    return stops, True


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
    improving by more than ``min_delta``, counter reset on every improvement,
    ``best`` moved only by an improvement.  Feeding ends at the first True.

    Exact, except at the rounding edge: where ``best - val_loss`` is within one
    rounding step (ulp) of ``min_delta``, equivalent spellings of the improvement test
    disagree, and a stop (or no stop) that either decision leads to is accepted.

    Raises:
      InvariantViolation: if it stops at a check no decision path allows, or not at all.
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
    stops, may_run_on = _accepted_stops(val_losses, patience, min_delta)
    if (got in stops) if got is not None else may_run_on:
        return
    edge = stops - {want}
    also = (f" (or check(s) {', '.join(str(k + 1) for k in sorted(edge))}"
            f"{' or no stop' if may_run_on and want is not None else ''}: the improvement test "
            f"is within one rounding step of min_delta there)" if edge else "")
    upto = (want if want is not None else len(val_losses) - 1)
    if got is not None:
        upto = max(upto, got)
    shown = ", ".join(repr(float(v)) for v in val_losses[:upto + 1])
    if want is None:
        fail(f"no stop: no run of {patience} checks without improvement > {min_delta!r}{also}",
             f"stopped at check {got + 1} of {len(val_losses)} (val_loss "
             f"{float(val_losses[got])!r}); sequence {shown}",
             hint="stop only after `patience` consecutive non-improving checks; reset the "
                  "counter on improvement, and move the best only on an improvement > "
                  "min_delta")
    fail(f"a stop at check {want + 1}: {patience} consecutive checks without improvement "
         f"> min_delta={min_delta!r}{also}",
         ("never stopped" if got is None else f"stopped at check {got + 1}")
         + f" (val_loss up to check {upto + 1}: {shown})",
         hint="no early stopping at all? the seed trained 10 epochs on a flat val_loss 2.5"
         if got is None else "count checks without improvement > min_delta; reset on "
         "improvement; move the best only on an improvement > min_delta (a best that follows "
         "every small gain stops too early)")


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
