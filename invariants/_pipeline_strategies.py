"""Owns the Hypothesis strategies of the curriculum-pipeline family: LR schedule configs,
validation-loss sequences, gradient sets around the clip norm, split sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_max_norm, require_min_delta, require_non_negative,
                                  require_positive)
from invariants._strategies import _as_strategy, values_around

__all__ = [
    "LRScheduleConfig",
    "gradient_sets",
    "lr_schedule_configs",
    "split_sizes",
    "val_loss_sequences",
]

# ---------------------------------------------------------------- strategies
@dataclass(frozen=True)
class LRScheduleConfig:
    """A warmup + cosine schedule: ``total_steps`` scheduler steps, the first ``warmup_steps`` linear."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        require(isinstance(self.total_steps, int) and self.total_steps >= 1, "total_steps",
                self.total_steps, "must be an integer >= 1")
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
                self.warmup_steps, "must be an integer >= 0")
        require(self.warmup_steps < self.total_steps, "warmup_steps", self.warmup_steps,
                f"must be < total_steps={self.total_steps} (warmup longer than the schedule)")
        require_positive("peak_lr", self.peak_lr)
        require_non_negative("eta_min", self.eta_min)
        require(self.eta_min <= self.peak_lr, "eta_min", self.eta_min,
                f"must be <= peak_lr={self.peak_lr:g}")


@st.composite
def _lr_schedule_config(draw, total, fraction, peak, eta_ratio):
    t = draw(total)
    f = draw(fraction)
    w = min(t - 1, int(f * t))
    p = draw(peak)
    return LRScheduleConfig(total_steps=t, warmup_steps=w, peak_lr=p, eta_min=p * draw(eta_ratio))


def lr_schedule_configs(*, min_total_steps: int = 1, max_total_steps: int = 300,
                        warmup_fraction: Any = None, peak_lr: Any = None,
                        eta_min_ratio: Any = None) -> st.SearchStrategy[LRScheduleConfig]:
    """Schedules from 1 step up, warmup fractions 0, tiny, 0.1, 0.5 and just below 1.

    ``warmup_steps = min(total - 1, int(fraction·total))``; ``eta_min = ratio·peak``
    with ratios 0, 1e-4 (the seed's 1e-6 against lr 0.01) and up to 1.
    """
    require(isinstance(min_total_steps, int) and min_total_steps >= 1, "min_total_steps",
            min_total_steps, "must be an integer >= 1")
    if max_total_steps < min_total_steps:
        raise InvalidArgumentError(f"Cannot have max_total_steps={max_total_steps} < "
                                   f"min_total_steps={min_total_steps}")
    total = st.one_of(st.sampled_from(sorted({min_total_steps, min(min_total_steps + 1,
                                                                   max_total_steps),
                                              max_total_steps})),
                      st.integers(min_total_steps, max_total_steps))
    frac = st.one_of(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.999]), st.floats(0.0, 0.999)) \
        if warmup_fraction is None else _as_strategy(warmup_fraction, "warmup_fraction")
    peak = st.one_of(st.sampled_from([0.01, 0.005, 1.0]), st.floats(1e-6, 10.0)) \
        if peak_lr is None else _as_strategy(peak_lr, "peak_lr")
    ratio = st.one_of(st.sampled_from([0.0, 1e-4, 0.1]), st.floats(0.0, 1.0)) \
        if eta_min_ratio is None else _as_strategy(eta_min_ratio, "eta_min_ratio")
    return _lr_schedule_config(total, frac, peak, ratio)


VAL_LOSS_KINDS = ("flat", "improving", "noisy", "improving_then_diverging")


@st.composite
def _val_losses(draw, kind, size, start, step, min_value, max_value):
    k = draw(kind)
    n = draw(size)
    v0 = draw(start)
    if k == "flat":
        return [v0] * n
    if k == "noisy":
        return [draw(st.floats(min_value, max_value)) for _ in range(n)]
    turn = n if k == "improving" else draw(st.integers(1, n))
    out, v = [], v0
    for i in range(n):
        out.append(v)
        d = draw(step)
        v = max(min_value, v - d) if i + 1 < turn else min(max_value, v + d)
    return out


