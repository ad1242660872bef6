"""Owns the loss-curve rules, each beside its streaming state: ``LossSpike`` (a point far
outside the series' recent range: a warning, with the step it recovered), ``LossJump``
(the ratio rule for the first points of a log, before the spike rule has its warm-up)
and ``Divergence`` (one-sided CUSUM of the rolling-median level over its best: warning
before the warm-up, critical after it).

All three read the *level* ``m_i``, the lower median of the last ``level_window`` points
(``_median_low``): one heavy-tailed batch (batch size 1: a loss ten times its
neighbours is ordinary) cannot move it, a sustained rise moves it after
``(level_window + 1) / 2`` points.  The severity ladder (docs/signatures.md): a spike
that comes back is a warning (``recovered_step`` says when); a rise the level carries is
a ``divergence`` warning at once, and critical once it has held for
``divergence_persist`` points at or after point ``warmup_points`` (statistics of fewer
points decide nothing critical).
"""
from __future__ import annotations

import math

import numpy as np

from invariants.signatures.detectors.base import (Detector, _best_at, _first, _median_low,
                                                  _MedianState, _noise, _NoiseState, _prev_max,
                                                  _run_lengths, _SlidingMax, _State)
from invariants.signatures.findings import Finding, _g


_2LN2 = 2.0 * 0.6931471805599453


def _min_bias(idx: np.ndarray, r: int) -> np.ndarray:
    """How far (in sd) the running minimum of ~``(i + 1) / r`` independent levels lies below
    their mean: ``sqrt(2 ln q)`` (extreme-value theory), with ``ln q`` taken as
    ``ln 2 * floor(log2 q)``: exact integer steps (``frexp``; ``bit_length`` in the
    streaming twin), so both drivers subtract the same float."""
    q = (idx + 1) // r
    L = np.where(q > 0, np.frexp(np.maximum(q, 1).astype(np.float64))[1] - 1, 0)
    return np.sqrt(_2LN2 * L.astype(np.float64))


def _level(metric: str, x: np.ndarray, cfg, ctx) -> np.ndarray:
    """The metric's level (``_median_low``), computed once per scan for all its detectors."""
    return ctx.cached(("level", metric), lambda: _median_low(x, cfg.level_window))


def _back(level: float, prev: float, cfg) -> float:
    """Where a spike has recovered: back within ``spike_sigma_floor`` of where the series was
    just before it (the larger of its level and its previous point)."""
    return (1.0 + cfg.spike_sigma_floor) * (level if level > prev else prev)


def _after(mask: np.ndarray, i: int) -> int:
    """First index j > i with mask[j], or -1."""
    j = _first(mask[i + 1:])
    return i + 1 + j if j >= 0 else -1


class LossSpike(Detector):
    """``x_i > thr_i = m_{i-1} + spike_k * max(M_i - m_{i-1}, spike_sigma_floor * |m_{i-1}|)``.

    ``m_{i-1}`` is the level before the point, ``M_i`` the largest of the previous
    ``spike_window`` points: the spread is what the series itself has shown lately, so a
    batch-size-1 log (single batches 10x the median) needs a far larger spike than a
    smooth large-batch log.  Judged from point ``spike_min_periods`` on.  Reported once,
    with ``recovered_step``: the first later point back where the series was just before
    the spike, ``x <= (1 + spike_sigma_floor) * max(m_{i-1}, x_{i-1})`` (``_back``).
    """

    signature = "loss_spike"

    def _f(self, step, x, thr, level, top, rec):
        return self.episode("warning", step, x, thr,
                            f"{self.metric}={_g(x)} > {_g(thr)}: level (median of the last "
                            f"{self.cfg.level_window}) {_g(level)} + {_g(self.cfg.spike_k)} x "
                            f"the recent spread (max of the previous {self.cfg.spike_window} "
                            f"points {_g(top)})", step, rec)

    def scan(self, view, ctx):
        c = self.cfg
        x = view.x
        n = len(x)
        p = c.spike_min_periods
        if n <= p:
            return []
        m = _level(self.metric, x, c, ctx)
        M = _prev_max(x, c.spike_window)
        lv = m[p - 1:n - 1]
        top = M[p:]
        # thr = lv + k * max(top - lv, floor * |lv|), in place (series-sized arrays)
        thr = np.subtract(top, lv)
        floor = np.abs(lv)
        floor *= c.spike_sigma_floor
        np.maximum(thr, floor, out=thr)
        thr *= c.spike_k
        thr += lv
        j = _first(x[p:] > thr)
        if j < 0:
            return []
        i = p + j
        r = _after(x <= _back(lv[j], x[i - 1], c), i)
        return [self._f(view.step[i], x[i], thr[j], lv[j], top[j],
                        view.step[r] if r >= 0 else None)]

    def stream(self):
        return _LossSpikeState(self)


