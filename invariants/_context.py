"""Evolving encoder context invariants (SPEC seed 004, E1-E6).

The subject is a recurrent encoder that refines a context ``z_e`` of shape
(B, L, D) — B samples, L context rows ("slots"), width D — from the previous
carry and the demo encodings (B, N, D) at every ACT step; a decoder reads the
(normalised) context each step.

Every check takes the caller's callables, never our reference classes:

* an encoder *carry step* ``step(z_prev, demos) -> z_new`` (carry in, carry out);
* the *raw* (unsmoothed) step ``raw_step(z_prev, demos) -> z_raw`` for E1;
* a residual sub-block ``block(z)`` and its branch ``branch(z)`` for E2;
* the query path ``query_branch(z_prev, demos)`` (the cross-attention output) for E3;
* the context normaliser ``normalize(context)`` for E4;
* an optimizer (or its param groups) and a zero-argument ``train_step`` for E5;
* a diagnostics function and the gradients left by ``backward`` for E6.

Inputs must be finite. Tolerances come from the dtype table
(``invariants._tolerances``); where a quantity is a sum, the allowed error grows
with the number of terms, and the messages say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from hypothesis import strategies as st

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_finite, require_in_unit_interval,
                                  require_non_negative, require_positive, require_tensor)
from invariants._strategies import _as_strategy
from invariants._tolerances import tolerance_for

__all__ = [
    "ContextSpec",
    "PCT_UNDEFINED_BELOW",
    "assert_context_diagnostics_match",
    "assert_context_rows_normalized",
    "assert_context_update_smoothed",
    "assert_encoder_frozen_by_zero_lr",
    "assert_encoder_grad_share_valid",
    "assert_encoder_lr_scaled",
    "assert_query_gradient_blocked",
    "assert_residual_scaled",
    "context_diagnostics_reference",
    "context_specs",
    "contexts",
    "encoder_grad_share_reference",
    "lr_scales",
    "unit_fractions",
]

#: The seed logs ``z_e_step_change_pct`` only when mean‖z_prev‖ > 1e-6.
PCT_UNDEFINED_BELOW = 1e-6


# ------------------------------------------------------------------ helpers
def _require_context(name: str, z: Any) -> None:
    require_tensor(name, z)
    require(z.is_floating_point(), f"{name}.dtype", z.dtype, "must be a floating dtype")
    require(z.dim() >= 2, f"{name}.shape", tuple(z.shape),
            "must be (..., D) with at least one row dimension, e.g. (B, L, D)")
    require(z.shape[-1] >= 1, f"{name}.shape", tuple(z.shape), "must have width D >= 1")
    require(z.numel() > 0, f"{name}.shape", tuple(z.shape),
            "must be non-empty (a check on no element proves nothing)")
    require_finite(name, z)


def _call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    require(callable(fn), name, fn, "must be callable")
    try:
        return fn(*args)
    except (RuntimeError, TypeError) as exc:
        shapes = ", ".join(f"{tuple(a.shape)}/{a.dtype}" for a in args
                           if isinstance(a, torch.Tensor))
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InvalidArgumentError(
            f"{name}: calling it on inputs {shapes} failed ({type(exc).__name__}: {first}); "
            "are its signature, shapes and dtype compatible?") from None


def _tensor_out(name: str, out: Any, like: torch.Tensor) -> torch.Tensor:
    require_tensor(name, out)
    if tuple(out.shape) != tuple(like.shape):
        raise InvalidArgumentError(
            f"{name}.shape={tuple(out.shape)}: must equal the input's shape {tuple(like.shape)}")
    return out


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgumentError(
            f"{name}={value!r:.80}: must be a number or a one-element tensor") from None


def _row_index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


def _leaf(z: torch.Tensor) -> torch.Tensor:
    return z.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------- E1
@invariant_check("E1")
def assert_context_update_smoothed(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                   raw_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                   z_prev: torch.Tensor, demos: torch.Tensor, *,
                                   ema_decay: float) -> None:
    """Assert ``step`` is the EMA ``z = β·z_prev + (1 − β)·z_raw`` and returns a detached carry.

    ``β = ema_decay`` is the weight on the previous context (the seed's 0.9).
    The elementwise identity implies the seed's norm statement
    ‖z − z_prev‖ = (1 − β)·‖z_raw − z_prev‖ row by row; the message reports that
    ratio for the worst row. ``z_prev`` is passed as a leaf that requires grad
    and ``step`` runs with grad enabled, so a carry that keeps its graph shows.

    Args:
      step: the smoothed carry step ``(z_prev (…, L, D), demos (…, N, D)) -> z (…, L, D)``.
      raw_step: the same encoder's unsmoothed step, ``-> z_raw``; must be
        deterministic (eval mode, no dropout).
      z_prev, demos: finite tensors.
      ema_decay: β in [0, 1]; 0 means no smoothing, 1 a frozen context.

    Raises:
      InvariantViolation: if the returned carry requires grad or has a ``grad_fn``
        (a graph grows across ACT steps), or if any element differs from the EMA
        beyond ``atol + 2·rtol·(β·|z_prev| + (1 − β)·|z_raw|)`` (dtype table; the
        scale is that of the two terms, not of their possibly cancelling sum).
      InvalidArgumentError: if ``ema_decay`` is outside [0, 1], an input is not
        finite, or a step returns the wrong shape.
    """
    __tracebackhide__ = True
    require_in_unit_interval("ema_decay", ema_decay)
    _require_context("z_prev", z_prev)
    _require_context("demos", demos)
    leaf = _leaf(z_prev)
    with torch.enable_grad():
        z = _tensor_out("step(z_prev, demos)", _call("step", step, leaf, demos), z_prev)
    # returning the input itself (a frozen context, β = 1) grows no graph either
    if z is not leaf and (z.requires_grad or z.grad_fn is not None):
        fail("the new carry to be detached (no autograd graph grows across ACT steps)",
             f"step(z_prev, demos) returned a tensor with requires_grad={z.requires_grad}, "
             f"grad_fn={type(z.grad_fn).__name__ if z.grad_fn is not None else None}",
             hint="return the carry as (β·z_prev.detach() + (1 − β)·z_raw).detach(); feed the "
                  "decoder a non-detached context if the encoder must learn")
    # the raw update in the same autograd mode as the step: with grad enabled torch may pick
    # other kernels (e.g. attention's math vs fused path), whose bfloat16 results differ in
    # the last bits; the smoothing, not the kernels, is what E1 judges
    with torch.enable_grad():
        z_raw = _tensor_out("raw_step(z_prev, demos)", _call("raw_step", raw_step, leaf, demos),
                            z_prev).detach()
    tol = tolerance_for(z.dtype)
    beta = float(ema_decay)
    prev, raw, got = (t.detach().double() for t in (z_prev, z_raw, z))
    expected = beta * prev + (1.0 - beta) * raw
    scale = beta * prev.abs() + (1.0 - beta) * raw.abs()
    diff = (got - expected).abs()
    allowed = tol.atol + 2.0 * tol.rtol * scale
    bad = ~(diff <= allowed)
    if bool(bad.any()):
        flat = int(torch.argmax(torch.where(bad, diff - allowed, torch.full_like(diff, -1.0))))
        index = _row_index(flat, diff.shape)
        row = index[:-1]
        step_norm = (got - prev).norm(dim=-1)[row]
        raw_norm = (raw - prev).norm(dim=-1)[row]
        ratio = float(step_norm / raw_norm) if float(raw_norm) > 0 else math.nan
        fail(f"z = {beta:g}·z_prev + {1 - beta:g}·z_raw elementwise, hence "
             f"‖z − z_prev‖ = {1 - beta:g}·‖z_raw − z_prev‖ per row",
             f"{int(bad.sum())} / {diff.numel()} elements differ; worst at index {index}: "
             f"z {float(got[index]):.6g}, expected {float(expected[index]):.6g} (z_prev "
             f"{float(prev[index]):.6g}, z_raw {float(raw[index]):.6g}), |diff| "
             f"{float(diff[index]):.3g} > allowed {float(allowed[index]):.3g} ({z.dtype}); "
             f"row {row}: ‖z − z_prev‖ / ‖z_raw − z_prev‖ = {ratio:.6g}, expected {1 - beta:g}",
             hint="the smoothing factor is not applied (a ratio of 1 means the raw update "
                  "was returned unsmoothed)")


# ---------------------------------------------------------------------- E2
@invariant_check("E2")
def assert_residual_scaled(block: Callable[[torch.Tensor], torch.Tensor],
                           branch: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *,
                           alpha: float, norm: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Assert ``block(z) == norm(z + α·branch(z))``; with α = 0 that is ``norm(z)``.

    The expectation is computed in ``z``'s dtype with the caller's ``norm``, the
    way a correct block computes it, then compared with the dtype table's
    tolerance (the output of ``norm`` is O(1)).

    Args:
      block: the residual sub-block under test, ``z (…, D) -> (…, D)``.
      branch: its residual branch f (attention or MLP), ``z -> f(z)``; must be
        deterministic. Close over extra inputs (demos) with a lambda.
      z: a finite input.
      alpha: the configured residual scale α >= 0 (the seed's 0.3).
      norm: the block's normalisation, e.g.
        ``lambda x: F.rms_norm(x, x.shape[-1:], eps=1e-6)``; required, because a
        different eps changes the result at small magnitudes.

    Raises:
      InvariantViolation: with the element report (how many differ, the worst
        index, the tolerance) if the block does not scale its branch by α.
      InvalidArgumentError: if ``alpha`` is negative or not finite, or ``z`` is not finite.
    """
    __tracebackhide__ = True
    require_non_negative("alpha", alpha)
    _require_context("z", z)
    with torch.no_grad():
        got = _tensor_out("block(z)", _call("block", block, z), z)
        f = _tensor_out("branch(z)", _call("branch", branch, z), z)
        expected = _tensor_out("norm(z + alpha*branch(z))", _call("norm", norm, z + alpha * f), z)
        unscaled = _call("norm", norm, z + f)
    tol = tolerance_for(got.dtype)
    report = compare_tensors(got, expected, tol, what=f"block(z) vs norm(z + {alpha:g}·f(z))")
    if report:
        hint = "the residual scale α is not applied"
        if alpha != 1.0 and compare_tensors(got, unscaled, tol, what="unscaled") is None:
            hint = f"block(z) equals norm(z + f(z)): α = 1 is used where α = {alpha:g} is configured"
        fail(f"block(z) == norm(z + α·f(z)) with α = {alpha:g}"
             + (" (α = 0: block(z) == norm(z))" if alpha == 0 else ""), report, hint=hint)


# ---------------------------------------------------------------------- E3
@invariant_check("E3")
def assert_query_gradient_blocked(query_branch: Callable[[torch.Tensor, torch.Tensor],
                                                         torch.Tensor],
                                  z_prev: torch.Tensor, demos: torch.Tensor) -> None:
    """Assert no gradient reaches ``z_prev`` through the query path.

    ``query_branch(z_prev, demos)`` is the part of the encoder step in which
    the previous context acts as the attention *query* (the cross-attention
    output before the residual add). With the stop-gradient fix its output has
    no autograd path to ``z_prev``: the gradient of a fixed random projection
    (seeded) of the output w.r.t. ``z_prev`` is absent or exactly zero. The
    residual add ``z_prev + α·attn`` keeps its gradient; it is not checked here.

    A broken (non-detached) query is only visible where the attention depends
    on the query: with a single demo (N = 1) the softmax is constant and the
    gradient is zero either way; saturated attention can also zero it.

    Raises:
      InvariantViolation: if some element of d⟨w, query_branch(z_prev)⟩/d z_prev
        is non-zero (the worst element and the count are reported).
    """
    __tracebackhide__ = True
    _require_context("z_prev", z_prev)
    _require_context("demos", demos)
    leaf = _leaf(z_prev)
    with torch.enable_grad():
        out = _call("query_branch", query_branch, leaf, demos)
        require_tensor("query_branch(z_prev, demos)", out)
        if not out.requires_grad:
            return
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        (grad,) = torch.autograd.grad((out * w).sum(), leaf, allow_unused=True)
    if grad is None:
        return
    nonzero = grad != 0
    if bool(nonzero.any()):
        flat = int(torch.argmax(grad.abs().double()))
        index = _row_index(flat, grad.shape)
        fail("no gradient to reach z_prev through the query (query = z_prev.detach())",
             f"{int(nonzero.sum())} / {grad.numel()} elements of d⟨w, attn(z_prev)⟩/d z_prev "
             f"are non-zero; largest |g| = {float(grad.abs().max()):.3g} at index {index}",
             hint="detach the previous context before using it as the attention query")


# ---------------------------------------------------------------------- E4
def _row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(dim=-1)
    var = (x - mean.unsqueeze(-1)).pow(2).mean(dim=-1)
    return mean, var


#: E4 never allows an element error above this share of the row's expected RMS
#: sqrt(v/(v + eps)): an all-zero (or halved) output of a non-constant row cannot pass.
E4_CAP = 0.5


@invariant_check("E4")
def assert_context_rows_normalized(normalize: Callable[[torch.Tensor], torch.Tensor],
                                   context: torch.Tensor, *, eps: float) -> None:
    """Assert ``normalize(context)`` is the layer norm ``(x − mean)/sqrt(v + eps)`` row by row.

    v is the row's (biased) input variance; the reference is computed in
    float64 from the stored input, element by element. So every row comes out
    with mean 0 and variance v/(v + eps): what a layer norm with ``eps`` inside
    the square root gives, and the honest form of the seed's "mean 0, variance 1
    whatever the input scale": the variance is 1 only for rows with v ≫ eps. A
    row with entries of size 1e-4 (v ≈ 1e-8) under ``F.layer_norm``'s default
    eps = 1e-5 comes out with variance ≈ 1e-3. ``eps=0`` states the literal
    claim (variance 1 for every non-constant row); constant rows are expected
    to map to 0.

    Tolerance model, per element with reference r: a float layer norm
    subtracts a rounded mean, so an ill-conditioned row (large |entries|
    relative to its spread) loses accuracy:
    ``atol + 4·rtol·|r| + D·eps_dtype·max|x| / sqrt(v + eps)`` (rtol, atol,
    eps_dtype from the dtype table; the D factor is the summation error),
    capped, for every row with v > 0, at ``atol + E4_CAP·sqrt(v/(v + eps))``
    (half the row's expected RMS), so that no output far from the reference
    (all zeros, a constant) passes however ill-conditioned the row. A constant
    row (v = 0) has reference 0 and no cap: a float layer norm amplifies the
    rounding of its mean by 1/sqrt(eps) (measured: bfloat16 ``F.layer_norm``
    of a width-1 row 1.54 gives -1.3e-5, of a constant row 1e4 up to 0.25). Measured: float32 ``F.layer_norm`` of the
    row ``1e7 + arange(8)`` is off by 0.29 (under the cap 0.5); zeros are off
    by up to 1.53. A non-finite output element is always a violation.

    Args:
      normalize: ``context (…, D) -> (…, D)``, e.g. ``lambda c: F.layer_norm(c, c.shape[-1:])``.
      context: a finite, non-empty tensor whose rows are the last dimension.
      eps: the normaliser's eps (>= 0).

    Raises:
      InvariantViolation: naming the worst element (index, value, reference,
        allowed error) and its row's input scale and variance and observed
        mean and variance.
      InvalidArgumentError: negative eps, an empty or non-finite context, an
        output of another shape or a non-floating output.
    """
    __tracebackhide__ = True
    require_non_negative("eps", eps)
    _require_context("context", context)
    with torch.no_grad():
        out = _tensor_out("normalize(context)", _call("normalize", normalize, context), context)
    require(out.is_floating_point(), "normalize(context).dtype", out.dtype, "must be floating")
    tol = tolerance_for(out.dtype)
    d = context.shape[-1]
    x = context.detach().double()
    mean_in, v_in = _row_stats(x)
    mean_out, var_out = _row_stats(out)
    spread = (v_in + eps).sqrt()                                      # (...)
    safe = spread.clamp_min(1e-300).unsqueeze(-1)
    ref = torch.where(spread.unsqueeze(-1) > 0, (x - mean_in.unsqueeze(-1)) / safe,
                      torch.zeros_like(x))                            # (..., D)
    expected_var = torch.where(v_in > 0, v_in / (v_in + eps), torch.zeros_like(v_in))
    peak = x.abs().amax(dim=-1)
    cond = torch.where(spread > 0, peak / spread.clamp_min(1e-300), torch.zeros_like(peak))
    model = tol.atol + 4 * tol.rtol * ref.abs() + (d * tol.eps * cond).unsqueeze(-1)
    # the cap binds where the reference is not all zero (v > 0); a constant row's reference
    # is exactly 0, so zeros are right there and only rounding noise is to be allowed
    cap = torch.where(v_in > 0, tol.atol + E4_CAP * expected_var.sqrt(),
                      torch.full_like(v_in, math.inf)).unsqueeze(-1)
    allowed = torch.minimum(model, cap.expand_as(model))
    err = (out.detach().double() - ref).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    bad = err > allowed
    if bool(bad.any()):
        flat = int(torch.argmax(torch.where(bad, err - allowed, torch.full_like(err, -1.0))))
        index = _row_index(flat, err.shape)
        row = index[:-1]
        n_rows = int(bad.any(dim=-1).sum())
        fail(f"every context row to be (x − mean)/sqrt(v + eps) with eps={eps:g}, hence mean 0 "
             "and variance v/(v + eps) (variance 1 when v ≫ eps)",
             f"{int(bad.sum())} / {err.numel()} elements in {n_rows} / {mean_in.numel()} rows "
             f"off; worst element {index}: {float(out[index])!r}, reference "
             f"{float(ref[index]):.6g}, allowed error {float(allowed[index]):.3g} ({out.dtype}); "
             f"worst row {row}: mean {float(mean_out[row]):.6g}, variance "
             f"{float(var_out[row]):.6g}, expected variance {float(expected_var[row]):.6g} "
             f"(input variance {float(v_in[row]):.3g}, max|x| {float(peak[row]):.3g})",
             hint="normalise the context over its last dimension before the decoder reads it"
             if eps > 0 else "a layer norm's eps caps the variance of small rows at v/(v + eps)")


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


# -------------------------------------------------------------- strategies
def unit_fractions() -> st.SearchStrategy[float]:
    """Floats in [0, 1] reaching both edges, their float neighbours, 0.3 and 0.9 (the seed's)."""
    edges = [0.0, 1.0, 0.3, 0.9, 0.1, 5e-324, math.nextafter(1.0, 0.0)]
    return st.one_of(st.sampled_from(edges), st.floats(0.0, 1.0))


def lr_scales(*, min_value: float = 0.0, max_value: float = 1.0) -> st.SearchStrategy[float]:
    """Encoder lr scales in [min, max], reaching 0 (freeze), 1 and the seed's 0.1/0.3/0.5."""
    require_non_negative("min_value", min_value)
    require_non_negative("max_value", max_value)
    if max_value < min_value:
        raise InvalidArgumentError(
            f"Cannot have max_value={max_value:g} < min_value={min_value:g}")
    edges = sorted({v for v in (0.0, 0.1, 0.3, 0.5, 1.0, min_value, max_value)
                    if min_value <= v <= max_value})
    return st.one_of(st.sampled_from(edges), st.floats(min_value, max_value))


CONTEXT_KINDS = ("gaussian", "zero", "constant_rows", "mixed_rows")
_KINDS = st.sampled_from(CONTEXT_KINDS)
_SEEDS = st.integers(0, 2 ** 16)


@dataclass(frozen=True)
class ContextSpec:
    """A reproducible recipe for one context tensor; ``tensor()`` builds it.

    Hypothesis reports the spec (one short line) instead of a tensor dump.

    Kinds: ``gaussian`` (N(0, 1) · scale), ``zero``, ``constant_rows`` (every
    row one repeated value · scale: zero variance), ``mixed_rows`` (each row
    at its own decade, log-uniform in [min_scale, scale]).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    scale: float
    seed: int
    noncontiguous: bool = False
    min_scale: float = 1e-4

    def __post_init__(self) -> None:
        require(isinstance(self.shape, tuple) and len(self.shape) >= 2
                and all(isinstance(s, int) and s >= 1 for s in self.shape),
                "shape", self.shape, "must be a tuple of >= 2 integers >= 1, e.g. (B, L, D)")
        require(self.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                "dtype", self.dtype, "must be a floating dtype")
        require(self.kind in CONTEXT_KINDS, "kind", self.kind, f"must be one of {CONTEXT_KINDS}")
        require_positive("scale", self.scale)
        require_positive("min_scale", self.min_scale)

    def __repr__(self) -> str:  # one short, eval-able line for counterexamples
        extra = ", noncontiguous=True" if self.noncontiguous else ""
        if self.kind == "mixed_rows":
            extra += f", min_scale={self.min_scale!r}"
        return (f"ContextSpec({self.shape!r}, {self.dtype}, {self.kind!r}, scale={self.scale!r}, "
                f"seed={self.seed!r}{extra})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis's printer
        printer.text(repr(self))

    def tensor(self) -> torch.Tensor:
        shape = self.shape
        gen = torch.Generator().manual_seed(self.seed)
        base = torch.randn(shape, generator=gen, dtype=torch.float64)
        if self.kind == "zero":
            values = torch.zeros(shape, dtype=torch.float64)
        elif self.kind == "constant_rows":
            values = base[..., :1].expand(shape) * self.scale
        elif self.kind == "mixed_rows":
            lo, hi = math.log10(self.min_scale), math.log10(max(self.scale, self.min_scale))
            e = torch.rand(shape[:-1] + (1,), generator=gen, dtype=torch.float64) * (hi - lo) + lo
            values = base * 10.0 ** e
        else:
            values = base * self.scale
        values = values.to(self.dtype)
        if self.noncontiguous and values.numel() > 1:
            wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=self.dtype)
            wide[..., ::2] = values
            values = wide[..., ::2]  # same values, stride 2 on the last dim
        return values


@st.composite
def _context_spec(draw, batch, slots, width, dtype, scales, min_scale, noncontiguous):
    shape = (draw(batch), draw(slots), draw(width))
    return ContextSpec(shape=shape, dtype=draw(dtype), kind=draw(_KINDS, label="kind"),
                       scale=draw(scales, label="scale"), seed=draw(_SEEDS, label="seed"),
                       noncontiguous=draw(noncontiguous), min_scale=min_scale)


def context_specs(*, batch: Any = None, slots: Any = None, width: Any = 8,
                  dtype: Any = torch.float32, min_magnitude: float = 1e-4,
                  max_magnitude: float = 1e4, noncontiguous: Any = st.booleans()
                  ) -> st.SearchStrategy[ContextSpec]:
    """Recipes (``ContextSpec``) of contexts (B, L, D) with row scales between the bounds.

    Kinds: Gaussian rows times one scale (the bounds and every decade between
    them drawn on purpose, log-uniform otherwise), all zeros, constant rows
    (zero variance), and rows each at its own decade. Also used for demo sets
    (``slots`` = the number of demos N). ``contexts`` draws the tensors directly.

    Args:
      batch, slots, width: ints or strategies (defaults: 1..4 reaching 1, 1..4, 8).
      dtype: a dtype or a strategy of them.
      min_magnitude, max_magnitude: the row scale range, 0 < min <= max.
      noncontiguous: bool or strategy; True yields a stride-2 view.
    """
    require_positive("min_magnitude", min_magnitude)
    require_positive("max_magnitude", max_magnitude)
    if max_magnitude < min_magnitude:
        raise InvalidArgumentError(
            f"Cannot have max_magnitude={max_magnitude:g} < min_magnitude={min_magnitude:g}")
    small = st.one_of(st.just(1), st.integers(1, 4))
    lo, hi = math.log10(min_magnitude), math.log10(max_magnitude)
    decades = [10.0 ** k for k in range(math.ceil(lo), math.floor(hi) + 1)]
    edges = sorted({float(min_magnitude), float(max_magnitude), *decades})
    scales = st.one_of(st.sampled_from(edges), st.floats(lo, hi).map(lambda e: 10.0 ** e))
    return _context_spec(small if batch is None else _as_strategy(batch, "batch"),
                         small if slots is None else _as_strategy(slots, "slots"),
                         _as_strategy(width, "width"), _as_strategy(dtype, "dtype"),
                         scales, float(min_magnitude),
                         _as_strategy(noncontiguous, "noncontiguous"))


def contexts(**kwargs: Any) -> st.SearchStrategy[torch.Tensor]:
    """Context tensors (B, L, D): ``context_specs(**kwargs)`` built with ``.tensor()``."""
    return context_specs(**kwargs).map(ContextSpec.tensor)
