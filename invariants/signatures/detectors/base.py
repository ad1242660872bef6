"""Owns what every detector shares: the ``Detector`` and ``_State`` bases, the
vectorised driver's inputs (``_View``, ``_Context``, ``_first``) and the numerics
several rules use -- each vectorised helper (``_smoothed``, ``_noise``) right
before its streaming twin (``_SmoothState``, ``_NoiseState``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from invariants.signatures.config import SignatureConfig
from invariants.signatures.findings import Finding, _step_out


# --------------------------------------------------------------------------- series views
@dataclass
class _View:
    """One metric's finite observations, in record order (vectorised driver input)."""

    x: np.ndarray      # (n,) float64 finite values, or an object array of strings
    step: np.ndarray   # (n,) float64
    pos: np.ndarray    # (n,) int64 record ordinal (alignment between metrics)


class _Context:
    """Other metrics' finite series, for detectors that read two metrics."""

    def __init__(self, views: Mapping[str, _View]):
        self.views = views

    def last_before(self, metric: str, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Last finite value of ``metric`` at a record <= each ``pos``; (values, has_value)."""
        v = self.views.get(metric)
        if v is None or len(v.x) == 0:
            return np.zeros(len(pos)), np.zeros(len(pos), dtype=bool)
        j = np.searchsorted(v.pos, pos, side="right") - 1
        ok = j >= 0
        return v.x[np.maximum(j, 0)], ok


def _first(mask: np.ndarray) -> int:
    """Index of the first True, or -1."""
    if mask.size == 0:
        return -1
    i = int(np.argmax(mask))
    return i if mask[i] else -1


# --------------------------------------------------------------------------- detectors
class Detector:
    """Base: ``signature``, the ``metric`` it reads, ``scan`` and ``stream`` drivers."""

    signature = ""

    def __init__(self, metric: str, cfg: SignatureConfig):
        self.metric = metric
        self.cfg = cfg

    def finding(self, severity: str, step: float, value: float | None,
                threshold: float | None, message: str) -> Finding:
        return Finding(self.signature, self.metric, self.cfg.sev(self.signature, severity),
                       _step_out(step), None if value is None else float(value),
                       None if threshold is None else float(threshold), message)

    def scan(self, view: _View, ctx: _Context) -> list[Finding]:  # pragma: no cover
        raise NotImplementedError

    def stream(self) -> "_State":  # pragma: no cover
        raise NotImplementedError


class _State:
    """Streaming state: ``push(step, x, last)`` -> list of findings or None; ``done``."""

    __slots__ = ("done",)


# --------------------------------------------------------------------------- shared numerics
def _smoothed(x: np.ndarray, w: int, expanding: bool = False) -> np.ndarray:
    """``x_i`` (or, ``expanding``, the mean so far) while fewer than ``w`` points, then the
    mean of the last ``w``; window sums are differences of the cumsum of ``x - x_0``."""
    n = len(x)
    s = x.copy()
    if n == 0:
        return s
    V = np.empty(n + 1)                               # V[c] = sum of the first c points
    V[0] = 0.0
    np.cumsum(np.subtract(x, x[0], out=V[1:]), out=V[1:])
    if expanding:
        L = min(n, w - 1)
        s[:L] = x[0] + V[1:L + 1] / np.arange(1, L + 1, dtype=np.float64)
    if n >= w:  # counts c = w .. n; in place (the arrays are the series' size)
        tail = s[w - 1:]
        np.subtract(V[w:n + 1], V[0:n + 1 - w], out=tail)
        tail /= float(w)
        tail += x[0]
    return s


class _SmoothState:
    """Streaming twin of ``_smoothed``: a ring buffer of the last ``w`` cumulative sums."""

    __slots__ = ("n", "x0", "V", "hist", "w", "expanding")

    def __init__(self, w: int, expanding: bool = False):
        self.n = 0
        self.x0 = 0.0
        self.V = 0.0
        self.w = w
        self.expanding = expanding
        self.hist = [0.0] * (w + 1)

    def push(self, x: float) -> float:
        if self.n == 0:
            self.x0 = x
        self.V = self.V + (x - self.x0)
        self.n = n = self.n + 1
        w = self.w
        self.hist[n % (w + 1)] = self.V
        if n < w:
            return self.x0 + self.V / float(n) if self.expanding else x
        return self.x0 + (self.V - self.hist[(n - w) % (w + 1)]) / float(w)


def _noise(x: np.ndarray, w: int) -> np.ndarray:
    """nu_i = mean of |x_j - x_{j-1}| / |x_{j-1}| over the previous (at most ``w``) pairs with
    j <= i - 1 (0 when there is none): the point-to-point relative noise before point i."""
    n = len(x)
    R = np.zeros(n)
    if n > 1:   # r_j, in place (these arrays are the series' size: temporaries cost time)
        r, den = R[1:], np.abs(x[:-1])
        np.abs(np.subtract(x[1:], x[:-1], out=r), out=r)
        r /= np.maximum(den, 1e-12, out=den)
    np.cumsum(R, out=R)  # R[j] = r_1 + ... + r_j
    nu = np.zeros(n)
    if n > 2:
        # point i >= 2: pairs lo+1 .. hi with hi = i - 1, lo = max(hi - w, 0)
        s = min(w, n - 2)             # hi <= w: lo = 0 (R[0] = 0), count hi
        out = nu[2:]
        out[:] = R[1:n - 1]
        out[s:] -= R[1:n - 1 - s]     # hi > w: lo = hi - w = 1, 2, ...; count w
        out[:s] /= np.arange(1, s + 1, dtype=np.float64)
        out[s:] /= float(w)
    return nu


class _NoiseState:
    """Streaming twin of ``_noise``: ring buffer of the last ``w + 1`` cumulative sums."""

    __slots__ = ("i", "prev", "R", "hist", "w")

    def __init__(self, w: int):
        self.i = 0
        self.prev = 0.0
        self.R = 0.0
        self.w = w
        self.hist = [0.0] * (w + 2)

    def push(self, x: float) -> float:
        """Noise before this point, then account for the pair (previous, x)."""
        i = self.i
        hi = i - 1
        lo = hi - self.w if hi - self.w > 0 else 0
        m = self.w + 2
        nu = (self.hist[hi % m] - self.hist[lo % m]) / float(hi - lo) if hi - lo > 0 else 0.0
        if i >= 1:
            a = abs(self.prev)
            self.R = self.R + abs(x - self.prev) / (a if a > 1e-12 else 1e-12)
        self.hist[i % m] = self.R
        self.prev = x
        self.i = i + 1
        return nu


def _segments(n: int, w: int) -> list[tuple[int, int, bool]]:
    """Index ranges of the raw regime (fewer than ``w`` points) and the smoothed regime.

    Reference values (best so far) and CUSUM sums restart where smoothing starts:
    a lagging window mean must not be compared with a raw minimum.
    """
    if n < w:
        return [(0, n, False)]
    return [(0, w - 1, False), (w - 1, n, True)]
