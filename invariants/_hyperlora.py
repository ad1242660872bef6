"""HyperLoRA norm-runaway invariants (SPEC seed 000, H1-H7).

The checks take what a user already has, not our reference classes:

* a *delta tensor* ``(..., m, n)`` (every leading index is one sample's ΔW) or a
  mapping ``name -> tensor``;
* a *predictor*: any callable ``context (B, C) -> deltas``;
* a *clamp*: any callable ``clamp(delta, max_norm) -> delta``;
* a *decay term*: any callable ``decay(deltas) -> scalar tensor``;
* an ``torch.optim.Optimizer`` and the HyperLoRA parameters;
* a *governor* following ``NormGovernor``'s protocol (``decide``, ``update``,
  ``reset``, ``clamp``, ``ema_decay``).

Norms are always *measured* in float64 from the stored values:
``‖ΔW_i‖F = vector_norm(ΔW_i.double())``.  That is the yardstick of the H1
contract (docs/hyperlora.md): ``clamp_frobenius`` guarantees ``‖ΔW_i‖F <= τ``
exactly by that yardstick for float64, float32 and bfloat16 deltas; the seed's
float32 formula does not (it overshoots by up to ~1.5 ulp), which is why the
H1 check carries an explicit ``eps_multiple`` knob, 0 by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from hypothesis import strategies as st

from invariants._assertions import fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (unravel, require, require_finite, require_non_negative,
                                  require_positive, require_tensor)
from invariants._strategies import _as_strategy, float_tensors, values_around
from invariants._tolerances import tolerance_for

__all__ = [
    "GOVERNOR_LEVELS",
    "GovernorDecision",
    "NormGovernor",
    "assert_clamp_identity_below_cap",
    "assert_clamp_preserves_direction",
    "assert_delta_norms_bounded",
    "assert_gradient_reaches_predictor",
    "assert_lora_decay_term",
    "assert_norm_governor_acts",
    "assert_param_group_lrs",
    "assert_predictor_deltas_bounded",
    "clamp_frobenius",
    "frobenius_norms",
    "hyperlora_contexts",
    "lora_norm_series",
    "weight_deltas",
]

Deltas = Union[torch.Tensor, Mapping[str, torch.Tensor]]
GOVERNOR_LEVELS = ("ok", "warn", "critical", "kill")

# The margin clamp_frobenius aims under τ, in units of eps(dtype): rounding the
# scale and the product costs at most (1 + eps/2)² ≈ 1 + eps, so 4 eps is
# enough with room for the float64 yardstick's own rounding.
_CLAMP_MARGIN_EPS = 4


# ------------------------------------------------------------------ helpers
def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _require_delta(name: str, delta: Any) -> None:
    require_tensor(name, delta)
    require(delta.is_floating_point(), f"{name}.dtype", delta.dtype, "must be a floating dtype")
    require(delta.dim() >= 2, f"{name}.shape", tuple(delta.shape),
            "must have >= 2 dims (..., m, n): one matrix per leading index")


def _require_nonempty(name: str, delta: torch.Tensor) -> None:
    require(delta.numel() > 0, f"{name}.shape", tuple(delta.shape),
            "must be non-empty (a check on no matrix proves nothing)")


def _as_items(name: str, deltas: Deltas) -> list[tuple[str, torch.Tensor]]:
    if isinstance(deltas, torch.Tensor):
        _require_delta(name, deltas)
        return [("", deltas)]
    require(isinstance(deltas, Mapping) and len(deltas) > 0, name, deltas,
            "must be a tensor (..., m, n) or a non-empty mapping name -> tensor")
    for key, value in deltas.items():
        _require_delta(f"{name}[{key!r}]", value)
    return [(str(k), v) for k, v in deltas.items()]


def _where(key: str, index: tuple[int, ...]) -> str:
    return f"{key}{list(index)}" if key else f"sample {list(index)}"



def frobenius_norms(delta: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius norms of ``delta (..., m, n)``, measured in float64: ``(...)``.

    This is the yardstick of every H-check: the stored values are upcast
    exactly, so the only rounding is float64's own (relative ~1e-16).
    """
    _require_delta("delta", delta)
    return torch.linalg.vector_norm(delta.detach().to(torch.float64), dim=(-2, -1))


