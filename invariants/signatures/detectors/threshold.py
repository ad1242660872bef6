"""Owns the level rules: ``Threshold`` (a ladder of bounds, optionally armed only
after a healthy point) and its streaming state, and ``NonFinite`` (any NaN/Inf,
read from raw values by both drivers).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from invariants.signatures.config import SignatureConfig
from invariants.signatures.detectors.base import Detector, _first, _State
from invariants.signatures.findings import Finding, _g


class Threshold(Detector):
    """``x > bound`` (or ``x < bound``) at a ladder of levels: first crossing of each level.

    With ``healthy`` (a spike, not a level), a crossing counts only after some point was on
    the healthy side of it (``x < healthy``, or ``x > healthy`` when ``above`` is False):
    a metric that starts on the bad side and improves is a model still learning.
    """

    def __init__(self, signature: str, metric: str, cfg: SignatureConfig,
                 levels: Sequence[tuple[float, str, str]], above: bool = True,
                 healthy: float | None = None):
        super().__init__(metric, cfg)
        self.signature = signature
        self.levels = tuple(levels)  # (bound, severity, what)
        self.above = above
        self.healthy = healthy

    def _msg(self, x: float, bound: float, what: str) -> str:
        op = ">" if self.above else "<"
        if self.healthy is None:
            return f"{self.metric}={_g(x)} {op} {_g(bound)} ({what})"
        return (f"{self.metric}={_g(x)} {op} {_g(bound)} after having been healthy "
                f"({'<' if self.above else '>'} {_g(self.healthy)}) ({what})")

    def scan(self, view, ctx):
        out = []
        armed = None
        if self.healthy is not None:
            armed = np.logical_or.accumulate(
                view.x < self.healthy if self.above else view.x > self.healthy)
        for bound, sev, what in self.levels:
            hit = view.x > bound if self.above else view.x < bound
            i = _first(hit if armed is None else hit & armed)
            if i >= 0:
                out.append(self.finding(sev, view.step[i], view.x[i], bound,
                                        self._msg(view.x[i], bound, what)))
        return out

    def stream(self):
        return _ThresholdState(self)


class _ThresholdState(_State):
    __slots__ = ("det", "pending", "above", "healthy", "armed")

    def __init__(self, det: Threshold):
        self.det = det
        self.pending = list(det.levels)
        self.above = det.above
        self.healthy = det.healthy
        self.armed = det.healthy is None
        self.done = False

    def push(self, step, x, last):
        if not self.armed:
            if (x < self.healthy) if self.above else (x > self.healthy):
                self.armed = True
            return None  # a healthy point is never on the bad side (healthy <= bound)
        out = None
        for lvl in self.pending:
            bound = lvl[0]
            if (x > bound) if self.above else (x < bound):
                if out is None:
                    out = []
                out.append(self.det.finding(lvl[1], step, x, bound, self.det._msg(x, bound, lvl[2])))
        if out:
            fired = {f.threshold for f in out}
            self.pending = [lvl for lvl in self.pending if lvl[0] not in fired]
            self.done = not self.pending
        return out


class NonFinite(Detector):
    """Any NaN/Inf (or null) observation of a numeric metric.  Reads raw values."""

    signature = "non_finite"

    def _f(self, step, x):
        return self.finding("critical", step, x, None,
                            f"{self.metric}={x} is not finite (NaN/Inf/null logged)")

    def scan_raw(self, values: np.ndarray, steps: np.ndarray) -> list[Finding]:
        i = _first(~np.isfinite(values))
        return [self._f(steps[i], float(values[i]))] if i >= 0 else []