def val_loss_sequences(*, kind: Any = None, min_size: int = 1, max_size: int = 12,
                       min_delta: float = 0.01, min_value: float = 0.1,
                       max_value: float = 5.0) -> st.SearchStrategy[list[float]]:
    """Validation-loss curves: flat (the seed's 2.5 forever), improving, noisy, improving-then-diverging.

    Step sizes sit on the ``min_delta`` edge (0, half, just below, at, just
    above, double) as well as large, so "improvement" decisions are tested
    where they flip.
    """
    require(isinstance(min_size, int) and min_size >= 1, "min_size", min_size,
            "must be an integer >= 1")
    if max_size < min_size:
        raise InvalidArgumentError(f"Cannot have max_size={max_size} < min_size={min_size}")
    require_min_delta(min_delta)
    if not 0 <= min_value < max_value:
        raise InvalidArgumentError(f"Cannot have max_value={max_value} <= min_value={min_value}"
                                   " (min_value must be >= 0)")
    if kind is not None and not isinstance(kind, st.SearchStrategy):
        require(kind in VAL_LOSS_KINDS, "kind", kind, f"must be one of {VAL_LOSS_KINDS}")
    kinds = st.sampled_from(VAL_LOSS_KINDS) if kind is None else _as_strategy(kind, "kind")
    size = st.one_of(st.sampled_from(sorted({min_size, max_size})),
                     st.integers(min_size, max_size))
    start = st.one_of(st.just(min(max(2.5, min_value), max_value)),
                      st.floats(min_value, max_value))
    d = min_delta
    edges = sorted({0.0, d / 2, math.nextafter(d, 0.0), d, math.nextafter(d, math.inf), 2 * d,
                    d + 1e-3, 0.3})
    step = st.one_of(st.sampled_from(edges), st.floats(0.0, 0.5))
    return _val_losses(kinds, size, start, step, min_value, max_value)


@st.composite
def _gradient_set(draw, max_norm, dtype, max_tensors, max_side):
    k = draw(st.integers(1, max_tensors))
    shapes = [tuple(draw(st.lists(st.integers(1, max_side), min_size=1, max_size=2)))
              for _ in range(k)]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    raw = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if draw(st.booleans()):  # exact zeros somewhere (a frozen or dead parameter)
        raw[draw(st.integers(0, k - 1))].zero_()
    norm = float(torch.cat([r.flatten() for r in raw]).norm())
    target = draw(st.one_of(values_around(max_norm, dtype=torch.float64),
                            st.sampled_from([0.0, 1e-6 * max_norm, 1e3 * max_norm]),
                            st.floats(0.0, 10.0 * max_norm)))
    scale = target / norm if norm > 0 else 0.0
    d = draw(dtype)
    return [(r * scale).to(d) for r in raw]


def gradient_sets(*, max_norm: float = 1.0, dtype: Any = torch.float32, max_tensors: int = 3,
                  max_side: int = 5) -> st.SearchStrategy[list[torch.Tensor]]:
    """Lists of 1..max_tensors finite gradients whose total L2 norm sits around ``max_norm``.

    Total norms: exact ulp-neighbours of the cap (``values_around``), zero,
    tiny, 1000× the cap and uniform up to 10×; sometimes one tensor all zero.
    """
    require_max_norm(max_norm)
    require(isinstance(max_tensors, int) and max_tensors >= 1, "max_tensors", max_tensors,
            "must be an integer >= 1")
    require(isinstance(max_side, int) and max_side >= 1, "max_side", max_side,
            "must be an integer >= 1")
    return _gradient_set(max_norm, _as_strategy(dtype, "dtype"), max_tensors, max_side)


def split_sizes(*, fraction: float = 0.2, min_size: int = 1,
                max_size: int = 400) -> st.SearchStrategy[int]:
    """Dataset sizes where ``round(fraction·n)`` is about to change, plus 1, 2 and uniform."""
    require(isinstance(fraction, float) and 0 < fraction < 1, "fraction", fraction,
            "must be a float in (0, 1)")
    require(isinstance(min_size, int) and min_size >= 1, "min_size", min_size,
            "must be an integer >= 1")
    if max_size < min_size:
        raise InvalidArgumentError(f"Cannot have max_size={max_size} < min_size={min_size}")
    flips = set()
    for k in range(0, int(fraction * max_size) + 2):
        n = (k + 0.5) / fraction  # round(fraction·n) flips near here
        flips.update({math.floor(n) - 1, math.floor(n), math.ceil(n), math.ceil(n) + 1})
    flips |= {min_size, min_size + 1, max_size}
    edges = sorted(n for n in flips if min_size <= n <= max_size)
    return st.one_of(st.sampled_from(edges), st.integers(min_size, max_size))
