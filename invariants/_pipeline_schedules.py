"""Owns the optimisation-signal invariants of the curriculum pipeline, P6-P7 (SPEC seed 002): the
warm-up + cosine LR schedule (any ``torch.optim.lr_scheduler``, a ``step -> lr`` callable or a
list of rates) and the exact Grokfast EMA filter (any stateful ``filter_step(grads)``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_non_negative, require_positive,
                                  require_tensor)
from invariants._tolerances import tolerance_for

__all__ = [
    "assert_grokfast_filter_exact",
    "assert_lr_schedule_warmup_cosine",
]

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