class _LossSpikeState(_State):
    __slots__ = ("det", "i", "med", "level", "prev", "last_x", "w", "k", "floor", "minp",
                 "fired")

    def __init__(self, det: LossSpike):
        cfg = det.cfg
        self.det = det
        self.i = 0
        self.med = _MedianState(cfg.level_window)
        self.level = 0.0
        self.prev = _SlidingMax(cfg.spike_window)  # max of the previous spike_window points
        self.last_x = 0.0
        self.w = cfg.spike_window
        self.k = cfg.spike_k
        self.floor = cfg.spike_sigma_floor
        self.minp = cfg.spike_min_periods
        self.fired = None  # (finding args) while waiting for the recovery
        self.done = False

    def push(self, step, x, last):
        out = None
        if self.fired is not None:  # watching for the recovery only
            if x <= self.fired[5]:
                self.done = True
                return [self.det._f(*self.fired[:5], step)]
            return None
        if self.i >= self.minp:
            lv = self.level
            top = self.prev.max()
            fl = self.floor * abs(lv)
            d = top - lv
            thr = lv + self.k * (d if d >= fl else fl)
            if x > thr:
                self.fired = (step, x, thr, lv, top,
                              _back(lv, self.last_x, self.det.cfg))
                out = [self.det._f(step, x, thr, lv, top, None)]
        self.level = self.med.push(x)
        self.prev.push(x)
        self.last_x = x
        self.i += 1
        return out


class LossJump(Detector):
    """Short-log ratio rule: ``x_i > jump_ratio * m_{i-1}`` (the level before it, > 0) at the
    points before ``spike_min_periods``, where ``LossSpike`` has no spread to judge by yet.
    ``recovered_step``: as ``LossSpike`` (back where the series was just before the jump).
    """

    signature = "loss_jump"

    def _f(self, step, x, level, rec):
        r = self.cfg.jump_ratio
        return self.episode("warning", step, x, r * level,
                            f"{self.metric} jumped to {_g(x)}, more than {_g(r)}x its level "
                            f"{_g(level)} (median of the previous points)", step, rec)

    def scan(self, view, ctx):
        c = self.cfg
        x = view.x
        n = len(x)
        if n < 2:
            return []
        h = min(n, c.spike_min_periods)
        m = _level(self.metric, x, c, ctx)[:h]
        lv = m[:h - 1]
        j = _first((lv > 0.0) & (x[1:h] > c.jump_ratio * lv))
        if j < 0:
            return []
        i = j + 1
        r = _after(x <= _back(lv[j], x[i - 1], c), i)
        return [self._f(view.step[i], x[i], lv[j], view.step[r] if r >= 0 else None)]

    def stream(self):
        return _LossJumpState(self)


class _LossJumpState(_State):
    __slots__ = ("det", "i", "med", "level", "prev", "r", "h", "fired")

    def __init__(self, det):
        self.det = det
        self.i = 0
        self.med = _MedianState(det.cfg.level_window)
        self.level = 0.0
        self.prev = 0.0
        self.r = det.cfg.jump_ratio
        self.h = det.cfg.spike_min_periods
        self.fired = None
        self.done = False

    def push(self, step, x, last):
        if self.fired is not None:
            if x <= self.fired[3]:
                self.done = True
                return [self.det._f(*self.fired[:3], step)]
            return None
        out = None
        if 1 <= self.i < self.h and self.level > 0.0 and x > self.r * self.level:
            self.fired = (step, x, self.level, _back(self.level, self.prev, self.det.cfg))
            out = [self.det._f(step, x, self.level, None)]
        elif self.i >= self.h:
            self.done = True
            return None
        self.level = self.med.push(x)
        self.prev = x
        self.i += 1
        return out


