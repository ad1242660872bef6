"""Owns ``OverfitGap`` (validation loss above the smoothed training loss by more than
``overfit_ratio``, on comparable points, while the validation loss rises from its best)
and its streaming state.
"""
from __future__ import annotations

import math

import numpy as np

from invariants.signatures.config import LOSS_COUNT, SMOOTHED_LOSS
from invariants.signatures.detectors.base import Detector, _first, _run_lengths, _State
from invariants.signatures.findings import _g


class OverfitGap(Detector):
    """At a ``val_loss`` point: ``(val - train)/train > overfit_ratio`` and
    ``val >= (1 + overfit_rise) * best_val`` (the best of the *earlier* val points).

    train = the mean of the last ``smooth_window`` ``loss`` points (all of them while
    fewer) at or before that record.  Only comparable points are judged: never the first
    val point (nothing to rise from, and a first evaluation is compared with a train mean
    that still holds the untrained start: 6.44 vs 7.17 is not overfitting), and only once
    ``overfit_min_train`` train points stand behind the mean.  The rise condition asks
    for the gap to be *growing* (the validation loss climbing while the training loss is
    low), the overfitting the seeds describe; a constant gap on a flat validation loss is
    a plateau (``Plateau``) or the model's capacity, not a change.  ``overfit_rise=0``
    gives SageMaker's plain ratio rule on comparable points.

    Both conditions must hold on ``overfit_persist`` consecutive val points (reported at
    the last of them): one evaluation of a small held-out set swings by its own noise
    (±15 % on the corpus's CNN runs), a val loss that has really turned keeps rising.
    ``overfit_persist=1`` judges each point alone.
    """

    signature = "overfit_gap"
    other = SMOOTHED_LOSS

    def _f(self, step, val, train, best):
        c = self.cfg
        held = (f" on {c.overfit_persist} consecutive val points" if c.overfit_persist > 1
                else "")
        return self.finding("warning", step, val, train * (1.0 + c.overfit_ratio),
                            f"{self.metric}={_g(val)} exceeds train loss {_g(train)} by "
                            f"{_g(100 * (val - train) / train)}% > {_g(100 * c.overfit_ratio)}% "
                            f"(SageMaker Overfit) and rose from its best {_g(best)} by "
                            f"{_g(100 * (val - best) / best)}% >= {_g(100 * c.overfit_rise)}%"
                            f"{held}")

    def scan(self, view, ctx):
        c = self.cfg
        x = view.x
        train, ok = ctx.last_before(self.other, view.pos)
        cnt = ctx.count_before("loss", view.pos)
        best = np.concatenate(([np.inf], np.minimum.accumulate(x)[:-1]))
        ok &= (train > 0.0) & (cnt >= c.overfit_min_train) & (best > 0.0) & np.isfinite(best)
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = (x - train) / train
        hit = ok & (gap > c.overfit_ratio) & (x >= (1.0 + c.overfit_rise) * best)
        j = _first(_run_lengths(hit) >= c.overfit_persist)
        return [self._f(view.step[j], x[j], train[j], best[j])] if j >= 0 else []

    def stream(self):
        return _OverfitState(self)


class _OverfitState(_State):
    __slots__ = ("det", "r", "rise", "minp", "persist", "best", "run")

    def __init__(self, det):
        self.det = det
        self.r = det.cfg.overfit_ratio
        self.rise = det.cfg.overfit_rise
        self.minp = det.cfg.overfit_min_train
        self.persist = det.cfg.overfit_persist
        self.best = math.inf
        self.run = 0
        self.done = False

    def push(self, step, x, last):
        best = self.best
        if x < best:
            self.best = x
        train = last.get(SMOOTHED_LOSS)
        if train is not None and train > 0.0 and last.get(LOSS_COUNT, 0) >= self.minp \
                and 0.0 < best < math.inf and (x - train) / train > self.r \
                and x >= (1.0 + self.rise) * best:
            self.run += 1
            if self.run >= self.persist:
                self.done = True
                return [self.det._f(step, x, train, best)]
        else:
            self.run = 0
        return None
