"""Owns the loss-curve rules, each beside its streaming state: ``LossSpike`` (OLMo 2
k-sigma rule), ``LossJump`` (ratio rule for short logs) and ``Divergence``
(one-sided CUSUM of the smoothed loss over its best).
"""
from __future__ import annotations

import math

import numpy as np

from invariants.signatures.detectors.base import (Detector, _first, _noise, _NoiseState,
                                                  _segments, _smoothed, _SmoothState, _State)
from invariants.signatures.findings import _g


class LossSpike(Detector):
    """OLMo 2 rule: ``x_i - mean >= k * sigma`` of the previous ``w`` finite points.

    Needs ``spike_min_periods`` previous points; sigma is floored at
    ``spike_sigma_floor * |mean|``.  Sums run over ``x - x_0`` (cumulative sums,
    differences of two of them give a window's sums).
    """

    signature = "loss_spike"

    def _f(self, step, x, thr, mu, sd):
        k = self.cfg.spike_k
        return self.finding("warning", step, x, thr,
                            f"{self.metric}={_g(x)} >= mean {_g(mu)} + {_g(k)} sigma "
                            f"({_g(sd)}) = {_g(thr)} of the previous "
                            f"{self.cfg.spike_window} points (OLMo 2 spike rule)")

    def scan(self, view, ctx):
        x = view.x
        n = len(x)
        cfg = self.cfg
        if n <= cfg.spike_min_periods:
            return []
        p, w = cfg.spike_min_periods, cfg.spike_window
        v = x - x[0]
        Q = np.cumsum(np.multiply(v, v), out=np.empty(n))
        C = np.cumsum(v, out=v)   # C[i - 1] = sum of v[0 .. i-1]
        # window of point i (i >= p): points lo .. i-1 with lo = max(i - w, 0); the sums are
        # C[i-1] - C[lo-1] (C[-1] = 0), slices rather than gathers, in place (every array
        # here is the series' size: a temporary costs as much as the arithmetic)
        k = n - p
        s = min(max(w - p, 0), k)  # points with i < w: lo = 0, count i
        mean, var = C[p - 1:n - 1].copy(), Q[p - 1:n - 1].copy()
        if k > s:                  # points with i >= w: lo = i - w, count w
            a = p + s - w - 1      # -1 when the first of them has lo = 0
            mean[s + (a < 0):] -= C[max(a, 0):n - w - 1]
            var[s + (a < 0):] -= Q[max(a, 0):n - w - 1]
        count = np.arange(p, p + s, dtype=np.float64)
        mean[:s] /= count
        var[:s] /= count
        mean[s:] /= float(w)
        var[s:] /= float(w)
        var -= np.multiply(mean, mean, out=Q[:k])
        sd = np.sqrt(np.maximum(var, 0.0, out=var), out=var)
        mu = np.add(mean, x[0], out=mean)
        sd_eff = np.maximum(sd, np.multiply(np.abs(mu, out=Q[:k]), cfg.spike_sigma_floor,
                                            out=Q[:k]), out=sd)
        thr = np.add(mu, np.multiply(sd_eff, cfg.spike_k, out=C[:k]), out=C[:k])
        j = _first(x[p:] >= thr)
        return [self._f(view.step[p + j], x[p + j], thr[j], mu[j], sd_eff[j])] if j >= 0 else []

    def stream(self):
        return _LossSpikeState(self)


class _LossSpikeState(_State):
    __slots__ = ("det", "i", "x0", "C", "Q", "hc", "hq", "w", "k", "floor", "minp")

    def __init__(self, det: LossSpike):
        cfg = det.cfg
        self.det = det
        self.i = 0
        self.x0 = 0.0
        self.C = 0.0
        self.Q = 0.0
        self.w = cfg.spike_window
        self.hc = [0.0] * (self.w + 1)  # C at the last w+1 indices (ring buffer)
        self.hq = [0.0] * (self.w + 1)
        self.k = cfg.spike_k
        self.floor = cfg.spike_sigma_floor
        self.minp = cfg.spike_min_periods
        self.done = False

    def push(self, step, x, last):
        i = self.i
        if i == 0:
            self.x0 = x
        out = None
        if i >= self.minp:
            lo = i - self.w if i > self.w else 0
            r = lo % (self.w + 1)
            mean = (self.C - self.hc[r]) / float(i - lo)
            var = (self.Q - self.hq[r]) / float(i - lo) - mean * mean
            sd = math.sqrt(var if var > 0.0 else 0.0)
            mu = mean + self.x0
            fl = self.floor * abs(mu)
            sd_eff = sd if sd >= fl else fl
            thr = mu + self.k * sd_eff
            if x >= thr:
                out = [self.det._f(step, x, thr, mu, sd_eff)]
                self.done = True
        v = x - self.x0
        self.C = self.C + v
        self.Q = self.Q + v * v
        self.i = i = i + 1
        r = i % (self.w + 1)
        self.hc[r] = self.C
        self.hq[r] = self.Q
        return out


class LossJump(Detector):
    """Ratio rule for short logs: ``x_i > r * x_{i-1}`` (previous finite point, > 0)."""

    signature = "loss_jump"

    def _f(self, step, x, prev):
        r = self.cfg.jump_ratio
        return self.finding("warning", step, x, r * prev,
                            f"{self.metric} jumped from {_g(prev)} to {_g(x)}, more than "
                            f"{_g(r)}x the previous point")

    def scan(self, view, ctx):
        x = view.x
        if len(x) < 2:
            return []
        prev = x[:-1]
        j = _first((prev > 0.0) & (x[1:] > self.cfg.jump_ratio * prev))
        return [self._f(view.step[j + 1], x[j + 1], prev[j])] if j >= 0 else []

    def stream(self):
        return _LossJumpState(self)