class Divergence(Detector):
    """Sustained rise of the level over its best, in units of the series' own noise.

    ``m_i`` = the level (lower median of the last ``c_i = min(i + 1, level_window)``
    points); ``ref_i = min m``; ``sd_i = a_i (1 + 1.5 / sqrt(p_i)) / sqrt(c_i)`` with
    ``a_i`` the mean absolute point-to-point change over the previous (at most
    ``smooth_window``) ``p_i`` pairs: the spread of a median of ``c_i`` points, raised to an
    upper confidence bound while few pairs stand behind it.  ``z_i = (m_i - ref_i) / sd_i``;
    one-sided CUSUM ``S_i = max(0, S_{i-1} + z_i - divergence_k)`` computed as
    ``D_i - min(0, min D)`` with ``D = cumsum(z - k)``; flag ``S_i > divergence_h`` while the
    level is also more than ``divergence_drift`` (relative) above its best.  Normalising
    by the noise, not by the best, keeps a loss near zero (where the best of a noisy
    median is a fraction of the typical level) from looking like a many-fold rise.

    The severity ladder: the first flagged point is a ``warning``; the flag becomes
    ``critical`` once it has held for ``divergence_persist`` consecutive points (the level
    stayed above its best, a rise that did not come back) at a point at or after
    ``warmup_points`` (statistics of fewer points decide nothing critical).  A best set
    while the level was the median of fewer than ``level_window`` points (the first
    points of a log: one easy batch can be it) is an extreme of few samples: a critical
    verdict against it also needs the level more than ``divergence_drift_partial``
    (relative) above it.
    ``started_step`` is the first point of the CUSUM excursion (the level lags the raw
    series by up to ``level_window // 2`` points), ``recovered_step`` the first
    later point whose level is back within half of ``divergence_drift`` (relative) of the
    best it was flagged against (a relative bound, since the noise of a broken regime is
    larger; half, so that a level hovering at the flag's edge is not "recovered").
    """

    signature = "divergence"

    def _f(self, sev, step, s, ref, S, sd, start, partial, rec):
        c = self.cfg
        rise = (f" with the level more than {_g(100 * c.divergence_drift_partial)}% above this "
                f"best (set within the first {c.level_window} points)" if partial else "")
        why = (f"; held for {c.divergence_persist} points{rise}" if sev == "critical" else
               f"; critical if it holds for {c.divergence_persist} points (from point "
               f"{c.warmup_points} on){rise}")
        drift = c.divergence_drift_partial if partial and sev == "critical" else c.divergence_drift
        return self.episode(sev, step, s, ref * (1.0 + drift),
                            f"{self.metric} rose after improving: level (median of the last "
                            f"{c.level_window}) {_g(s)} vs best {_g(ref)} since step "
                            f"{_g(start)}, {_g((s - ref) / sd)} noise units (sd {_g(sd)}); CUSUM "
                            f"over drift k={_g(c.divergence_k)} reached {_g(S)} > "
                            f"h={_g(c.divergence_h)}{why}", start, rec)

    def scan(self, view, ctx):
        c = self.cfg
        x = view.x
        n = len(x)
        r = c.level_window
        s = _level(self.metric, x, c, ctx)
        idx = np.arange(n)
        # sd = a * (1 + 1.5 / sqrt(pairs)) / sqrt(points in the median), in place on a (the
        # arrays are the series' size); both factors are constant past their first points
        sd = _noise(x, c.smooth_window, relative=False)
        k = min(n, max(c.smooth_window + 2, r))
        pairs = np.maximum(np.minimum(idx[:k] - 1, c.smooth_window), 1).astype(np.float64)
        cm = np.sqrt(np.minimum(idx[:k] + 1, r).astype(np.float64))
        sd[:k] *= 1.0 + 1.5 / np.sqrt(pairs)
        sd[:k] /= cm
        if n > k:
            sd[k:] *= 1.0 + 1.5 / np.sqrt(np.float64(c.smooth_window))
            sd[k:] /= np.sqrt(np.float64(r))
        np.maximum(sd, 1e-300, out=sd)
        ref = np.minimum.accumulate(s)
        diff = np.subtract(s, ref)
        rel = np.maximum(np.abs(ref), 1e-12)
        np.divide(diff, rel, out=rel)
        D = np.divide(diff, sd, out=diff)
        D -= _min_bias(idx, r)
        D -= c.divergence_k
        np.cumsum(D, out=D)
        S = np.subtract(D, np.minimum(np.minimum.accumulate(D), 0.0))
        hit = (S > c.divergence_h) & (rel > c.divergence_drift)
        if not hit.any():
            return []
        run = _run_lengths(hit)
        critical = (run >= c.divergence_persist) & (idx >= c.warmup_points)
        at = _best_at(s, ref)   # where the best was set: a partial-window level rises more
        critical &= (at >= r - 1) | (rel > c.divergence_drift_partial)
        out = []
        zero = np.flatnonzero(S <= 0.0)
        for sev, mask in (("warning", hit), ("critical", critical)):
            i = _first(mask)
            if i < 0:
                continue
            zi = np.searchsorted(zero, i) - 1  # last point with S <= 0 before i
            st = int(zero[zi]) + 1 if zi >= 0 else 0
            rr = _after(s <= (1.0 + 0.5 * c.divergence_drift) * ref[i], i)
            out.append(self._f(sev, view.step[i], s[i], ref[i], S[i], sd[i], view.step[st],
                               bool(at[i] < r - 1), view.step[rr] if rr >= 0 else None))
        return out

    def stream(self):
        return _DivergenceState(self)


