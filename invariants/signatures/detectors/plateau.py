"""Owns ``Plateau`` (the validation loss has not improved within ``plateau_patience``
checks while the training loss kept improving and lies far below it) and its streaming
state.
"""
from __future__ import annotations

import math

import numpy as np

from invariants.signatures.config import SMOOTHED_LOSS
from invariants.signatures.detectors.base import Detector, _best_at, _first, _State
from invariants.signatures.findings import _g


class Plateau(Detector):
    """No point among the last ``patience`` is below (best before them) - ``min_delta``,
    while the smoothed training loss has fallen more than ``plateau_train_gain`` (relative)
    since that best and, with ``plateau_gap > 0``, the best of those recent validation
    points exceeds ``(1 + plateau_gap)`` x the smoothed training loss now.

    The train conditions are what make a flat validation curve a signature (seed 002:
    validation stuck at 2.5 while training improves to 0.15): at convergence both curves
    are flat and a team has nothing to act on, and a validation loss that settles at the
    training loss's level while training still creeps down is a run converging, not a
    model failing to generalise (the gap).  Without a training loss in the log it is the
    plain early-stopping rule; with one, ``plateau_train_gain=0`` and ``plateau_gap=0``
    come closest to it (the train loss must still have fallen at all).
    """

    signature = "plateau"
    other = SMOOTHED_LOSS

    def _f(self, step, recent, prior, t_best, t_now):
        c = self.cfg
        why = "" if t_now is None else (
            f", while the train loss fell from {_g(t_best)} to {_g(t_now)}")
        return self.finding("warning", step, recent, prior - c.plateau_min_delta,
                            f"{self.metric} has not improved by more than {_g(c.plateau_min_delta)} "
                            f"for {c.plateau_patience} checks: best of them {_g(recent)}, best "
                            f"before {_g(prior)}{why}")

    def scan(self, view, ctx):
        c = self.cfg
        p = c.plateau_patience
        x = view.x
        n = len(x)
        if n <= p:
            return []
        run = np.minimum.accumulate(x)
        prior = run[: n - p]                                       # best of x[0 .. i-p]
        recent = np.lib.stride_tricks.sliding_window_view(x, p).min(axis=1)[1:]  # min x[i-p+1 .. i]
        at = _best_at(x, run)[: n - p]                             # index of prior
        train, has = ctx.last_before(self.other, view.pos)
        gain = np.ones(n - p, dtype=bool)
        if has.any():
            tb, hb = train[at], has[at]
            tn, hn = train[p:], has[p:]
            gain = ~hn | (hb & (tn < (1.0 - c.plateau_train_gain) * tb))
            if c.plateau_gap > 0.0:
                gain &= ~hn | (recent > (1.0 + c.plateau_gap) * tn)
        j = _first((recent >= prior - c.plateau_min_delta) & gain)
        if j < 0:
            return []
        t = has.any() and bool(has[j + p]) and bool(has[at[j]])
        return [self._f(view.step[j + p], recent[j], prior[j], train[at[j]] if t else None,
                        train[j + p] if t else None)]

    def stream(self):
        return _PlateauState(self)


class _PlateauState(_State):
    __slots__ = ("det", "buf", "prior", "tprior", "p", "delta", "gain", "gap", "seen_train")

    def __init__(self, det):
        self.det = det
        self.buf: list[tuple] = []  # (val, train at that record or None)
        self.prior = math.inf
        self.tprior = None
        self.p = det.cfg.plateau_patience
        self.delta = det.cfg.plateau_min_delta
        self.gain = det.cfg.plateau_train_gain
        self.gap = det.cfg.plateau_gap
        self.seen_train = False
        self.done = False

    def push(self, step, x, last):
        train = last.get(SMOOTHED_LOSS)
        if train is not None:
            self.seen_train = True
        buf = self.buf
        if len(buf) == self.p:
            old, told = buf.pop(0)
            if old < self.prior:
                self.prior, self.tprior = old, told
        buf.append((x, train))
        if self.prior < math.inf:
            recent = min(v for v, _ in buf)
            if recent >= self.prior - self.delta:
                if not self.seen_train or train is None:
                    ok = True
                else:
                    ok = self.tprior is not None and train < (1.0 - self.gain) * self.tprior
                    if ok and self.gap > 0.0:
                        ok = recent > (1.0 + self.gap) * train
                if ok:
                    self.done = True
                    t = self.seen_train and train is not None and self.tprior is not None
                    return [self.det._f(step, recent, self.prior,
                                        self.tprior if t else None, train if t else None)]
        return None
