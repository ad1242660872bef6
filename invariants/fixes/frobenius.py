"""Owns the seed-000 fix users put in their training code: the per-sample Frobenius-norm clamp
(``clamp_frobenius``) and its float64 yardstick (``frobenius_norms``). No checks live here.
"""
from __future__ import annotations

from typing import Any

import torch

from invariants._validate import (require, require_positive, require_tensor)

__all__ = [
    "clamp_frobenius",
    "frobenius_norms",
]

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


def frobenius_norms(delta: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius norms of ``delta (..., m, n)``, measured in float64: ``(...)``.

    This is the yardstick of every H-check: the stored values are upcast
    exactly, so the only rounding is float64's own (relative ~1e-16).
    """
    _require_delta("delta", delta)
    return torch.linalg.vector_norm(delta.detach().to(torch.float64), dim=(-2, -1))


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
