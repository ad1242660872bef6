"""Owns the HyperLoRA invariants on the deltas themselves, H1-H4 (SPEC seed 000).

The checks take what a user already has, not our reference classes: a *delta tensor*
``(..., m, n)`` (every leading index is one sample's ΔW) or a mapping ``name -> tensor``; a
*predictor* (any callable ``context (B, C) -> deltas``); a *clamp* (``clamp(delta, max_norm)``).
Norms are always *measured* in float64 from the stored values (``frobenius_norms``), the
yardstick of the H1 contract (docs/hyperlora.md).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Union

import torch

from invariants._assertions import fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (unravel, require, require_finite, require_non_negative,
                                  require_positive, require_tensor)
from invariants.fixes.frobenius import _eps, _require_delta, frobenius_norms

__all__ = [
    "assert_clamp_identity_below_cap",
    "assert_clamp_preserves_direction",
    "assert_delta_norms_bounded",
    "assert_gradient_reaches_predictor",
    "assert_predictor_deltas_bounded",
]

Deltas = Union[torch.Tensor, Mapping[str, torch.Tensor]]


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
    """Validate ``deltas`` (finite, non-empty) and ``max_norm`` (> 0), then run the clamp."""
    _require_delta("deltas", deltas)
    _require_nonempty("deltas", deltas)
    require_finite("deltas", deltas)
    require_positive("max_norm", max_norm)
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