class _LossJumpState(_State):
    __slots__ = ("det", "prev", "r")

    def __init__(self, det):
        self.det = det
        self.prev = None
        self.r = det.cfg.jump_ratio
        self.done = False

    def push(self, step, x, last):
        prev = self.prev
        self.prev = x
        if prev is not None and prev > 0.0 and x > self.r * prev:
            self.done = True
            return [self.det._f(step, x, prev)]
        return None


class Divergence(Detector):
    """Sustained rise (one-sided CUSUM, Lindley form).

    ``s_i`` = the point itself while fewer than ``smooth_window`` points, then the
    mean of the last ``smooth_window`` (reference and sums restart there);
    ``ref_i = min s``; ``e_i = (s_i - ref_i)/|ref_i|``;
    ``S_i = max(0, S_{i-1} + e_i - k_i)`` computed as ``D_i - min(0, min D)`` with
    ``D = cumsum(e - k)``; flag ``S_i > h``.  The drift ``k_i = max(divergence_drift,
    noise_k * nu_i / sqrt(m_i) * min(c_i, noise_min_pairs) / noise_min_pairs)`` with
    ``c_i = i - 1`` the point-to-point changes seen before point i (``nu`` as in
    ``AccuracyDrop``): a noisy raw series has a running minimum that is an outlier.  The
    noise term is phased in over the first ``noise_min_pairs`` changes (shrunk towards the
    fixed drift while the noise estimate rests on few pairs), not switched on at 20.
    """

    signature = "divergence"

    def _f(self, step, s, ref, S, k, smoothed):
        c = self.cfg
        what = f"mean of the last {c.smooth_window} points" if smoothed else "value"
        return self.finding("critical", step, s, ref * (1.0 + k),
                            f"{self.metric} rose after improving: {what} {_g(s)} vs best "
                            f"{_g(ref)}; CUSUM of the relative excess over drift "
                            f"k={_g(k)} reached {_g(S)} > h={_g(c.divergence_h)}")

    def scan(self, view, ctx):
        c = self.cfg
        x = view.x
        w = c.smooth_window
        s = _smoothed(x, w)
        nu = _noise(x, w)
        P = c.noise_min_pairs
        for a, b, smoothed in _segments(len(x), w):
            seg = s[a:b]
            k = np.multiply(nu[a:b], c.noise_k)
            if smoothed:
                k /= math.sqrt(w)
            # noise term phased in over the first noise_min_pairs changes (weight m / 20;
            # 1 from index P + 1 on)
            ramp = k[:max(min(P + 1 - a, b - a), 0)]
            ramp *= np.minimum(np.maximum(np.arange(a, a + len(ramp)) - 1, 0), P) / float(P)
            np.maximum(k, c.divergence_drift, out=k)
            ref = np.minimum.accumulate(seg)
            den = np.maximum(np.abs(ref), 1e-12)
            e = np.subtract(seg, ref)
            e /= den
            D = np.cumsum(np.subtract(e, k, out=e), out=e)
            S = np.subtract(D, np.minimum(np.minimum.accumulate(D, out=den), 0.0, out=den),
                            out=den)
            j = _first(S > c.divergence_h)
            if j >= 0:
                return [self._f(view.step[a + j], seg[j], ref[j], S[j], k[j], smoothed)]
        return []

    def stream(self):
        return _DivergenceState(self)


class _DivergenceState(_State):
    __slots__ = ("det", "sm", "nz", "ref", "D", "Dmin", "k", "h", "nk", "sqw", "minp", "minpf")

    def __init__(self, det):
        cfg = det.cfg
        self.det = det
        self.sm = _SmoothState(cfg.smooth_window)
        self.nz = _NoiseState(cfg.smooth_window)
        self.ref = math.inf
        self.D = 0.0
        self.Dmin = math.inf
        self.k = cfg.divergence_drift
        self.h = cfg.divergence_h
        self.nk = cfg.noise_k
        self.sqw = math.sqrt(cfg.smooth_window)
        self.minp = cfg.noise_min_pairs
        self.minpf = float(cfg.noise_min_pairs)
        self.done = False

    def push(self, step, x, last):
        s = self.sm.push(x)
        nu = self.nz.push(x)
        n = self.sm.n
        if n == self.sm.w:  # smoothing starts: a fresh reference and CUSUM
            self.ref = math.inf
            self.D = 0.0
            self.Dmin = math.inf
        k = self.k
        m = n - 2  # point-to-point changes seen before this point
        if m > 0:
            kn = self.nk * nu / (self.sqw if n >= self.sm.w else 1.0)
            kn = kn * ((m if m < self.minp else self.minp) / self.minpf)
            if kn > k:
                k = kn
        ref = self.ref = s if s < self.ref else self.ref
        a = abs(ref)
        e = (s - ref) / (a if a > 1e-12 else 1e-12)
        self.D = D = self.D + (e - k)
        if D < self.Dmin:
            self.Dmin = D
        S = D - (self.Dmin if self.Dmin < 0.0 else 0.0)
        if S > self.h:
            self.done = True
            return [self.det._f(step, s, ref, S, k, n >= self.sm.w)]
        return None
