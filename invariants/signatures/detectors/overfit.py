"""Owns ``OverfitGap`` (validation loss above the smoothed training loss by more than
``overfit_ratio``) and its streaming state.
"""
from __future__ import annotations

import numpy as np

from invariants.signatures.config import SMOOTHED_LOSS
from invariants.signatures.detectors.base import Detector, _first, _State
from invariants.signatures.findings import _g


class OverfitGap(Detector):
    """At each ``val_loss`` point: ``(val - train)/train > overfit_ratio``.

    train = the mean of the last ``smooth_window`` ``loss`` points (all of them while
    fewer) at or before that record: one noisy batch loss must not decide the gap,
    and an expanding mean of a falling curve can only understate it.
    """

    signature = "overfit_gap"
    other = SMOOTHED_LOSS

    def _f(self, step, val, train):
        r = self.cfg.overfit_ratio
        return self.finding("warning", step, val, train * (1.0 + r),
                            f"{self.metric}={_g(val)} exceeds train loss {_g(train)} by "
                            f"{_g(100 * (val - train) / train)}% > {_g(100 * r)}% (SageMaker Overfit)")

    def scan(self, view, ctx):
        train, ok = ctx.last_before(self.other, view.pos)
        ok &= train > 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = (view.x - train) / train
        j = _first(ok & (gap > self.cfg.overfit_ratio))
        return [self._f(view.step[j], view.x[j], train[j])] if j >= 0 else []

    def stream(self):
        return _OverfitState(self)


class _OverfitState(_State):
    __slots__ = ("det", "r")

    def __init__(self, det):
        self.det = det
        self.r = det.cfg.overfit_ratio
        self.done = False

    def push(self, step, x, last):
        train = last.get(SMOOTHED_LOSS)
        if train is not None and train > 0.0 and (x - train) / train > self.r:
            self.done = True
            return [self.det._f(step, x, train)]
        return None
