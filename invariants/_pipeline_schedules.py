"""Owns the optimisation-signal invariants of the curriculum pipeline, P6-P7 (SPEC seed 002): the
warm-up + cosine LR schedule (any ``torch.optim.lr_scheduler``, a ``step -> lr`` callable or a
list of rates) and the exact Grokfast EMA filter (any stateful ``filter_step(grads)``).

P6's contract (docs/curriculum_lm.md): the steps that exist are the optimizer steps
0..total_steps-1, and the decay must be a cosine lying between the one that reaches eta_min at
step total_steps (transformers) and the one that reaches it at total_steps-1 (OneCycleLR).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_int, require_non_negative, require_positive,
                                  require_schedule_steps, require_tensor)
from invariants._tolerances import tolerance_for

__all__ = [
    "assert_grokfast_filter_exact",
    "assert_lr_schedule_warmup_cosine",
]

# ---------------------------------------------------------------------- P6
def _lr_values(schedule: Any, total_steps: int) -> list[float]:
    """The LR used at optimizer steps 0..total_steps-1 (the steps that exist)."""
    if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
        values = [float(schedule.get_last_lr()[0])]
        with warnings.catch_warnings():  # stepping without optimizer.step() warns
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(total_steps - 1):
                schedule.step()
                values.append(float(schedule.get_last_lr()[0]))
        return values
    if callable(schedule):
        values, name = [schedule(t) for t in range(total_steps)], "schedule(step)"
    else:
        require(isinstance(schedule, Sequence) and not isinstance(schedule, (str, bytes)),
                "schedule", schedule, f"must be an LR scheduler, a callable step -> lr, or the "
                f"total_steps = {total_steps} learning rates of steps 0..{total_steps - 1}")
        values, name = list(schedule), "schedule"
    out = []
    for t, v in enumerate(values):
        try:
            out.append(float(v))
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(f"{name}[{t}]={v!r:.60}: must be a number") from None
    require(len(out) == total_steps, "len(schedule)", len(out),
            f"must be total_steps={total_steps}: the LRs of steps 0..{total_steps - 1}")
    return out


def _cosine(k: float, span: int, peak: float, low: float) -> float:
    """The cosine decay ``span`` steps long, ``k`` steps in (clamped at the end)."""
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * min(k / span, 1.0)))


def _shape_hint(lrs: list[float], w: int, peak: float, low: float, slack: float) -> str:
    tail = lrs[w:]
    if all(abs(v - peak) <= slack for v in tail):
        return "a constant LR after warmup: no decay (the seed's bug); decay with a cosine"
    spans = {len(lrs) - w, max(1, len(lrs) - 1 - w)}  # reaching eta_min at T or at T-1
    if any(all(abs(v - (peak - (peak - low) * min(k / span, 1.0))) <= slack + 1e-9 * peak
               for k, v in enumerate(tail)) for span in spans):
        return ("a linear decay (transformers.get_linear_schedule_with_warmup?): this check "
                "asserts a cosine (get_cosine_schedule_with_warmup, CosineAnnealingLR)")
    return "decay with 0.5·(1 + cos(π·progress)) from peak_lr at warmup_steps to eta_min"


@invariant_check("P6")
def assert_lr_schedule_warmup_cosine(schedule: Any, *, total_steps: int, warmup_steps: int,
                                     peak_lr: float, eta_min: float = 0.0,
                                     rtol: float = 1e-9) -> None:
    """Assert a warm-up + cosine-decay learning-rate schedule over steps 0..total_steps-1.

    The steps that exist are the ``total_steps`` optimizer steps 0..T-1: ``lr(t)`` is
    the rate used by step ``t`` (torch's ``OneCycleLR(total_steps=T)`` is defined on
    exactly these; stepping it once more extrapolates). ``schedule`` is a fresh
    ``torch.optim.lr_scheduler`` (group 0 read, then stepped T-1 times), a callable
    ``step -> lr`` or the list ``lr(0..T-1)``. With W = ``warmup_steps`` and slack
    ``rtol·peak_lr``:

    * warm-up: non-decreasing over 0..W, within [0, peak], any shape (linear as in
      transformers, cosine as in ``OneCycleLR``); ``lr(W) == peak``;
    * decay: non-increasing over W..T-1, within [eta_min, peak], and a cosine: between
      the cosine that reaches eta_min at step T (transformers'
      ``get_cosine_schedule_with_warmup``, ``CosineAnnealingLR(T_max=T-W)``) and the one
      that reaches it at T-1 (``OneCycleLR``): a linear or constant decay fails;
    * continuous: no step changes the LR by more than the steepest such shape, ``(peak -
      lr(0))·π/(2W)`` in warm-up and ``(peak - eta_min)·π/(2·max(1, T-1-W))`` after.

    ``total_steps`` is at most ``MAX_SCHEDULE_STEPS`` (10**6): every step is evaluated.
    ``OneCycleLR(total_steps=T, pct_start=p)`` peaks at step ``p·T - 1``: pass that W.

    Raises:
      InvariantViolation: naming the first step that breaks a rule, the shape it has
        (constant, linear) when that is the cause.
      InvalidArgumentError: warmup_steps >= total_steps, eta_min > peak_lr, a bool or
        out-of-range step count, a list of the wrong length, ...
    """
    __tracebackhide__ = True
    require_schedule_steps("total_steps", total_steps)
    require_int("warmup_steps", warmup_steps, minimum=0)
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
            fail(f"lr within [{low:g}, peak={peak_lr:g}] at step {step}", f"lr({step}) = {lr!r}")
    for step in range(1, t):
        prev, cur = lrs[step - 1], lrs[step]
        if step <= w and cur < prev - slack:
            fail("a non-decreasing LR during warmup",
                 f"lr({step}) = {cur!r} < lr({step - 1}) = {prev!r}")
        if step > w and cur > prev + slack:
            fail(f"a non-increasing LR after warmup (step {w})",
                 f"lr({step}) = {cur!r} > lr({step - 1}) = {prev!r}")
    if abs(lrs[w] - peak_lr) > slack:
        fail(f"lr(warmup_steps={w}) == peak_lr={peak_lr!r}", f"lr({w}) = {lrs[w]!r}")
    rise = (peak_lr - lrs[0]) * math.pi / (2 * w) if w else 0.0
    fall = (peak_lr - eta_min) * math.pi / (2 * max(1, t - 1 - w))
    for step in range(1, t):
        limit = (rise if step <= w else fall) * (1 + 1e-9) + slack
        if abs(lrs[step] - lrs[step - 1]) > limit:
            fail(f"a continuous schedule: |lr(s) - lr(s-1)| <= {limit!r} "
                 f"({'warm-up' if step <= w else 'cosine decay'} at its steepest)",
                 f"jump of {abs(lrs[step] - lrs[step - 1])!r} at step {step} (lr "
                 f"{lrs[step - 1]!r} -> {lrs[step]!r})")
    for step in range(w, t):
        lo = _cosine(step - w, max(1, t - 1 - w), peak_lr, eta_min)
        hi = _cosine(step - w, t - w, peak_lr, eta_min)
        if not lo - slack <= lrs[step] <= hi + slack:
            fail(f"a cosine decay from peak_lr={peak_lr!r} at step {w} to eta_min={eta_min!r} "
                 f"at step {t - 1} or {t}: lr({step}) within [{lo!r}, {hi!r}]",
                 f"lr({step}) = {lrs[step]!r} (lr({w}) = {lrs[w]!r}, lr({t - 1}) = "
                 f"{lrs[t - 1]!r})", hint=_shape_hint(lrs, w, peak_lr, eta_min, slack))


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
    require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
            and 0.0 <= alpha <= 1.0, "alpha", alpha, "must lie in [0, 1] (EMA momentum)")
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
        result = filter_step(inputs)
        require(isinstance(result, Sequence) and not isinstance(result, (str, bytes)),
                "filter_step(...)", result, f"must return a list of {n} tensors (step {step})")
        out = list(result)
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
