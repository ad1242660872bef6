"""Owns ``AccuracyDrop`` (smoothed accuracy falling below its best by more than the
seed's 5% or the series' noise) and its streaming state.
"""
from __future__ import annotations

import math

import numpy as np

from invariants.signatures.detectors.base import (Detector, _first, _noise, _NoiseState,
                                                  _segments, _smoothed, _SmoothState, _State)
from invariants.signatures.findings import _g


class AccuracyDrop(Detector):
    """Smoothed accuracy (as in ``Divergence``) falls more than ``t_i`` (relative) below its best.

    ``t_i = max(accuracy_drop, noise_k * nu_i / sqrt(m_i))``: ``nu_i`` is the mean
    relative point-to-point change over the previous ``smooth_window`` pairs, ``m_i``
    the number of points averaged (1 before smoothing starts). Before smoothing, ``nu_i``
    rests on ``c_i = min(i - 1, smooth_window)`` pairs and is replaced by its upper
    confidence bound ``nu_i * (1 + 1.5 / sqrt(c_i))`` (the mean of |N| over c samples has
    a relative spread of about 0.76/sqrt(c)): the thorough profile found a healthy
    1%-noise run whose low noise estimate at 30 pairs let a 5.2-sigma range fire.  Judged once
    ``noise_min_pairs`` changes have been seen.  Per-batch accuracy
    is noisy; the best of a noisy series is an extreme, so a fixed 5% would fire on
    healthy runs.  Epoch-level logs have small ``nu`` and keep the seed's 5%.
    """

    signature = "accuracy_drop"

    def _f(self, step, s, best, t, smoothed):
        what = f" (mean of the last {self.cfg.smooth_window})" if smoothed else ""
        return self.finding("warning", step, s, best * (1.0 - t),
                            f"{self.metric}{what} {_g(s)} is more than {_g(100 * t)}% below "
                            f"its best {_g(best)} (seed 000: > {_g(100 * self.cfg.accuracy_drop)}%"
                            f" drop; raised to the series' noise where larger)")

    def scan(self, view, ctx):
        c = self.cfg
        w = c.smooth_window
        s = _smoothed(view.x, w)
        nu = _noise(view.x, w)
        for a, b, smoothed in _segments(len(s), w):
            seg = s[a:b]
            best = np.maximum.accumulate(seg)
            if smoothed:   # in place: these arrays are the series' size
                t = np.multiply(nu[a:b], c.noise_k)
                t /= math.sqrt(w)
                np.maximum(t, c.accuracy_drop, out=t)
            else:  # raw points: nu rests on few pairs, take its upper confidence bound
                cnt = np.maximum(np.minimum(np.arange(a, b) - 1, w), 1).astype(np.float64)
                t = np.maximum(c.noise_k * nu[a:b] * (1.0 + 1.5 / np.sqrt(cnt)),
                               c.accuracy_drop)
            with np.errstate(divide="ignore", invalid="ignore"):
                drop = np.subtract(best, seg)
                drop /= best
            fires = drop > t
            fires &= best > 0.0
            fires[:max(c.noise_min_pairs + 1 - a, 0)] = False   # judged from pair P + 1 on
            j = _first(fires)
            if j >= 0:
                return [self._f(view.step[a + j], seg[j], best[j], t[j], smoothed)]
        return []

    def stream(self):
        return _AccuracyDropState(self)


class _AccuracyDropState(_State):
    __slots__ = ("det", "sm", "nz", "best", "d", "k", "sqw", "minp")

    def __init__(self, det):
        self.det = det
        self.sm = _SmoothState(det.cfg.smooth_window)
        self.nz = _NoiseState(det.cfg.smooth_window)
        self.best = -math.inf
        self.d = det.cfg.accuracy_drop
        self.k = det.cfg.noise_k
        self.sqw = math.sqrt(det.cfg.smooth_window)
        self.minp = det.cfg.noise_min_pairs + 1
        self.done = False

    def push(self, step, x, last):
        s = self.sm.push(x)
        nu = self.nz.push(x)
        smoothing = self.sm.n >= self.sm.w
        if self.sm.n == self.sm.w:  # smoothing starts: a fresh best
            self.best = -math.inf
        if s > self.best:
            self.best = s
        best = self.best
        if smoothing:
            t = self.k * nu / self.sqw
        else:  # pairs behind nu: min(i - 1, w), at least 1 (as the vectorised driver)
            cnt = float(max(min(self.nz.i - 2, self.nz.w), 1))
            t = self.k * nu * (1.0 + 1.5 / math.sqrt(cnt))
        if t < self.d:
            t = self.d
        if self.sm.n > self.minp and best > 0.0 and (best - s) / best > t:
            self.done = True
            return [self.det._f(step, s, best, t, smoothing)]
        return None
