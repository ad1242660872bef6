"""Owns the HyperLoRA invariants on the training side, H5-H7 (SPEC seed 000): the LoRA decay term,
the optimizer's param-group learning rates, and the norm governor acting on its thresholds.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

from invariants._assertions import fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_finite, require_positive, require_tensor)
from invariants._tolerances import tolerance_for
from invariants.fixes.frobenius import frobenius_norms
from invariants.fixes.governor import GOVERNOR_LEVELS
from invariants._hyperlora_checks import _as_items, _require_nonempty

__all__ = [
    "assert_lora_decay_term",
    "assert_norm_governor_acts",
    "assert_param_group_lrs",
]

Deltas = Union[torch.Tensor, Mapping[str, torch.Tensor]]


# -------------------------------------------------------------------- H5
@invariant_check("H5")
def assert_lora_decay_term(decay: Callable[[Deltas], torch.Tensor], deltas: Deltas, *,
                           weight: float = 0.001, step_size: float = 1.0) -> None:
    """Assert ``decay(ΔW) == λ·Σ_i ‖ΔW_i‖F²`` and that one gradient step on it lowers Σ_i ‖ΔW_i‖F.

    The value is compared with the float64 sum within the dtype table's
    tolerance. The step is ``ΔW − step_size·∂decay/∂ΔW`` with the decay evaluated on
    float64 copies of the deltas (so a gradient cannot underflow in bfloat16); for
    the true term it multiplies every ΔW by ``1 − 2·λ·step_size``, so Σ‖ΔW_i‖
    must drop strictly (when it is > 0).

    Raises:
      InvariantViolation: wrong value, no gradient, or a step that does not lower the sum.
      InvalidArgumentError: λ <= 0, step_size <= 0 or λ·step_size >= 1, non-finite deltas.
    """
    __tracebackhide__ = True
    require_positive("weight", weight)
    require_positive("step_size", step_size)
    require(weight * step_size < 1, "step_size", step_size,
            f"must satisfy weight*step_size < 1 (weight={weight:g}) or the step overshoots")
    require(callable(decay), "decay", decay, "must be callable deltas -> scalar tensor")
    items = _as_items("deltas", deltas)
    for key, d in items:
        _require_nonempty(f"deltas[{key!r}]" if key else "deltas", d)
        require_finite(f"deltas[{key!r}]" if key else "deltas", d)
    leaves = [d.detach().clone().requires_grad_(True) for _, d in items]
    arg: Deltas = leaves[0] if isinstance(deltas, torch.Tensor) else \
        {k: leaf for (k, _), leaf in zip(items, leaves)}
    with torch.enable_grad():
        value = decay(arg)
    require_tensor("decay(deltas)", value)
    require(value.numel() == 1, "decay(deltas).shape", tuple(value.shape), "must be a scalar")
    expected = weight * sum(float(frobenius_norms(d).pow(2).sum()) for _, d in items)
    tol = tolerance_for(items[0][1].dtype)
    got = float(value.detach().double())
    if not abs(got - expected) <= tol.atol + tol.rtol * abs(expected):
        fail(f"decay == λ·Σ_i ‖ΔW_i‖F² = {expected:.9g} (λ={weight:g})",
             f"decay = {got:.9g} (difference {got - expected:.3g}; allowed rtol={tol.rtol:g}, "
             f"atol={tol.atol:g})",
             hint="sum the squared Frobenius norms of every ΔW_i times the decay weight")
    before = sum(float(frobenius_norms(d).sum()) for _, d in items)
    if before == 0.0:
        return
    # the step is judged on float64 copies: in bfloat16 the gradient 2·λ·ΔW of a delta near
    # the smallest normal (1.2e-38) underflows to zero, which says nothing about the decay
    # term (found by the thorough profile); the value above is checked in the delta's dtype
    leaves = [d.detach().double().requires_grad_(True) for _, d in items]
    arg = leaves[0] if isinstance(deltas, torch.Tensor) else \
        {k: leaf for (k, _), leaf in zip(items, leaves)}
    with torch.enable_grad():
        value = decay(arg)
    grads = torch.autograd.grad(value, leaves, allow_unused=True) if value.requires_grad \
        else [None] * len(leaves)
    if all(g is None for g in grads):
        fail("the decay term to have a gradient w.r.t. the deltas",
             "decay(deltas) does not depend on the deltas (no gradient)")
    after = 0.0
    for leaf, g in zip(leaves, grads):
        new = leaf.detach().double() - step_size * (0 if g is None else g.double())
        after += float(torch.linalg.vector_norm(new, dim=(-2, -1)).sum())
    if not after < before:
        fail("a gradient step on the decay term to lower Σ_i ‖ΔW_i‖F",
             f"Σ‖ΔW_i‖F went from {before:.9g} to {after:.9g} with step_size={step_size:g}")


# -------------------------------------------------------------------- H6
@invariant_check("H6")
def assert_param_group_lrs(optimizer: torch.optim.Optimizer,
                           hyperlora_params: Iterable[torch.Tensor], *, base_lr: float,
                           multiplier: float = 1.0) -> None:
    """Assert HyperLoRA params sit in groups with ``lr == multiplier·base_lr``, others ``== base_lr``.

    Every HyperLoRA parameter must be in the optimizer exactly once. Learning
    rates are compared with a relative tolerance of 1e-12 (they are products of
    two Python floats).

    Raises:
      InvariantViolation: naming the group index (and its ``name`` key, if any),
        its lr, the lr expected and the ratio to base_lr.
      InvalidArgumentError: base_lr or multiplier not > 0, no HyperLoRA params.
    """
    __tracebackhide__ = True
    require(isinstance(optimizer, torch.optim.Optimizer), "optimizer", optimizer,
            "must be a torch.optim.Optimizer")
    require_positive("base_lr", base_lr)
    require_positive("multiplier", multiplier)
    try:
        hyper = {id(p) for p in hyperlora_params}
    except TypeError:
        raise InvalidArgumentError(
            f"hyperlora_params={hyperlora_params!r:.60}: must be an iterable of tensors") from None
    require(len(hyper) > 0, "hyperlora_params", hyperlora_params, "must name at least one tensor")
    seen: dict[int, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        label = f"param_groups[{gi}]" + (f" ({group['name']!r})" if "name" in group else "")
        ids = [id(p) for p in group["params"]]
        n_hyper = sum(i in hyper for i in ids)
        for i in ids:
            if i in hyper:
                if i in seen:
                    fail("each HyperLoRA parameter in exactly one param group",
                         f"a HyperLoRA parameter is in param_groups[{seen[i]}] and {label}")
                seen[i] = gi
        if n_hyper and n_hyper != len(ids):
            fail("HyperLoRA parameters in groups of their own",
                 f"{label} mixes {n_hyper} HyperLoRA and {len(ids) - n_hyper} other parameters")
        want = multiplier * base_lr if n_hyper else base_lr
        try:
            lr = float(group["lr"])
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(f"{label}['lr']={group['lr']!r:.60}: must be a number") \
                from None
        if not math.isclose(lr, want, rel_tol=1e-12, abs_tol=0.0):
            what = f"HyperLoRA lr = {multiplier:g} × base lr" if n_hyper else "base lr"
            fail(f"{what} = {want:.6g} in {label}",
                 f"lr = {lr:.6g} = {lr / base_lr:.6g} × base lr {base_lr:.6g}",
                 hint="seed §2.2 Part 2: hyperlora_lr_multiplier 3.0 -> 1.0")
    missing = len(hyper) - len(seen)
    if missing:
        fail("every HyperLoRA parameter to be optimised",
             f"{missing} of {len(hyper)} HyperLoRA parameters are in no param group")


@invariant_check("H7")
def assert_norm_governor_acts(governor: Any, norms: Sequence[float], *, warn: float = 1.0,
                              critical: float = 1.5, kill: float = 2.0,
                              early_stop_ema: float = 1.5, collapse_norm: float = 1.714,
                              max_norm: float = 1.0) -> None:
    """Assert a governor acts on the seed's thresholds and stops on the EMA.

    Checked, in this order, for the finite series ``norms``:
    1. levels from ``governor.decide`` are monotone in the norm;
    2. they equal the levels of thresholds warn/critical/kill (strict ``>``);
    3. at ``collapse_norm`` (the seed's 1.714) the level is >= critical and the
       governor acts: its ``clamp`` brings a delta of that norm to <= max_norm;
    4. streaming ``norms`` through ``reset()``/``update()``, the first early stop
       comes exactly at the first step whose EMA (``governor.ema_decay``,
       ``ema_0 = norm_0``) exceeds ``early_stop_ema``.

    Raises:
      InvariantViolation: naming the part, the norm/step and expected vs observed.
      InvalidArgumentError: non-finite or empty norms, disordered thresholds.
    """
    __tracebackhide__ = True
    for name, value in (("warn", warn), ("critical", critical), ("kill", kill),
                        ("early_stop_ema", early_stop_ema), ("collapse_norm", collapse_norm),
                        ("max_norm", max_norm)):
        require_positive(name, value)
    if not warn < critical < kill:
        raise InvalidArgumentError(
            f"Cannot have warn={warn:g}, critical={critical:g}, kill={kill:g}: "
            "thresholds must satisfy 0 < warn < critical < kill")
    for attr in ("decide", "update", "reset", "clamp"):
        require(callable(getattr(governor, attr, None)), "governor", governor,
                f"must have a callable {attr}() (NormGovernor's protocol)")
    decay = getattr(governor, "ema_decay", None)
    require(isinstance(decay, (int, float)) and not isinstance(decay, bool)
            and 0.0 <= decay <= 1.0, "governor.ema_decay", decay, "must be a number in [0, 1]")
    try:
        series = torch.as_tensor(list(norms), dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgumentError(f"norms={norms!r:.80}: must be a sequence of numbers") \
            from None
    require(series.dim() == 1, "norms", norms, "must be a flat sequence of numbers")
    require(series.numel() >= 1, "norms", norms, "must be non-empty (hold at least one norm)")
    require_finite("norms", series)
    names = GOVERNOR_LEVELS
    # 1. monotone
    order = torch.argsort(series, stable=True)
    levels = governor.decide(series[order]).long()
    drops = torch.nonzero(levels[1:] < levels[:-1])
    if drops.numel():
        j = int(drops[0])
        fail("governor levels monotone in the norm",
             f"norm {float(series[order][j]):.9g} -> {names[int(levels[j])]}, but larger norm "
             f"{float(series[order][j + 1]):.9g} -> {names[int(levels[j + 1])]}")
    # 2. thresholds
    got = governor.decide(series).long()
    want = (series > warn).long() + (series > critical).long() + (series > kill).long()
    wrong = torch.nonzero(got != want)
    if wrong.numel():
        j = int(wrong[0])
        fail(f"levels from thresholds warn {warn:g} / critical {critical:g} / kill {kill:g}",
             f"norm {float(series[j])!r} (step {j}) -> {names[int(got[j])]}, expected "
             f"{names[int(want[j])]}; {wrong.numel()} of {series.numel()} norms misjudged",
             hint="seed FIXES APPLIED: lora_norm thresholds 2.0/5.0/10.0 -> 1.0/1.5/2.0")
    # 3. acts at the collapse norm
    level = int(governor.decide(torch.tensor([collapse_norm], dtype=torch.float64))[0])
    probe = torch.full((1, 2, 2), collapse_norm / 2, dtype=torch.float64)  # ‖probe‖F = collapse_norm
    clamped = float(frobenius_norms(governor.clamp(probe))[0])
    if level < 2 or not clamped <= max_norm:
        fail(f"action at the documented collapse norm {collapse_norm:g} "
             f"(level >= critical and the clamp enforced to <= {max_norm:g})",
             f"level {names[level]}, governor.clamp leaves ‖ΔW‖F = {clamped:.6g}",
             hint="seed §1.3: a monitor-only governor with kill 10.0 watched the collapse at 1.714")
    # 4. EMA early stop
    d = float(governor.ema_decay)
    governor.reset()
    ema = None
    for step, value in enumerate(series.tolist()):
        ema = value if ema is None else d * ema + (1 - d) * value
        decision = governor.update(value)
        should = ema > early_stop_ema
        if bool(decision.early_stop) != should:
            fail(f"early stop exactly when the EMA (decay {d:g}) first exceeds {early_stop_ema:g}",
                 f"step {step}: norm {value:.6g}, EMA {ema:.9g} (governor reports "
                 f"{float(decision.ema):.9g}), early_stop={bool(decision.early_stop)}",
                 hint="seed §3.3: if lora_norm_ema > 1.5: stop")
        if should:
            break
    governor.reset()