def _validate_contexts(contexts: Any, context_dim: int | None) -> None:
    require_tensor("contexts", contexts)
    require(contexts.dim() == 2 and contexts.shape[0] >= 1, "contexts.shape",
            tuple(contexts.shape), "must be (B, C) with B >= 1")
    if context_dim is not None:
        require(contexts.shape[-1] == context_dim, "contexts.shape", tuple(contexts.shape),
                f"last dim must equal context_dim={context_dim}")
    require_finite("contexts", contexts)


def _predict(predict: Callable[[torch.Tensor], Deltas], contexts: torch.Tensor,
             context_dim: int | None) -> Deltas:
    require(callable(predict), "predict", predict, "must be callable contexts (B, C) -> deltas")
    if context_dim is None:
        context_dim = getattr(predict, "context_dim", None)
    _validate_contexts(contexts, context_dim)
    try:
        return predict(contexts)
    except RuntimeError as exc:
        raise InvalidArgumentError(
            f"predict: calling it on contexts.shape={tuple(contexts.shape)}, dtype="
            f"{contexts.dtype} failed ({str(exc).splitlines()[0]}); is the context width "
            "and dtype what the predictor expects?") from None


# ---------------------------------------------------------------- the fix
def clamp_frobenius(delta: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Scale each matrix of ``delta (..., m, n)`` so that ``‖ΔW_i‖F <= max_norm``.

    The seed's §2.2 fix, ``ΔW · min(1, τ/‖ΔW‖F)``, made exact:

    * the norm and the scale are computed in float64 (the seed computes them in
      the delta's dtype, and its float32 result can end a few ulps above τ);
    * a clamped matrix is aimed at ``τ·(1 − 4·eps(dtype))`` and re-measured once;
      where rounding still left it above τ it is scaled again (no sync, no loop);
    * a matrix with ``‖ΔW_i‖F <= τ`` is returned bit for bit (scale exactly 1);
    * the scale is a constant for autograd (as in the seed), so the gradient
      reaches the predictor scaled by it (H4).

    Guarantee (docs/hyperlora.md): ``frobenius_norms(out) <= max_norm`` for
    finite float64/float32/bfloat16/float16 input. Non-finite input is outside
    the domain: NaN passes through, an infinite matrix becomes NaN.

    Raises:
      InvalidArgumentError: if ``max_norm`` is not a finite number > 0 or
        ``delta`` is not a floating tensor with >= 2 dims.
    """
    _require_delta("delta", delta)
    require_positive("max_norm", max_norm)
    target = max_norm * (1.0 - _CLAMP_MARGIN_EPS * _eps(delta.dtype))
    with torch.no_grad():
        norm = torch.linalg.vector_norm(delta.detach().to(torch.float64), dim=(-2, -1),
                                        keepdim=True)                     # (..., 1, 1)
        one = torch.ones_like(norm)
        scale = torch.where(norm > max_norm, target / norm, one)
        trial = delta.detach() * scale.to(delta.dtype)
        again = torch.linalg.vector_norm(trial.to(torch.float64), dim=(-2, -1), keepdim=True)
        scale = torch.where(again > max_norm, scale * (target / again), scale)
    return delta * scale.to(delta.dtype)


# -------------------------------------------------------------------- H1
@invariant_check("H1")
def assert_delta_norms_bounded(deltas: Deltas, *, max_norm: float = 1.0,
                               eps_multiple: float = 0.0) -> None:
    """Assert ``‖ΔW_i‖F <= τ·(1 + k·eps(dtype))`` for every matrix (k = ``eps_multiple``).

    Args:
      deltas: a tensor ``(..., m, n)`` or a mapping ``name -> tensor``.
      max_norm: τ (> 0), the seed's 1.0 by default.
      eps_multiple: k >= 0. The default 0 is the exact contract that
        ``clamp_frobenius`` meets; the seed's float32 formula needs k = 2.

    Raises:
      InvariantViolation: naming the worst matrix (key and index), its norm,
        the excess in units of eps(dtype), and how many matrices exceed; a
        non-finite matrix counts as exceeding.
      InvalidArgumentError: for τ <= 0, k < 0 or a non-tensor.
    """
    __tracebackhide__ = True
    require_positive("max_norm", max_norm)
    require_non_negative("eps_multiple", eps_multiple)
    worst: tuple[float, str, tuple[int, ...], float, torch.dtype] | None = None
    n_bad = n_all = 0
    items = _as_items("deltas", deltas)
    for key, delta in items:
        _require_nonempty(f"deltas[{key!r}]" if key else "deltas", delta)
    for key, delta in items:
        norms = frobenius_norms(delta)
        bound = max_norm * (1.0 + eps_multiple * _eps(delta.dtype))
        excess = torch.where(torch.isfinite(norms), norms - bound,
                             torch.full_like(norms, math.inf))
        n_all += norms.numel()
        n_bad += int((excess > 0).sum())
        if norms.numel() and float(excess.max()) > 0:
            flat = int(torch.argmax(excess))
            index = unravel(flat, norms.shape)
            value = float(norms.reshape(-1)[flat])
            if worst is None or float(excess.max()) > worst[0]:
                worst = (float(excess.max()), key, index, value, delta.dtype)
    if worst is not None:
        _, key, index, value, dtype = worst
        ulps = (value - max_norm) / (max_norm * _eps(dtype))
        allowed = "exactly" if eps_multiple == 0 else f"within {eps_multiple:g}·eps({dtype})"
        fail(f"‖ΔW_i‖F <= max_norm={max_norm:g} {allowed} for every matrix",
             f"{_where(key, index)}: ‖ΔW‖F = {value!r} ({dtype}), {ulps:.3g} eps above τ "
             f"(relative excess {(value - max_norm) / max_norm:.3g}); {n_bad} of {n_all} "
             "matrices exceed",
             hint="clamp with invariants.clamp_frobenius(delta, max_norm) after predicting ΔW")


@invariant_check("H1")
def assert_predictor_deltas_bounded(predict: Callable[[torch.Tensor], Deltas],
                                    contexts: torch.Tensor, *, max_norm: float = 1.0,
                                    eps_multiple: float = 0.0,
                                    context_dim: int | None = None) -> None:
    """Assert every delta ``predict(contexts)`` returns has ``‖ΔW_i‖F <= τ`` (see above).

    Args:
      predict: callable ``contexts (B, C) -> deltas`` (tensor or mapping).
      contexts: finite ``(B, C)``.
      context_dim: expected C; defaults to ``predict.context_dim`` when present.

    Raises:
      InvariantViolation: as ``assert_delta_norms_bounded``.
      InvalidArgumentError: non-finite contexts, wrong width, τ <= 0.
    """
    __tracebackhide__ = True
    require_positive("max_norm", max_norm)
    with torch.no_grad():
        deltas = _predict(predict, contexts, context_dim)
    assert_delta_norms_bounded(deltas, max_norm=max_norm, eps_multiple=eps_multiple)


# -------------------------------------------------------------------- H2
@invariant_check("H2")
def assert_clamp_identity_below_cap(clamp: Callable[[torch.Tensor, float], torch.Tensor],
                                    deltas: torch.Tensor, *, max_norm: float = 1.0) -> int:
    """Assert ``clamp(ΔW, τ)_i == ΔW_i`` bit for bit wherever ``‖ΔW_i‖F <= τ``.

    Returns the number of matrices the identity was checked on (those at or
    below τ by the float64 yardstick), so callers can see it was not vacuous.

    Raises:
      InvariantViolation: naming the first matrix below τ that was changed, its
        norm before/after and the greatest element difference.
      InvalidArgumentError: non-finite deltas, τ <= 0, output of another shape.
    """
    __tracebackhide__ = True
    _require_delta("deltas", deltas)
    _require_nonempty("deltas", deltas)
    require_finite("deltas", deltas)
    require_positive("max_norm", max_norm)
    out = _run_clamp(clamp, deltas, max_norm)
    norms = frobenius_norms(deltas)
    below = norms <= max_norm
    changed = (out.detach() != deltas).flatten(-2).any(-1) & below
    if bool(changed.any()):
        flat = int(torch.nonzero(changed.reshape(-1))[0])
        index = unravel(flat, norms.shape)
        after = float(frobenius_norms(out).reshape(-1)[flat])
        diff = (out.detach().double() - deltas.double()).abs()[index].max()
        fail(f"the clamp to be the identity for ‖ΔW_i‖F <= max_norm={max_norm:g}",
             f"{_where('', index)} with ‖ΔW‖F = {float(norms.reshape(-1)[flat]):.9g} came out "
             f"with ‖·‖F = {after:.9g} (greatest element change {float(diff):.3g}); "
             f"{int(changed.sum())} of {int(below.sum())} matrices at or below τ changed",
             hint="scale by min(1, τ/‖ΔW‖F), not by τ/‖ΔW‖F")
    return int(below.sum())


def _run_clamp(clamp: Callable[[torch.Tensor, float], torch.Tensor], deltas: torch.Tensor,
               max_norm: float) -> torch.Tensor:
    require(callable(clamp), "clamp", clamp, "must be callable as clamp(delta, max_norm)")
    try:
        with torch.no_grad():
            out = clamp(deltas, max_norm)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InvalidArgumentError(
            f"clamp: calling it as clamp(deltas (shape {tuple(deltas.shape)}, {deltas.dtype}), "
            f"max_norm={max_norm:g}) failed ({type(exc).__name__}: {first})") from None
    _require_out(out, deltas)
    return out


def _require_out(out: Any, deltas: torch.Tensor) -> None:
    require_tensor("clamp(deltas)", out)
    if tuple(out.shape) != tuple(deltas.shape):
        raise InvalidArgumentError(
            f"clamp(deltas).shape={tuple(out.shape)} and deltas.shape={tuple(deltas.shape)}: "
            "the clamp must keep the shape")


# -------------------------------------------------------------------- H3
@invariant_check("H3")
def assert_clamp_preserves_direction(clamp: Callable[[torch.Tensor, float], torch.Tensor],
                                     deltas: torch.Tensor, *, max_norm: float = 1.0) -> None:
    """Assert ``clamp(ΔW, τ)_i = c_i·ΔW_i`` with ``0 < c_i <= 1`` (``= 0`` iff ΔW_i = 0).

    ``c_i`` is the least-squares coefficient ⟨out_i, ΔW_i⟩/‖ΔW_i‖² (float64).
    Allowed: residual ‖out_i − c_i·ΔW_i‖ <= 4·eps(dtype)·‖out_i‖ + √(mn)·tiny(dtype)
    (each element is rounded once or twice) and ``c_i <= 1 + 4·eps(dtype)``.

    Raises:
      InvariantViolation: naming the matrix with the worst residual or c; a
        matrix with a non-finite output element always fails and is named first.
      InvalidArgumentError: non-finite or empty deltas, τ <= 0, output of
        another shape, a clamp that cannot be called as ``clamp(deltas, τ)``.
    """
    __tracebackhide__ = True
    _require_delta("deltas", deltas)
    _require_nonempty("deltas", deltas)
    require_finite("deltas", deltas)
    require_positive("max_norm", max_norm)
    out = _run_clamp(clamp, deltas, max_norm)
    eps = _eps(deltas.dtype)
    tiny = float(torch.finfo(deltas.dtype).tiny)
    d = deltas.detach().double().flatten(-2)          # (..., mn)
    o = out.detach().double().flatten(-2)             # (..., mn)
    # work in units of each matrix's largest |element|: squares of 1e-305 underflow to 0
    # in float64 (the thorough profile found ΔW = [[3.9e-305]] read as a zero matrix)
    unit = d.abs().amax(-1)                                       # (...)
    unit = torch.where(unit > 0, unit, torch.ones_like(unit))
    d, o = d / unit.unsqueeze(-1), o / unit.unsqueeze(-1)
    dd = (d * d).sum(-1)
    zero = dd == 0
    c = torch.where(zero, torch.zeros_like(dd), (o * d).sum(-1) / dd.clamp_min(1e-300))
    resid = torch.linalg.vector_norm(o - c.unsqueeze(-1) * d, dim=-1)
    allowed = 4 * eps * torch.linalg.vector_norm(o, dim=-1) + math.sqrt(d.shape[-1]) * tiny / unit
    # NaN compares False with everything: a non-finite output matrix is a violation on its
    # own (its residual and c are NaN), and it ranks as the worst offender
    n_nonfinite = (~torch.isfinite(o)).sum(-1)                    # (...)
    nonfinite = n_nonfinite > 0
    bad_dir = nonfinite | ~(resid <= allowed)
    bad_c = nonfinite | (~zero & ~((c > 0) & (c <= 1 + 4 * eps)))
    if bool((bad_dir | bad_c).any()):
        ratio = torch.where(resid <= allowed, torch.zeros_like(resid),
                            resid / allowed.clamp_min(1e-300))
        score = torch.where(nonfinite, torch.full_like(resid, math.inf),
                            ratio + bad_c.double())
        flat = int(torch.argmax(score.reshape(-1)))
        index = unravel(flat, dd.shape)
        u = float(unit.reshape(-1)[flat])
        r, a = float(resid.reshape(-1)[flat]) * u, float(allowed.reshape(-1)[flat]) * u
        cc = float(c.reshape(-1)[flat])
        fail("clamp(ΔW)_i = c·ΔW_i with 0 < c <= 1 (direction kept, only shrunk)",
             f"{_where('', index)} (‖ΔW‖F = {math.sqrt(float(dd.reshape(-1)[flat])) * u:.6g}): "
             f"best c = {cc:.6g}, residual ‖out − c·ΔW‖ = {r:.3g} (allowed {a:.3g})"
             + (f", {int(n_nonfinite.reshape(-1)[flat])} non-finite output elements"
                if bool(nonfinite.reshape(-1)[flat]) else "")
             + f"; {int((bad_dir | bad_c).sum())} of {dd.numel()} matrices fail"
             + (f" ({int(nonfinite.sum())} with non-finite output)" if bool(nonfinite.any())
                else ""),
             hint="rescale the whole matrix by one factor; clipping elements "
                  "(clamp(-a, a)) changes the direction")


# -------------------------------------------------------------------- H4
@invariant_check("H4")
def assert_gradient_reaches_predictor(predict: Callable[[torch.Tensor], Deltas],
                                      parameters: Iterable[torch.Tensor],
                                      contexts: torch.Tensor, *, max_norm: float = 1.0,
                                      context_dim: int | None = None) -> None:
    """Assert that through *clamped* deltas a finite, non-zero gradient reaches ``parameters``.

    Only the matrices the clamp acted on (output norm within 16·eps(dtype) of τ)
    enter the loss, a fixed seeded random projection of them, so samples the
    clamp left alone cannot hide a detached clamp.

    Raises:
      InvariantViolation: the deltas do not require grad, a parameter's
        gradient is non-finite, or every parameter's gradient is None or zero.
      InvalidArgumentError: no matrix was clamped (contexts too small to
        activate the clamp), bad contexts, no parameters.
    """
    __tracebackhide__ = True
    require_positive("max_norm", max_norm)
    try:
        params = list(parameters)
    except TypeError:
        raise InvalidArgumentError(
            f"parameters={parameters!r:.60}: must be an iterable of tensors") from None
    require(len(params) > 0 and all(isinstance(p, torch.Tensor) and p.requires_grad
                                    for p in params), "parameters", params,
            "must be a non-empty iterable of tensors that require grad")
    with torch.enable_grad():
        deltas = _predict(predict, contexts, context_dim)
        items = _as_items("predict(contexts)", deltas)
        for key, d in items:
            _require_nonempty(f"predict(contexts)[{key!r}]" if key else "predict(contexts)", d)
            bad = ~torch.isfinite(d.detach())
            if bool(bad.any()):
                first = tuple(int(i) for i in torch.nonzero(bad)[0])
                fail("finite deltas from the predictor",
                     f"{_where(key, first[:-2])}: {int(bad.sum())} of {d.numel()} delta elements "
                     f"are non-finite (first at {list(first)}: {float(d.detach()[first])!r})")
        gen = torch.Generator().manual_seed(0)
        terms, n_active = [], 0
        for _, d in items:
            norms = frobenius_norms(d)
            active = norms >= max_norm * (1 - 16 * _eps(d.dtype))
            n_active += int(active.sum())
            w = torch.randn(d.shape, generator=gen, dtype=torch.float64).to(d.dtype)
            terms.append((d * w * active[..., None, None].to(d.dtype)).sum())
        if n_active == 0:
            top = max(float(frobenius_norms(d).max()) for _, d in items)
            raise InvalidArgumentError(
                f"contexts={tuple(contexts.shape)}: the clamp is active for no matrix "
                f"(largest ‖ΔW‖F = {top:.6g} < max_norm={max_norm:g}); use contexts that "
                "drive the predicted norm above τ")
        if not any(d.requires_grad for _, d in items):
            fail("the clamped deltas to stay connected to the predictor's graph",
                 f"predict(contexts) returned deltas that do not require grad ({n_active} "
                 "clamped matrices): the clamp ran under no_grad or detached the delta",
                 hint="compute only the scale under no_grad, then multiply: delta * scale")
        loss = torch.stack([t.to(torch.float64) for t in terms]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    n_none = sum(g is None for g in grads)
    for i, g in enumerate(grads):
        if g is not None and not bool(torch.isfinite(g).all()):
            fail("finite gradients at the predictor when the clamp is active",
                 f"parameter {i} (shape {tuple(params[i].shape)}): "
                 f"{int((~torch.isfinite(g)).sum())} non-finite gradient elements")
    largest = max((float(g.abs().max()) for g in grads if g is not None and g.numel()),
                  default=0.0)
    if largest == 0.0:
        fail("a non-zero gradient at the predictor's parameters when the clamp is active",
             f"{n_none} of {len(params)} parameters got None and the rest exactly zero "
             f"over {n_active} clamped matrices",
             hint="the clamp must not detach the delta; only the scale may be a constant")


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


# ------------------------------------------------------------- governor (H7)
@dataclass(frozen=True)
class GovernorDecision:
    """What the governor decided for one observed norm.

    ``action`` is ``"stop"`` (kill level or EMA early stop), ``"clamp"`` (level
    critical or worse and the governor enforces the clamp) or ``"none"``.
    """

    step: int
    norm: float
    level: str
    ema: float
    early_stop: bool
    action: str

    @property
    def acts(self) -> bool:
        return self.action != "none"


class NormGovernor:
    """The LoRA-norm governor of seed 000, as a component that acts.

    Levels: ``ok`` (norm <= warn), ``warn`` (> warn), ``critical`` (> critical),
    ``kill`` (> kill or non-finite). Levels are monotone in the norm by
    construction (a sum of three step functions over ordered thresholds).
    EMA: ``ema_0 = norm_0``, ``ema_t = d·ema_{t-1} + (1−d)·norm_t``; early stop
    when ``ema_t > early_stop_ema`` (seed §3.3: 1.5).
    Actions: at ``critical`` the governor enforces ``clamp_frobenius(·, max_norm)``
    on the deltas it is given; at ``kill`` or early stop it asks to stop.

    Args:
      warn, critical, kill: thresholds, 0 < warn < critical < kill
        (seed "FIXES APPLIED": 1.0 / 1.5 / 2.0; pre-fix 2.0 / 5.0 / 10.0).
      early_stop_ema: EMA threshold (> 0) or ``None`` to disable early stop.
      ema_decay: d in [0, 1). The seed gives none; 0.5 per epoch (half-life
        one epoch) stops at epoch 41 on the seed's timeline (docs).
      max_norm: τ of the enforced clamp (> 0).
      enforce_clamp: False for a monitor-only governor.

    Raises:
      InvalidArgumentError: thresholds not finite, not > 0 or not ordered.
    """

    def __init__(self, *, warn: float = 1.0, critical: float = 1.5, kill: float = 2.0,
                 early_stop_ema: float | None = 1.5, ema_decay: float = 0.5,
                 max_norm: float = 1.0, enforce_clamp: bool = True):
        for name, value in (("warn", warn), ("critical", critical), ("kill", kill)):
            require_positive(name, value)
        if not warn < critical < kill:
            raise InvalidArgumentError(
                f"Cannot have warn={warn:g}, critical={critical:g}, kill={kill:g}: "
                "thresholds must satisfy 0 < warn < critical < kill")
        if early_stop_ema is not None:
            require_positive("early_stop_ema", early_stop_ema)
        require(isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0,
                "ema_decay", ema_decay, "must lie in [0, 1)")
        require_positive("max_norm", max_norm)
        self.warn, self.critical, self.kill = float(warn), float(critical), float(kill)
        self.early_stop_ema = None if early_stop_ema is None else float(early_stop_ema)
        self.ema_decay = float(ema_decay)
        self.max_norm = float(max_norm)
        self.enforce_clamp = bool(enforce_clamp)
        self.reset()

    @classmethod
    def monitor_only(cls) -> "NormGovernor":
        """The seed's pre-fix governor (§1.3): warn 2.0 / critical 5.0 / kill 10.0, no clamp, no EMA stop."""
        return cls(warn=2.0, critical=5.0, kill=10.0, early_stop_ema=None, enforce_clamp=False)

    def __repr__(self) -> str:
        return (f"NormGovernor(warn={self.warn:g}, critical={self.critical:g}, kill={self.kill:g}, "
                f"early_stop_ema={self.early_stop_ema}, ema_decay={self.ema_decay:g}, "
                f"max_norm={self.max_norm:g}, enforce_clamp={self.enforce_clamp})")

    def reset(self) -> None:
        self._step = 0
        self._ema: float | None = None

    def decide(self, norms: torch.Tensor | float) -> torch.Tensor:
        """Levels (0 ok, 1 warn, 2 critical, 3 kill) for a tensor of norms; same shape, int64.

        Vectorised and sync-free: use it on the hot path. Non-finite norms are ``kill``.
        """
        n = torch.as_tensor(norms).detach()
        level = (n > self.warn).long() + (n > self.critical).long() + (n > self.kill).long()
        return torch.where(torch.isfinite(n), level, torch.full_like(level, 3))

    def clamp(self, delta: torch.Tensor) -> torch.Tensor:
        """Enforce ``‖ΔW_i‖F <= max_norm`` (identity when the governor does not enforce)."""
        return clamp_frobenius(delta, self.max_norm) if self.enforce_clamp else delta

    def update(self, norm: torch.Tensor | float) -> GovernorDecision:
        """Observe one step's norm; return the decision (one host sync for a tensor)."""
        value = float(norm)
        level = int(self.decide(torch.tensor(value, dtype=torch.float64)))
        if math.isfinite(value):
            self._ema = value if self._ema is None else \
                self.ema_decay * self._ema + (1.0 - self.ema_decay) * value
        ema = math.nan if self._ema is None else self._ema
        early = self.early_stop_ema is not None and (ema > self.early_stop_ema
                                                     or not math.isfinite(value))
        if level == 3 or early:
            action = "stop"
        elif level >= 2 and self.enforce_clamp:
            action = "clamp"
        else:
            action = "none"
        decision = GovernorDecision(self._step, value, GOVERNOR_LEVELS[level], ema, early, action)
        self._step += 1
        return decision

    def replay(self, norms: Iterable[float]) -> list[GovernorDecision]:
        """Reset, then ``update`` on every norm in order (offline, e.g. a logged run)."""
        self.reset()
        return [self.update(n) for n in norms]


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


# --------------------------------------------------------------- strategies
@st.composite
def _seeded_gaussian(draw, shape, dtype, magnitudes):
    """A seeded N(0, 1) tensor times a drawn magnitude: cheap to draw and to shrink."""
    shape, dtype = tuple(draw(shape)), draw(dtype)
    seed = draw(st.integers(0, 2**16))
    scale = draw(magnitudes)
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _decades(lo: float, hi: float) -> list[float]:
    out = {lo, hi}
    if lo > 0:
        k = math.floor(math.log10(lo))
        while 10.0 ** k <= hi:
            if 10.0 ** k >= lo:
                out.add(10.0 ** k)
            k += 1
    return sorted(out)


def hyperlora_contexts(*, width: Any = 8, min_batch: int = 1, max_batch: int = 4,
                       dtype: Any = torch.float32, min_magnitude: float = 1e-6,
                       max_magnitude: float = 1e6) -> st.SearchStrategy[torch.Tensor]:
    """Finite context batches ``(B, width)`` reaching tiny and huge magnitudes.

    Two kinds, the first one being what failures shrink to: a seeded Gaussian
    times a magnitude (every decade of [min, max] on purpose, plus uniform),
    and element-wise ``float_tensors`` (zeros, mixed decades, stride-2 views).
    Batch 1 and ``max_batch`` are drawn on purpose.
    """
    for name, value in (("min_batch", min_batch), ("max_batch", max_batch)):
        require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
    if max_batch < min_batch:
        raise InvalidArgumentError(f"Cannot have max_batch={max_batch} < min_batch={min_batch}")
    require(isinstance(min_magnitude, (int, float)) and min_magnitude >= 0, "min_magnitude",
            min_magnitude, "must be a number >= 0")
    require(isinstance(max_magnitude, (int, float)) and math.isfinite(max_magnitude)
            and max_magnitude >= min_magnitude, "max_magnitude", max_magnitude,
            f"must be finite and >= min_magnitude={min_magnitude:g}")
    batch = st.one_of(st.sampled_from(sorted({min_batch, max_batch})),
                      st.integers(min_batch, max_batch))
    shape = st.tuples(batch, _as_strategy(width, "width"))
    dt = _as_strategy(dtype, "dtype")
    magnitudes = st.one_of(st.sampled_from(_decades(min_magnitude, max_magnitude)),
                           st.floats(min_magnitude, max_magnitude))
    return st.one_of(_seeded_gaussian(shape, dt, magnitudes),
                     float_tensors(shape=shape, dtype=dtype, min_magnitude=min_magnitude,
                                   max_magnitude=max_magnitude))


@st.composite
def _weight_deltas(draw, directions, dtype, norms):
    direction = draw(directions)                          # (B, m, n) float64
    dt = draw(dtype)
    target = torch.tensor([draw(norms) for _ in range(direction.shape[0])], dtype=torch.float64)
    length = torch.linalg.vector_norm(direction, dim=(-2, -1))
    scale = torch.where(length > 0, target / length.clamp_min(1e-300), torch.zeros_like(length))
    return (direction * scale[:, None, None]).to(dt)


def weight_deltas(*, norms: Any = None, max_norm: float = 1.0, min_batch: int = 1,
                  max_batch: int = 3, min_side: int = 1, max_side: int = 5,
                  dtype: Any = None) -> st.SearchStrategy[torch.Tensor]:
    """Delta batches ``(B, m, n)`` whose per-matrix Frobenius norms come from ``norms``.

    Default norms: just below/at/above ``max_norm`` (exact dtype neighbours), 0,
    tiny (1e-6) and huge (1e4, 1e6). The direction is a seeded Gaussian (what
    failures shrink to) or element-wise ``float_tensors`` (zeros, mixed
    decades); a zero direction gives a zero matrix. The norm is set in float64, then cast, so float32/bfloat16 land within an ulp.
    Default dtype: float32, float64 or bfloat16.
    """
    require_positive("max_norm", max_norm)
    for name, value in (("min_batch", min_batch), ("max_batch", max_batch),
                        ("min_side", min_side), ("max_side", max_side)):
        require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
    if max_batch < min_batch:
        raise InvalidArgumentError(f"Cannot have max_batch={max_batch} < min_batch={min_batch}")
    if max_side < min_side:
        raise InvalidArgumentError(f"Cannot have max_side={max_side} < min_side={min_side}")
    if norms is None:
        norms = st.one_of(values_around(max_norm),
                          st.sampled_from([0.0, 1e-6, 1e4, 1e6]),
                          st.floats(0.0, 10.0 * max_norm))
    dims = st.one_of(st.just(min_side), st.integers(min_side, max_side))
    shapes = st.tuples(st.one_of(st.just(min_batch), st.integers(min_batch, max_batch)),
                       dims, dims)
    directions = st.one_of(
        _seeded_gaussian(shapes, st.just(torch.float64), st.just(1.0)),
        float_tensors(shape=shapes, dtype=torch.float64, min_magnitude=1e-3,
                      max_magnitude=1e3, noncontiguous=False))
    return _weight_deltas(directions,
                          st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
                          if dtype is None else _as_strategy(dtype, "dtype"),
                          _as_strategy(norms, "norms"))


def lora_norm_series(*, min_size: int = 1, max_size: int = 30,
                     thresholds: Sequence[float] = (1.0, 1.5, 2.0),
                     landmarks: Sequence[float] = (1.714,),
                     max_value: float = 20.0) -> st.SearchStrategy[list[float]]:
    """Lists of finite norms aimed at the governor's edges.

    Each element is 0, just below/at/above a threshold (exact float32
    neighbours), a landmark (the seed's 1.714), or uniform in [0, max_value].
    """
    require(isinstance(min_size, int) and min_size >= 1, "min_size", min_size,
            "must be an integer >= 1")
    require(isinstance(max_size, int), "max_size", max_size, "must be an integer")
    if max_size < min_size:
        raise InvalidArgumentError(f"Cannot have max_size={max_size} < min_size={min_size}")
    require_positive("max_value", max_value)
    parts = [values_around(t, spread=0.1) for t in thresholds]
    parts += [st.sampled_from([0.0, *landmarks]), st.floats(0.0, max_value)]
    return st.lists(st.one_of(parts), min_size=min_size, max_size=max_size)
