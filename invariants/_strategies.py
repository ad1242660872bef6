"""Hypothesis strategies that reach the edges.

Plural nouns, keyword-only bounds, small defaults; every parameter takes a value
or a strategy.  Arguments are validated before anything is drawn, and errors
echo ``name=value``.  The edges we aim at: exact zero, tiny and huge
magnitudes, values just below / at / above a bound, batch 1, rank 1, bfloat16,
and non-contiguous tensors.

Strategy objects that a draw would otherwise rebuild every time (the element strategy and
the array strategy inside ``float_tensors``, and ``float_tensors`` itself, which the cases
call inside their properties) are built once per distinct argument set and reused: Hypothesis
validates and labels a new strategy object on its first draw, which cost more than the draw.
A strategy's draws depend on its structure only, so reuse never changes an example.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from invariants._errors import InvalidArgumentError
from invariants._validate import require

__all__ = ["LoraConfig", "dtypes", "float_tensors", "lora_configs", "values_around"]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DEFAULT_SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)


def _as_strategy(value: Any, name: str) -> st.SearchStrategy:
    if isinstance(value, st.SearchStrategy):
        return value
    require(value is not None, name, value, "must be a value or a strategy")
    return st.just(value)


def dtypes(*, include: Sequence[torch.dtype] = (torch.float32, torch.float64,
                                                 torch.bfloat16)) -> st.SearchStrategy:
    """Floating dtypes; float32 first, so it is what examples shrink towards."""
    include = tuple(include)
    require(len(include) > 0, "include", include, "must name at least one dtype")
    for d in include:
        require(d in FLOAT_DTYPES, "include", d, f"must be one of {FLOAT_DTYPES}")
    return st.sampled_from(include)


@functools.lru_cache(maxsize=256)
def _elements(min_magnitude: float, max_magnitude: float,
              allow_zero: bool) -> st.SearchStrategy[float]:
    """Signed values with |x| in [min, max]: the edges, every decade between, and uniform.

    Built only from reusable strategies (no ``map``/``filter``), so
    ``hnp.arrays`` can fill large arrays sparsely instead of drawing each element.
    """
    edges = {min_magnitude, max_magnitude}
    lo = max(min_magnitude, 1e-300)
    if max_magnitude > 0:
        for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(max_magnitude)) + 1):
            if min_magnitude <= 10.0 ** k <= max_magnitude:
                edges.add(10.0 ** k)
    edges.discard(0.0)
    signed = sorted({v for e in edges for v in (e, -e)})
    parts: list[st.SearchStrategy[float]] = []
    if allow_zero or min_magnitude == 0.0:
        parts.append(st.just(0.0))
    if signed:
        parts.append(st.sampled_from(signed))
    if max_magnitude > min_magnitude:
        parts += [st.floats(min_magnitude, max_magnitude), st.floats(-max_magnitude, -min_magnitude)]
    return st.one_of(parts)


@functools.lru_cache(maxsize=1024)
def _arrays(shape: tuple[int, ...], element: st.SearchStrategy[float]) -> st.SearchStrategy:
    return hnp.arrays(np.float64, shape, elements=element)


@st.composite
def _tensor(draw, shape, dtype, min_magnitude, max_magnitude, allow_zero, noncontiguous):
    shape = tuple(draw(shape))
    dtype = draw(dtype)
    limit = float(torch.finfo(dtype).max)
    if max_magnitude > limit:
        raise InvalidArgumentError(
            f"max_magnitude={max_magnitude:g}: exceeds the largest finite {dtype} ({limit:g})")
    array = draw(_arrays(shape, _elements(min_magnitude, max_magnitude, allow_zero)))
    values = torch.from_numpy(array).to(dtype)
    if draw(noncontiguous) and len(shape) >= 1 and values.numel() > 1:
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        wide[..., ::2] = values
        values = wide[..., ::2]  # same values, stride 2 on the last dim
    return values


def float_tensors(*, shape: Any = _DEFAULT_SHAPES, dtype: Any = torch.float32,
                  min_magnitude: float = 0.0, max_magnitude: float = 1e3,
                  allow_zero: bool = True, noncontiguous: Any = st.booleans()
                  ) -> st.SearchStrategy[torch.Tensor]:
    """Finite floating tensors whose non-zero elements have |x| in [min, max].

    Args:
      shape: a tuple or a strategy of tuples (default: 1-3 dims, sides 1-6).
      dtype: a torch dtype or a strategy of them (see ``dtypes``).
      min_magnitude, max_magnitude: bounds on |x| of the non-zero elements; both
        edges and every power of ten between them are drawn on purpose.
      allow_zero: whether exact zeros may be drawn (``min_magnitude=0`` implies it).
      noncontiguous: bool or strategy; True yields a stride-2 view.
    """
    require(isinstance(min_magnitude, (int, float)) and min_magnitude >= 0,
            "min_magnitude", min_magnitude, "must be a number >= 0")
    require(isinstance(max_magnitude, (int, float)) and math.isfinite(max_magnitude),
            "max_magnitude", max_magnitude, "must be a finite number")
    if max_magnitude < min_magnitude:
        raise InvalidArgumentError(
            f"Cannot have max_magnitude={max_magnitude:g} < min_magnitude={min_magnitude:g}")
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES \
            and max_magnitude > float(torch.finfo(dtype).max):
        raise InvalidArgumentError(
            f"max_magnitude={max_magnitude:g}: exceeds the largest finite {dtype} "
            f"({float(torch.finfo(dtype).max):g})")
    if isinstance(shape, tuple):
        for side in shape:
            require(isinstance(side, int) and side >= 0, "shape", shape,
                    "sides must be integers >= 0")
    key = (shape, dtype, float(min_magnitude), float(max_magnitude), allow_zero, noncontiguous)
    try:
        return _float_tensors(*key)
    except TypeError:  # an unhashable argument (a list shape): build it uncached
        return _float_tensors.__wrapped__(*key)


@functools.lru_cache(maxsize=1024)
def _float_tensors(shape: Any, dtype: Any, min_magnitude: float, max_magnitude: float,
                   allow_zero: bool, noncontiguous: Any) -> st.SearchStrategy[torch.Tensor]:
    return _tensor(_as_strategy(shape, "shape"), _as_strategy(dtype, "dtype"),
                   min_magnitude, max_magnitude, allow_zero,
                   _as_strategy(noncontiguous, "noncontiguous"))


def _next_in(t: torch.Tensor, towards: float) -> torch.Tensor:
    """The neighbouring representable value of ``t`` in its own dtype.

    ``torch.nextafter`` has no bfloat16 kernel, and stepping in float32 then rounding
    back lands on ``t`` again; for bfloat16 step the 16-bit pattern itself (positive
    finite values: the next pattern up is the next value up).
    """
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16)
        step = 1 if towards > float(t) else -1
        if float(t) < 0:
            step = -step
        return (bits + step).view(torch.bfloat16)
    return torch.nextafter(t, torch.tensor(towards, dtype=t.dtype))


def values_around(bound: float, *, dtype: torch.dtype = torch.float32,
                  ulps: int = 4, spread: float = 0.5) -> st.SearchStrategy[float]:
    """Values just below, at and just above ``bound``, plus a wider neighbourhood.

    The near edges are exact neighbours in ``dtype`` (``ulps`` steps either
    side), because that is where ``<=`` bounds break.
    """
    require(isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0,
            "bound", bound, "must be a finite number > 0")
    require(isinstance(ulps, int) and ulps >= 1, "ulps", ulps, "must be an integer >= 1")
    require(0 < spread < 1, "spread", spread, "must lie in (0, 1)")
    t = torch.tensor(bound, dtype=dtype)
    near = [float(t)]
    up, down = t.clone(), t.clone()
    for _ in range(ulps):
        up, down = _next_in(up, math.inf), _next_in(down, 0.0)
        near += [float(up), float(down)]
    return st.one_of(st.sampled_from(sorted(set(near))),
                     st.floats(bound * (1 - spread), bound * (1 + spread)))


@dataclass(frozen=True)
class LoraConfig:
    """Shape and hyper-parameters of one LoRA-adapted linear layer."""

    in_features: int
    out_features: int
    rank: int
    scale: float
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("in_features", "out_features", "rank"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require(isinstance(self.scale, (int, float)) and math.isfinite(self.scale)
                and self.scale >= 0, "scale", self.scale, "must be a finite number >= 0")
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must lie in [0, 1)")


@st.composite
def _lora_config(draw, in_features, out_features, rank, scale, dropout):
    i = draw(in_features)
    o = draw(out_features)
    r = draw(rank) if rank is not None else draw(
        st.one_of(st.just(1), st.integers(1, max(1, min(i, o)))))
    return LoraConfig(in_features=i, out_features=o, rank=r, scale=draw(scale),
                      dropout=draw(dropout))


def lora_configs(*, in_features: Any = None, out_features: Any = None, rank: Any = None,
                 scale: Any = None, dropout: Any = None, max_features: int = 32
                 ) -> st.SearchStrategy[LoraConfig]:
    """LoRA layer configs reaching rank 1, rank = min(in, out), width 1, scales 1e-4..100.

    Each argument is a value or a strategy; ``None`` picks the edge-seeking default.
    """
    require(isinstance(max_features, int) and max_features >= 1, "max_features",
            max_features, "must be an integer >= 1")
    feats = st.one_of(st.sampled_from([1, max_features]), st.integers(1, max_features))
    return _lora_config(
        feats if in_features is None else _as_strategy(in_features, "in_features"),
        feats if out_features is None else _as_strategy(out_features, "out_features"),
        None if rank is None else _as_strategy(rank, "rank"),
        st.one_of(st.sampled_from([1e-4, 0.1, 1.0, 10.0]), st.floats(1e-4, 100.0))
        if scale is None else _as_strategy(scale, "scale"),
        st.sampled_from([0.0, 0.05, 0.5]) if dropout is None else _as_strategy(dropout, "dropout"),
    )
