"""Owns the evolving-context invariants on the training side, E5-E6 (SPEC seed 004): the encoder's
LR scale and freezing by a zero LR (an optimizer or its param groups and a ``train_step``), and
the logged diagnostics (``z_e_step_change``, its percentage, the encoder gradient share)
against float64 references.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from invariants._assertions import fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_finite, require_non_negative, require_positive)
from invariants._tolerances import tolerance_for
from invariants._context_checks import PCT_UNDEFINED_BELOW, _as_float, _call, _require_context, _row_index

__all__ = [
    "assert_context_diagnostics_match",
    "assert_encoder_frozen_by_zero_lr",
    "assert_encoder_grad_share_valid",
    "assert_encoder_lr_scaled",
    "context_diagnostics_reference",
    "encoder_grad_share_reference",
]

# ---------------------------------------------------------------------- E5
def _groups(optimizer_or_groups: Any) -> list[Mapping[str, Any]]:
    groups = getattr(optimizer_or_groups, "param_groups", optimizer_or_groups)
    require(isinstance(groups, (list, tuple)) and all(isinstance(g, Mapping) for g in groups),
            "optimizer", optimizer_or_groups,
            "must be a torch optimizer or a list of param-group dicts")
    for i, g in enumerate(groups):
        require("params" in g and "lr" in g, f"param_groups[{i}]", dict(g),
                "must have 'params' and 'lr'")
    return list(groups)


def _params(name: str, params: Iterable[Any]) -> list[torch.Tensor]:
    try:
        out = list(params)
    except TypeError:
        raise InvalidArgumentError(
            f"{name}={params!r:.60}: must be an iterable of tensors/parameters") from None
    for i, p in enumerate(out):
        require(isinstance(p, torch.Tensor), f"{name}[{i}]", p, "must be a tensor/parameter")
    return out


@invariant_check("E5")
def assert_encoder_lr_scaled(optimizer: Any, encoder_params: Iterable[torch.Tensor], *,
                             base_lr: float, scale: float) -> None:
    """Assert encoder parameters train at ``scale × base_lr`` and all others at ``base_lr``.

    Args:
      optimizer: a ``torch.optim.Optimizer`` or its ``param_groups`` (list of dicts).
      encoder_params: the encoder's parameters (identity, not value, decides membership).
      base_lr: the decoder's (base) learning rate, > 0.
      scale: ``encoder_lr_scale`` >= 0; 0 freezes the encoder.

    Raises:
      InvariantViolation: naming the group index, its lr, the expected lr and
        how many encoder/other parameters it holds; also if an encoder parameter
        is in no group or in more than one.
      InvalidArgumentError: for a negative or non-finite ``scale``, ``base_lr`` <= 0.
    """
    __tracebackhide__ = True
    require_positive("base_lr", base_lr)
    require_non_negative("scale", scale)
    groups = _groups(optimizer)
    enc = {id(p) for p in _params("encoder_params", encoder_params)}
    require(len(enc) > 0, "encoder_params", [], "must name at least one parameter")
    want_enc = scale * base_lr
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        ids = [id(p) for p in g["params"]]
        n_enc = sum(pid in enc for pid in ids)
        n_other = len(ids) - n_enc
        for pid in ids:
            if pid in enc:
                seen[pid] = seen.get(pid, 0) + 1
        lr = _as_float(f"param_groups[{i}]['lr']", g["lr"])
        if n_enc and n_other:
            fail("encoder and other parameters in separate param groups",
                 f"param group {i} (lr {lr:g}) holds {n_enc} encoder and {n_other} other "
                 "parameters: they cannot have different learning rates")
        if n_enc and not math.isclose(lr, want_enc, rel_tol=1e-12, abs_tol=0.0):
            fail(f"encoder lr = encoder_lr_scale × base lr = {scale:g} × {base_lr:g} = {want_enc:g}",
                 f"param group {i} ({n_enc} encoder parameters) has lr {lr:g}"
                 + (" = the base lr: the scale is ignored" if lr == base_lr and scale != 1 else ""),
                 hint="build the optimizer from two param groups, the encoder's with "
                      "lr=encoder_lr_scale*base_lr")
        if n_other and not math.isclose(lr, base_lr, rel_tol=1e-12, abs_tol=0.0):
            fail(f"non-encoder parameters at the base lr {base_lr:g}",
                 f"param group {i} ({n_other} other parameters) has lr {lr:g}")
    missing = len(enc) - len(seen)
    twice = sum(1 for n in seen.values() if n > 1)
    if missing or twice:
        fail("every encoder parameter in exactly one param group",
             f"{missing} encoder parameters are in no group, {twice} in more than one")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints).clone()


@invariant_check("E5")
def assert_encoder_frozen_by_zero_lr(train_step: Callable[[], Any],
                                     encoder_params: Iterable[torch.Tensor],
                                     other_params: Iterable[torch.Tensor], *, steps: int = 3,
                                     bitwise: bool = True) -> None:
    """Assert ``steps`` optimizer steps leave the encoder bit-identical while the rest moves.

    ``train_step()`` runs one forward, backward and optimizer step of a model
    whose encoder param group has lr 0 (``encoder_lr_scale = 0``).

    Args:
      train_step: zero-argument callable, one training step.
      encoder_params: must not change.
      other_params: at least one of them must change (the decoder learns), so a
        train step that does nothing cannot pass.
      steps: number of calls (>= 1).
      bitwise: compare bit patterns (default, the seed's "bit-identical"); with
        False compare values, so -0.0 == +0.0. Measured with torch 2.13: SGD,
        Adam and AdamW at lr 0 turn a weight of -0.0 into +0.0 when its update
        direction is positive (p + (-0.0)·u = +0.0 for u < 0), so bitwise
        freezing fails for exact negative zeros; weight decay with lr 0
        multiplies by exactly 1 and changes nothing. A NaN gradient turns the
        weight into NaN even at lr 0 (0·NaN = NaN).

    Raises:
      InvariantViolation: at the first step an encoder element changes (which
        parameter, how many elements, the worst index and values), or if no
        other parameter changed after all steps.
    """
    __tracebackhide__ = True
    require(callable(train_step), "train_step", train_step, "must be a zero-argument callable")
    require(isinstance(steps, int) and steps >= 1, "steps", steps, "must be an integer >= 1")
    enc = _params("encoder_params", encoder_params)
    other = _params("other_params", other_params)
    require(len(enc) > 0, "encoder_params", enc, "must name at least one parameter")
    require(len(other) > 0, "other_params", other, "must name at least one parameter")
    snap = [_bits(p) if bitwise else p.detach().clone() for p in enc]
    other_before = [p.detach().clone() for p in other]
    for k in range(1, steps + 1):
        train_step()
        for j, (p, s) in enumerate(zip(enc, snap)):
            now = _bits(p) if bitwise else p.detach()
            changed = now != s
            if bool(changed.any()):
                flat = int(torch.nonzero(changed.flatten())[0])
                index = _row_index(flat, p.shape) if p.dim() else ()
                before = s.view(p.dtype) if bitwise else s
                fail("encoder weights bit-identical after optimizer steps with encoder lr 0"
                     if bitwise else "encoder weights unchanged with encoder lr 0",
                     f"after step {k}: encoder parameter {j} (shape {tuple(p.shape)}) changed in "
                     f"{int(changed.sum())} / {p.numel()} elements; first at {index}: "
                     f"{float(before.reshape(p.shape)[index])!r} -> {float(p.detach()[index])!r}",
                     hint="encoder_lr_scale must set the encoder param group's lr to "
                          "scale × base lr (is the scale ignored?)")
    for j, p in enumerate(other):
        bad = ~torch.isfinite(p.detach())
        if bool(bad.any()):
            index = _row_index(int(torch.nonzero(bad.flatten())[0]), p.shape) if p.dim() else ()
            fail("the non-encoder parameters to stay finite while the encoder is frozen",
                 f"after {steps} steps other parameter {j} (shape {tuple(p.shape)}) has "
                 f"{int(bad.sum())} / {p.numel()} non-finite elements; first at {index}: "
                 f"{float(p.detach()[index])!r}")
    if all(torch.equal(p.detach(), b) for p, b in zip(other, other_before)):
        fail("the non-encoder (decoder) parameters to move while the encoder is frozen",
             f"none of {len(other)} other parameters changed after {steps} steps",
             hint="does train_step call optimizer.step() with non-zero gradients?")


# ---------------------------------------------------------------------- E6
def context_diagnostics_reference(z_prev: torch.Tensor, z_new: torch.Tensor) -> dict[str, float]:
    """The seed's definitions, in float64: the plain recomputation E6 compares with.

    ``z_e_step_change = mean over rows of ‖z_new − z_prev‖`` (norm over the last
    dim, mean over all other dims); ``z_e_step_change_pct = z_e_step_change /
    mean‖z_prev‖``, omitted when mean‖z_prev‖ <= ``PCT_UNDEFINED_BELOW`` (as the
    seed does; it is a fraction, 0.1 = 10 %).
    """
    _require_context("z_prev", z_prev)
    _require_context("z_new", z_new)
    if tuple(z_prev.shape) != tuple(z_new.shape):
        raise InvalidArgumentError(f"z_prev.shape={tuple(z_prev.shape)} and z_new.shape="
                                   f"{tuple(z_new.shape)}: shapes must match")
    prev, new = z_prev.detach().double(), z_new.detach().double()
    change = float((new - prev).norm(dim=-1).mean())
    prev_norm = float(prev.norm(dim=-1).mean())
    out = {"z_e_step_change": change}
    if prev_norm > PCT_UNDEFINED_BELOW:
        out["z_e_step_change_pct"] = change / prev_norm
    return out


def _grad_norm(params: Sequence[torch.Tensor]) -> float:
    for i, p in enumerate(params):
        if p.grad is not None:
            require_finite(f"params[{i}].grad", p.grad)
    sq = [p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def encoder_grad_share_reference(encoder_params: Iterable[torch.Tensor],
                                 params: Iterable[torch.Tensor]) -> float:
    """‖g_enc‖ / ‖g_total‖ over the ``.grad`` of the given parameters (float64).

    ``params`` is every trained parameter (encoder included); a parameter
    without a gradient counts as zero. 0 when the total gradient is zero.
    """
    enc = _params("encoder_params", encoder_params)
    total = _params("params", params)
    g_total = _grad_norm(total)
    return _grad_norm(enc) / g_total if g_total > 0 else 0.0


@invariant_check("E6")
def assert_context_diagnostics_match(diagnostics: Callable[[torch.Tensor, torch.Tensor],
                                                           Mapping[str, Any]],
                                     z_prev: torch.Tensor, z_new: torch.Tensor, *,
                                     rtol: float | None = None) -> None:
    """Assert the user's ``z_e_step_change`` and ``_pct`` match their definitions.

    ``diagnostics(z_prev, z_new)`` returns a mapping with ``z_e_step_change``
    and, when mean‖z_prev‖ > 1e-6, ``z_e_step_change_pct`` (absent or None
    otherwise). Values may be floats or 0-dim tensors. Compared with
    ``context_diagnostics_reference`` (float64) at ``rtol``, by default the dtype
    table's rtol for ``z_prev.dtype``: torch accumulates norms and means of
    float32/bfloat16 tensors in float32 (pairwise), and 1000 Hypothesis examples
    stayed within it. Pass a larger ``rtol`` for a hand-rolled sequential sum
    over many rows.

    Raises:
      InvariantViolation: naming the metric, the value, the recomputed value
        and the tolerance; also when pct is reported for a near-zero z_prev or
        missing for a non-zero one, or when a value is negative or not finite.
    """
    __tracebackhide__ = True
    ref = context_diagnostics_reference(z_prev, z_new)
    with torch.no_grad():
        got = _call("diagnostics", diagnostics, z_prev, z_new)
    require(isinstance(got, Mapping), "diagnostics(z_prev, z_new)", got, "must return a mapping")
    rtol = tolerance_for(z_prev.dtype, rtol=rtol).rtol
    prev_norm = float(z_prev.detach().double().norm(dim=-1).mean())
    for key in ("z_e_step_change", "z_e_step_change_pct"):
        value = got.get(key)
        if key not in ref:
            if value is not None:
                fail(f"{key} omitted when mean‖z_prev‖ <= {PCT_UNDEFINED_BELOW:g} (undefined)",
                     f"{key} = {value!r:.40} with mean‖z_prev‖ = {prev_norm:.3g}")
            continue
        if value is None:
            fail(f"{key} reported (mean‖z_prev‖ = {prev_norm:.3g} > {PCT_UNDEFINED_BELOW:g})",
                 f"{key} is missing; keys: {sorted(got)}")
        v = _as_float(f"diagnostics(z_prev, z_new)[{key!r}]", value)
        want = ref[key]
        if not (math.isfinite(v) and v >= 0 and abs(v - want) <= rtol * abs(want)):
            definition = ("mean over rows of ‖z_new − z_prev‖" if key == "z_e_step_change"
                          else "z_e_step_change / mean over rows of ‖z_prev‖")
            fail(f"{key} = {definition} = {want:.6g} (recomputed in float64)",
                 f"{key} = {v:.6g}, relative difference "
                 f"{abs(v - want) / max(abs(want), 1e-300):.3g} > rtol {rtol:.3g} "
                 f"(shape {tuple(z_prev.shape)}, {z_prev.dtype})",
                 hint="normalise the change by the mean norm of the *previous* context"
                 if key.endswith("pct") else None)


@invariant_check("E6")
def assert_encoder_grad_share_valid(share: Any, encoder_params: Iterable[torch.Tensor],
                                    params: Iterable[torch.Tensor], *,
                                    rtol: float = 1e-6) -> None:
    """Assert the reported encoder gradient share is ‖g_enc‖/‖g_total‖ ∈ [0, 1].

    Call after ``backward()``: the ``.grad`` of ``encoder_params`` and
    ``params`` (all trained parameters, encoder included) are read.

    Args:
      share: the value the user's code logged (float or 0-dim tensor).
      rtol: relative tolerance against the float64 recomputation (a user who
        computes in float32 over many parameters may need more).

    Raises:
      InvariantViolation: if ``share`` is outside [0, 1], not finite, or differs
        from the recomputation beyond ``rtol``.
    """
    __tracebackhide__ = True
    require_non_negative("rtol", rtol)
    enc = _params("encoder_params", encoder_params)
    total = _params("params", params)
    require(len(enc) > 0, "encoder_params", enc, "must be non-empty (name the encoder's parameters)")
    ids = {id(p) for p in total}
    require(all(id(p) in ids for p in enc), "encoder_params", "...",
            "every encoder parameter must also be in params (the total)")
    want = encoder_grad_share_reference(enc, total)
    v = _as_float("share", share)
    g_enc, g_total = _grad_norm(enc), _grad_norm(total)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        fail("the encoder gradient share ‖g_enc‖/‖g_total‖ in [0, 1]",
             f"share = {v:.6g} (‖g_enc‖ = {g_enc:.6g}, ‖g_total‖ = {g_total:.6g}, "
             f"recomputed share {want:.6g})",
             hint="divide by the norm over *all* trained parameters, not the decoder's")
    if abs(v - want) > rtol * want + 1e-12:
        fail(f"share = ‖g_enc‖/‖g_total‖ = {want:.6g} (recomputed in float64)",
             f"share = {v:.6g} (‖g_enc‖ = {g_enc:.6g}, ‖g_total‖ = {g_total:.6g}), "
             f"relative difference {abs(v - want) / max(want, 1e-300):.3g} > rtol {rtol:g}")