class _DivergenceState(_State):
    __slots__ = ("det", "med", "nz", "i", "ref", "ref_at", "D", "Dmin", "k", "h", "rho",
                 "rho_partial", "w", "r", "warm", "start", "pending", "warned", "critical",
                 "run", "persist")

    def __init__(self, det):
        cfg = det.cfg
        self.det = det
        self.med = _MedianState(cfg.level_window)
        self.nz = _NoiseState(cfg.smooth_window, relative=False)
        self.i = 0
        self.ref = math.inf
        self.ref_at = 0          # index of the point whose level is the best
        self.D = 0.0
        self.Dmin = math.inf
        self.k = cfg.divergence_k
        self.h = cfg.divergence_h
        self.rho = cfg.divergence_drift
        self.rho_partial = cfg.divergence_drift_partial
        self.w = cfg.smooth_window
        self.r = cfg.level_window
        self.warm = cfg.warmup_points
        self.start = None       # step of the first point of the current excursion
        self.pending: list = []  # fired findings' args, waiting for their recovery
        self.warned = False
        self.critical = False
        self.run = 0
        self.persist = cfg.divergence_persist
        self.done = False

    def push(self, step, x, last):
        s = self.med.push(x)
        a = self.nz.push(x)
        i = self.i
        self.i = i + 1
        p = i - 1 if i - 1 < self.w else self.w
        pairs = float(p if p > 1 else 1)
        sd = a * (1.0 + 1.5 / math.sqrt(pairs)) / math.sqrt(float(i + 1 if i + 1 < self.r
                                                                     else self.r))
        if not sd > 1e-300:
            sd = 1e-300
        if s < self.ref:
            self.ref, self.ref_at = s, i
        ref = self.ref
        q = (i + 1) // self.r
        z = (s - ref) / sd - math.sqrt(_2LN2 * float(q.bit_length() - 1 if q > 0 else 0))
        aref = abs(ref)
        rel = (s - ref) / (aref if aref > 1e-12 else 1e-12)
        out = None
        if self.pending:  # recovery of what fired before: back near the best it was flagged on
            keep = []
            for args, base in self.pending:
                if s <= (1.0 + 0.5 * self.rho) * base:
                    out = (out or []) + [self.det._f(*args, step)]
                else:
                    keep.append((args, base))
            self.pending = keep
            self.done = self.critical and not keep
        if self.start is None:
            self.start = step
        self.D = D = self.D + (z - self.k)
        if D < self.Dmin:
            self.Dmin = D
        S = D - (self.Dmin if self.Dmin < 0.0 else 0.0)
        if S > self.h and rel > self.rho:
            self.run += 1
            for crit in (False, True):
                if (self.critical if crit else self.warned) or (crit and not (
                        self.run >= self.persist and i >= self.warm and (
                            self.ref_at >= self.r - 1 or rel > self.rho_partial))):
                    continue
                if crit:
                    self.critical = True
                else:
                    self.warned = True
                args = ("critical" if crit else "warning", step, s, ref, S, sd, self.start,
                        self.ref_at < self.r - 1)
                out = (out or []) + [self.det._f(*args, None)]
                self.pending.append((args, ref))
        else:
            self.run = 0
        if S <= 0.0:
            self.start = None
        return out
