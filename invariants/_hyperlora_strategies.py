"""Owns the Hypothesis strategies of the HyperLoRA family: contexts, weight deltas around τ and
LoRA-norm series.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from hypothesis import strategies as st

from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_positive)
from invariants._strategies import _as_strategy, float_tensors, values_around

__all__ = [
    "hyperlora_contexts",
    "lora_norm_series",
    "weight_deltas",
]

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
