"""Owns ``BackgroundCollapse`` (all-background or all-foreground predictions while
the targets are mixed; seed 001) and its streaming state.
"""
from __future__ import annotations

from invariants.signatures.detectors.base import Detector, _first, _State
from invariants.signatures.findings import _g


class BackgroundCollapse(Detector):
    """``bg_fraction >= bg_high`` or ``<= bg_low`` while the last ``target_bg_fraction`` lies
    strictly between (critical); with no target logged yet, a warning."""

    signature = "background_collapse"

    def _f(self, step, bg, target):
        c = self.cfg
        bound = c.bg_high if bg >= c.bg_high else c.bg_low
        kind = "all-background" if bg >= c.bg_high else "all-foreground"
        if target is None:
            return self.finding("warning", step, bg, bound,
                                f"{self.metric}={_g(bg)}: predictions are {kind} (no "
                                f"target_bg_fraction logged to compare with)")
        return self.finding("critical", step, bg, bound,
                            f"{self.metric}={_g(bg)}: predictions are {kind} while the targets' "
                            f"background fraction is {_g(target)}")

    def scan(self, view, ctx):
        c = self.cfg
        t, has = ctx.last_before("target_bg_fraction", view.pos)
        bad = (view.x >= c.bg_high) | (view.x <= c.bg_low)
        between = has & (t > c.bg_low) & (t < c.bg_high)
        out = []
        j = _first(bad & between)
        if j >= 0:
            out.append(self._f(view.step[j], view.x[j], t[j]))
        j = _first(bad & ~has)
        if j >= 0:
            out.append(self._f(view.step[j], view.x[j], None))
        return out

    def stream(self):
        return _BackgroundState(self)


class _BackgroundState(_State):
    __slots__ = ("det", "hi", "lo", "fired")

    def __init__(self, det):
        self.det = det
        self.hi = det.cfg.bg_high
        self.lo = det.cfg.bg_low
        self.fired: set = set()
        self.done = False

    def push(self, step, x, last):
        if not (x >= self.hi or x <= self.lo):
            return None
        t = last.get("target_bg_fraction")
        if t is None:
            key = "unknown"
        elif self.lo < t < self.hi:
            key = "between"
        else:
            return None
        if key in self.fired:
            return None
        self.fired.add(key)
        self.done = len(self.fired) == 2
        return [self.det._f(step, x, t)]
