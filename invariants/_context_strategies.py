"""Owns the Hypothesis strategies of the evolving-context family: context specs and tensors
(Gaussian, zero, constant and mixed rows), unit fractions and LR scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_non_negative, require_positive)
from invariants._strategies import _as_strategy

__all__ = [
    "ContextSpec",
    "context_specs",
    "contexts",
    "lr_scales",
    "unit_fractions",
]

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
