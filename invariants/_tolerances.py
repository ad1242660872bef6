"""Tolerances: the one ``Tolerance`` type and the one dtype table every comparison uses.

The table's values are torch.testing.assert_close's defaults, so a check that passes
here passes there. ``eps`` is the unit roundoff used by bound checks stated as
``bound * (1 + k * eps)`` (see SPEC note on H1); a tolerance that is not tied to a dtype
(a golden curve's per-metric ``rtol``/``atol``) leaves it at 0. ``GoldenTolerance`` (in
``invariants.golden``) is this same type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from invariants._errors import InvalidArgumentError
from invariants._validate import require_non_negative

__all__ = ["TOLERANCES", "Tolerance", "tolerance_for"]


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|``; every field finite and >= 0."""

    rtol: float
    atol: float
    eps: float = 0.0  # unit roundoff of the dtype (bound checks); 0: not tied to a dtype

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "eps"):
            require_non_negative(name, getattr(self, name))


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-7, atol=1e-7, eps=torch.finfo(torch.float64).eps),
    torch.float32: Tolerance(rtol=1.3e-6, atol=1e-5, eps=torch.finfo(torch.float32).eps),
    torch.float16: Tolerance(rtol=1e-3, atol=1e-5, eps=torch.finfo(torch.float16).eps),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-5, eps=torch.finfo(torch.bfloat16).eps),
}


def tolerance_for(dtype: torch.dtype, *, rtol: float | None = None,
                  atol: float | None = None) -> Tolerance:
    """The table's tolerance for ``dtype``, with optional explicit overrides."""
    if dtype not in TOLERANCES:
        raise InvalidArgumentError(
            f"dtype={dtype}: no tolerance defined; known dtypes are "
            f"{sorted(str(d) for d in TOLERANCES)}")
    base = TOLERANCES[dtype]
    return Tolerance(rtol=base.rtol if rtol is None else rtol,
                     atol=base.atol if atol is None else atol, eps=base.eps)
