"""Owns ``metric_series``, the Hypothesis strategy of logged metric curves (decays,
plateaus, spikes, rises, constants; sparse, uneven steps; NaN/Inf sprinkled in)
that the detector tests draw from.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from hypothesis import strategies as st

from invariants._validate import require, require_in_unit_interval, require_ordered
from invariants.signatures.config import NUMERIC_METRICS


@st.composite
def _series(draw, metrics, min_points, max_points, nan_rate):
    n = draw(st.integers(min_points, max_points))
    gaps = draw(st.lists(st.sampled_from([1, 1, 1, 2, 10, 37]), min_size=n, max_size=n))
    steps = np.cumsum(gaps).astype(np.float64)
    out = {}
    for m in metrics:
        kind = draw(st.sampled_from(["decay", "flat", "spike", "rise", "plateau", "constant"]))
        base = draw(st.sampled_from([1e-3, 0.05, 0.5, 1.0, 3.0, 1e3]))
        noise = draw(st.sampled_from([0.0, 0.01, 0.03, 0.3]))
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        t = np.arange(n, dtype=np.float64)
        y = base * (1.0 + np.exp(-t / max(n / 4, 1)))
        if kind == "flat" or kind == "constant":
            y = np.full(n, base)
        elif kind == "rise":
            y = base * (1.0 + np.maximum(t - n / 2, 0) / max(n / 8, 1))
        elif kind == "plateau":
            y = np.where(t < n / 3, base * (2 - t / n), base * (2 - 1 / 3))
        if kind != "constant":
            y = y * (1.0 + noise * rng.standard_normal(n))
        if kind == "spike" and n > 2:
            k = draw(st.integers(1, n - 1))
            y[k] *= draw(st.sampled_from([1.5, 3.0, 50.0]))
        present = rng.random(n) < draw(st.sampled_from([1.0, 0.7, 0.3]))
        present[0] = present[0] or kind == "constant"
        nan_mask = rng.random(n) < nan_rate
        y = np.where(nan_mask, rng.choice([np.nan, np.inf, -np.inf], n), y)
        if m in ("bg_fraction", "target_bg_fraction", "accuracy", "val_accuracy"):
            y = np.clip(y / (2 * base), 0.0, 1.0) if draw(st.booleans()) else np.where(
                np.isfinite(y), draw(st.sampled_from([0.0, 0.005, 0.5, 0.995, 1.0])), y)
        out[m] = (steps[present], y[present])
    return out


def metric_series(*, metrics: Sequence[str] | st.SearchStrategy = st.sets(
                      st.sampled_from(NUMERIC_METRICS), min_size=1, max_size=5),
                  min_points: int = 1, max_points: int = 80,
                  nan_rate: float = 0.05) -> st.SearchStrategy[dict]:
    """``{metric: (steps, values)}`` dicts: decays, plateaus, spikes, rises, constants,
    several magnitudes and noise levels, sparse and uneven steps, NaN/±Inf sprinkled in.

    Args:
      metrics: names or a strategy of sets of names (canonical numeric metrics).
      min_points, max_points: bounds on the number of steps (each metric keeps a subset).
      nan_rate: probability that a point is non-finite.
    """
    require(isinstance(min_points, int) and min_points >= 1, "min_points", min_points,
            "must be an integer >= 1")
    require(isinstance(max_points, int), "max_points", max_points, "must be an integer")
    require_ordered("min_points", min_points, "max_points", max_points)
    require_in_unit_interval("nan_rate", nan_rate)
    if not isinstance(metrics, st.SearchStrategy):
        metrics = tuple(metrics)
        for m in metrics:
            require(m in NUMERIC_METRICS, "metrics", m, "must be canonical numeric metric names")
        metrics = st.just(metrics)
    return metrics.flatmap(lambda ms: _series(tuple(sorted(ms)), min_points, max_points, nan_rate))
