"""Owns ``GradNormSpike`` (ZClip z-score plus a local-noise test and the spread rule) and
its streaming state, with the blocked EMA (``_linear_recurrence``) its fast screen uses.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from invariants.signatures.detectors.base import Detector, _first, _noise, _NoiseState, _State
from invariants.signatures.detectors.loss import _back
from invariants.signatures.findings import _g


_EPS = float(np.finfo(np.float64).eps)


def _linear_recurrence(u: np.ndarray, a: float) -> tuple[np.ndarray, float]:
    """``y_i = a y_{i-1} + u_i`` (``y_0 = u_0``) in blocks; returns ``(y, bound)`` where
    ``|y - exact| <= bound``: a loose bound on the rounding error (a within-block cumsum
    of at most B terms magnified by at most ``a^-B``, carried with factor ``a^B``)."""
    n = len(u)
    B = int(max(1, min(256, math.floor(math.log(1e6) / -math.log(a)))))
    nb = -(-n // B)
    Z = np.zeros(nb * B)
    Z[:n] = u
    Z = Z.reshape(nb, B)          # in place from here: the arrays are the series' size
    j = np.arange(B, dtype=np.float64)
    up = a ** -j                  # (B,) a^-j  <= 1e6
    down = a ** j                 # (B,) a^j
    Z *= up
    np.cumsum(Z, axis=1, out=Z)
    Z *= down                     # (nb, B) zero carry-in
    aB = a ** B
    ends = Z[:, -1].tolist()
    carry = list(itertools.accumulate(ends, lambda c, e: aB * c + e))  # y at each block end
    prev = np.concatenate(([0.0], carry[:-1]))    # (nb,) carry into each block
    Y = np.add(Z, np.multiply(prev[:, None], (a * down)[None, :]), out=Z)
    bound = 8.0 * B * _EPS * float(up[-1]) / (1.0 - aB)
    return Y.reshape(-1)[:n], bound * float(np.max(np.abs(u)))


def _local_median(prev: list) -> float:
    """Lower median of the previous points (sorted, element ``(len - 1) // 2``)."""
    return sorted(prev)[(len(prev) - 1) // 2]


class GradNormSpike(Detector):
    """ZClip z-score: ``z = (g_i - mu_{i-1}) / sigma_{i-1} > z_thr`` after the warm-up,
    and the point stands out from its neighbourhood: ``g_i - med_i > noise_k * nu_i * |med_i|``.

    ``mu_i = a mu_{i-1} + (1-a) g_i``, ``var_i = a var_{i-1} + (1-a)(g_i - mu_i)^2``,
    ``mu_0 = g_0``, ``var_0 = 0``; sigma floored at ``zclip_sigma_floor * mu``.
    ``med_i`` is the (lower) median of the previous ``zclip_local_points`` points and
    ``nu_i`` the relative point-to-point noise before point i (as in ``AccuracyDrop``).
    ZClip's rule is a clipping rule: the EMA lags a trend (every point of a rising
    grad norm is "above the mean") and on a noisy series one batch in a few hundred is
    beyond 2.5 sigma.  The second condition asks for a jump well beyond the series' own
    point-to-point noise, measured from where the series is now.  A third condition, the
    loss spike's spread rule (``g > level + spike_k * (max of the previous spike_window
    points - level)``, judged from point ``spike_min_periods`` on), keeps heavy-tailed
    batch-size-1 grad norms (single batches 10x their median) from counting as spikes.
    ``recovered_step``: the first later point back where the series was before (``_back``).
    """

    signature = "grad_norm_spike"

    def _f(self, step, g, thr, mu, sd, med, nu, top, rec):
        c = self.cfg
        local = med + c.noise_k * nu * abs(med)
        return self.episode("warning", step, g, max(thr, local),
                            f"{self.metric}={_g(g)} > {_g(thr)}: beyond the ZClip z-score "
                            f"(EMA mean {_g(mu)} + {_g(c.zclip_z)} sigma {_g(sd)}, "
                            f"alpha={_g(c.zclip_alpha)}), the recent spread (level + "
                            f"{_g(c.spike_k)} x (max of the previous {c.spike_window} points "
                            f"{_g(top)} - level)) and {_g(local)}, the median {_g(med)} of the "
                            f"previous {c.zclip_local_points} points plus {_g(c.noise_k)} x "
                            f"their relative noise {_g(nu)}", step, rec)

    def _local(self, x: np.ndarray, nu: np.ndarray, p: np.ndarray) -> np.ndarray:
        """For candidate indices ``p`` (increasing): (medians, tops, spread thresholds, levels,
        mask) where the local rule and the spread rule hold."""
        c = self.cfg
        L, r, w = c.zclip_local_points, c.level_window, c.spike_window
        ql = p.tolist()
        med = np.array([_local_median(x[max(q - L, 0):q].tolist()) for q in ql]) \
            if len(p) else np.zeros(0)
        lvl = np.array([_local_median(x[max(q - r, 0):q].tolist()) for q in ql]) \
            if len(p) else np.zeros(0)
        top = np.array([max(x[max(q - w, 0):q].tolist()) for q in ql]) if len(p) else np.zeros(0)
        d = top - lvl
        fl = c.spike_sigma_floor * np.abs(lvl)
        sthr = lvl + c.spike_k * np.where(d >= fl, d, fl)
        ok = ((x[p] - med) > c.noise_k * nu[p] * np.abs(med)) & (p >= c.spike_min_periods) & \
            (x[p] > sthr)
        return med, top, sthr, lvl, ok

    def scan(self, view, ctx):
        cfg = self.cfg
        x = view.x
        n = len(x)
        if n <= cfg.zclip_warmup:
            return []
        a = cfg.zclip_alpha
        b = 1.0 - a
        if not self._may_fire(x, a, b):
            return []
        xs = x.tolist()
        mu = np.array(list(itertools.accumulate(xs, lambda m, g: a * m + b * g)))
        d = x - mu
        t = (b * (d * d)).tolist()
        var = np.array(list(itertools.accumulate(t[1:], lambda v, u: a * v + u, initial=0.0)))
        mp, vp = mu[:-1], var[:-1]  # statistics before observation i (i >= 1)
        sd_eff = np.maximum(np.sqrt(vp), cfg.zclip_sigma_floor * np.abs(mp))
        thr = mp + cfg.zclip_z * sd_eff
        i = np.arange(1, n)
        cand = np.flatnonzero((i >= cfg.zclip_warmup) & (x[1:] > thr))  # indices into thr
        if len(cand) == 0:
            return []
        nu = _noise(x, cfg.smooth_window)
        for lo in range(0, len(cand), 256):  # the first candidate usually decides
            c = cand[lo:lo + 256]
            med, top, sthr, lvl_, ok = self._local(x, nu, c + 1)
            jj = _first(ok)
            if jj >= 0:
                j = int(c[jj])
                back = np.flatnonzero(x[j + 2:] <= _back(lvl_[jj], x[j], cfg))
                rec = view.step[j + 2 + int(back[0])] if len(back) else None
                return [self._f(view.step[j + 1], x[j + 1], max(thr[j], sthr[jj]), mp[j],
                                sd_eff[j], med[jj], nu[j + 1], top[jj], rec)]
        return []

    def _may_fire(self, x: np.ndarray, a: float, b: float) -> bool:
        """Fast screen: False only if no point can exceed the exact threshold.

        The EMAs are computed in blocks with numpy (closed form inside a block, carries
        between blocks); their rounding error is bounded and the threshold is lowered by a
        generous multiple of that bound.  If nothing comes within it, the exact sequential
        recursion (bit-identical to the streaming driver) would find nothing either; if
        something does, the caller runs the exact recursion.
        """
        cfg = self.cfg
        M = float(np.max(np.abs(x)))
        if not M < 1e150:
            return True
        u = b * x
        u[0] = x[0]
        mu, err = _linear_recurrence(u, a)
        tol_mu = 100.0 * err + 1e3 * _EPS * M / b  # + the sequential recursion's own rounding
        d = x - mu
        v = np.multiply(np.multiply(d, d, out=d), b, out=d)
        v[0] = 0.0
        var, err_v = _linear_recurrence(v, a)
        D = 2.0 * M + tol_mu
        # an error e in mu moves b*d^2 by at most b*(2De + e^2) per step; summed with weight a^k
        tol_var = 100.0 * err_v + 1e3 * _EPS * D * D + 2.0 * D * tol_mu + tol_mu * tol_mu
        tol_thr = tol_mu * (1.0 + cfg.zclip_z * cfg.zclip_sigma_floor) + \
            cfg.zclip_z * math.sqrt(tol_var)
        mp, vp = mu[:-1], var[:-1]
        sd_eff = np.sqrt(np.maximum(vp, 0.0, out=vp), out=vp)
        np.maximum(sd_eff, np.multiply(np.abs(mp, out=d[1:]), cfg.zclip_sigma_floor,
                                       out=d[1:]), out=sd_eff)
        thr = np.add(mp, np.multiply(sd_eff, cfg.zclip_z, out=sd_eff), out=sd_eff)
        cand = x[1:] > np.subtract(thr, tol_thr, out=thr)
        cand[: max(cfg.zclip_warmup - 1, 0)] = False
        return bool(cand.any())

    def stream(self):
        return _GradNormSpikeState(self)


class _GradNormSpikeState(_State):
    __slots__ = ("det", "i", "mu", "var", "a", "b", "z", "floor", "warm", "nz", "prev", "L",
                 "nk", "hist", "r", "w", "k", "sfloor", "minp", "fired")

    def __init__(self, det):
        cfg = det.cfg
        self.det = det
        self.nz = _NoiseState(cfg.smooth_window)
        self.prev: list[float] = []  # the last zclip_local_points points
        self.L = cfg.zclip_local_points
        self.nk = cfg.noise_k
        self.i = 0
        self.mu = 0.0
        self.var = 0.0
        self.a = cfg.zclip_alpha
        self.b = 1.0 - cfg.zclip_alpha
        self.z = cfg.zclip_z
        self.floor = cfg.zclip_sigma_floor
        self.warm = cfg.zclip_warmup
        self.hist: list[float] = []  # at most max(spike_window, level_window) + 1 points
        self.r = cfg.level_window
        self.w = cfg.spike_window
        self.k = cfg.spike_k
        self.sfloor = cfg.spike_sigma_floor
        self.minp = cfg.spike_min_periods
        self.fired = None  # finding args while waiting for the recovery
        self.done = False

    def push(self, step, g, last):
        if self.fired is not None:
            if g <= self.fired[8]:
                self.done = True
                return [self.det._f(*self.fired[:8], step)]
            return None
        hist = self.hist
        if len(hist) > (self.w if self.w > self.r else self.r):
            del hist[0]
        hist.append(g)  # the previous max(spike_window, level_window) points, then this one
        i = self.i
        self.i = i + 1
        a, b = self.a, self.b
        nu = self.nz.push(g)
        prev = self.prev
        if i == 0:
            self.mu = g
            prev.append(g)
            return None
        out = None
        if i >= self.warm:
            mu = self.mu
            sd = math.sqrt(self.var)
            fl = self.floor * abs(mu)
            sd_eff = sd if sd >= fl else fl
            thr = mu + self.z * sd_eff
            if g > thr and i >= self.minp:
                med = _local_median(prev)
                if g - med > self.nk * nu * abs(med):
                    h = hist[:-1]
                    lvl = _local_median(h[-self.r:])
                    top = max(h[-self.w:])
                    d = top - lvl
                    fl = self.sfloor * abs(lvl)
                    sthr = lvl + self.k * (d if d >= fl else fl)
                    if g > sthr:
                        self.fired = (step, g, thr if thr > sthr else sthr, mu, sd_eff, med, nu,
                                      top, _back(lvl, h[-1], self.det.cfg))
                        out = [self.det._f(*self.fired[:8], None)]
        if len(prev) == self.L:
            prev.pop(0)
        prev.append(g)
        mu = a * self.mu + b * g
        d = g - mu
        self.var = a * self.var + b * (d * d)
        self.mu = mu
        return out
