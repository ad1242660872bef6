"""Owns the evolving-context invariants on the encoder step itself, E1-E4 (SPEC seed 004).

The subject is a recurrent encoder refining a context ``z_e`` (B, L, D) from the previous carry
and the demo encodings (B, N, D) at every step. Every check takes the caller's callables: a
carry step ``step(z_prev, demos)`` and its raw form (E1), a residual block and its branch (E2),
the query path (E3), the context normaliser (E4). Inputs must be finite; tolerances come from
the dtype table, growing with the number of summed terms where a quantity is a sum.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_finite, require_in_unit_interval,
                                  require_non_negative, require_tensor)
from invariants._tolerances import tolerance_for

__all__ = [
    "PCT_UNDEFINED_BELOW",
    "assert_context_rows_normalized",
    "assert_context_update_smoothed",
    "assert_query_gradient_blocked",
    "assert_residual_scaled",
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
