"""Owns ``Plateau`` (no improvement within ``plateau_patience`` checks) and its
streaming state.
"""
from __future__ import annotations

import math

import numpy as np

from invariants.signatures.detectors.base import Detector, _first, _State
from invariants.signatures.findings import _g


class Plateau(Detector):
    """No point among the last ``patience`` is below (best before them) - ``min_delta``."""

    signature = "plateau"

    def _f(self, step, recent, prior):
        c = self.cfg
        return self.finding("warning", step, recent, prior - c.plateau_min_delta,
                            f"{self.metric} has not improved by more than {_g(c.plateau_min_delta)} "
                            f"for {c.plateau_patience} checks: best of them {_g(recent)}, best "
                            f"before {_g(prior)}")

    def scan(self, view, ctx):
        p = self.cfg.plateau_patience
        x = view.x
        n = len(x)
        if n <= p:
            return []
        prior = np.minimum.accumulate(x)[: n - p]                  # best of x[0 .. i-p]
        recent = np.lib.stride_tricks.sliding_window_view(x, p).min(axis=1)[1:]  # min x[i-p+1 .. i]
        j = _first(recent >= prior - self.cfg.plateau_min_delta)
        return [self._f(view.step[j + p], recent[j], prior[j])] if j >= 0 else []

    def stream(self):
        return _PlateauState(self)


class _PlateauState(_State):
    __slots__ = ("det", "buf", "prior", "p", "delta")

    def __init__(self, det):
        self.det = det
        self.buf: list[float] = []
        self.prior = math.inf
        self.p = det.cfg.plateau_patience
        self.delta = det.cfg.plateau_min_delta
        self.done = False

    def push(self, step, x, last):
        buf = self.buf
        if len(buf) == self.p:
            old = buf.pop(0)
            if old < self.prior:
                self.prior = old
        buf.append(x)
        if self.prior < math.inf:
            recent = min(buf)
            if recent >= self.prior - self.delta:
                self.done = True
                return [self.det._f(step, recent, self.prior)]
        return None
