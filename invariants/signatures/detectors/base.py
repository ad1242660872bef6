"""Owns what every detector shares: the ``Detector`` and ``_State`` bases, the
vectorised driver's inputs (``_View``, ``_Context``, ``_first``) and the numerics
several rules use -- each vectorised helper (``_smoothed``, ``_noise``, ``_median_low``,
``_prev_max``) with its streaming twin (``_SmoothState``, ``_NoiseState``,
``_MedianState``, ``_SlidingMax``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from invariants.signatures.config import SignatureConfig
from invariants.signatures.findings import Finding, _g, _step_out


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
        self._cache: dict = {}

    def cached(self, key: tuple, fn):
        """``fn()`` once per key (e.g. a metric's level, read by several detectors)."""
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def last_before(self, metric: str, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Last finite value of ``metric`` at a record <= each ``pos``; (values, has_value)."""
        v = self.views.get(metric)
        if v is None or len(v.x) == 0:
            return np.zeros(len(pos)), np.zeros(len(pos), dtype=bool)
        j = np.searchsorted(v.pos, pos, side="right") - 1
        ok = j >= 0
        return v.x[np.maximum(j, 0)], ok

    def count_before(self, metric: str, pos: np.ndarray) -> np.ndarray:
        """Number of finite points of ``metric`` at records <= each ``pos``."""
        v = self.views.get(metric)
        if v is None or len(v.x) == 0:
            return np.zeros(len(pos), dtype=np.int64)
        return np.searchsorted(v.pos, pos, side="right")


def _run_lengths(hit: np.ndarray) -> np.ndarray:
    """For each index, how many consecutive ``hit`` points end there (0 where not hit)."""
    idx = np.arange(len(hit))
    return idx - np.maximum.accumulate(np.where(hit, -1, idx))


def _best_at(x: np.ndarray, best: np.ndarray) -> np.ndarray:
    """For each index, the index of the point that set ``best = np.minimum.accumulate(x)``
    there (its last strictly new minimum; 0 before any)."""
    n = len(x)
    new = np.empty(n, dtype=bool)
    if n:
        new[0] = x[0] < np.inf
        np.less(x[1:], best[:-1], out=new[1:])
    return np.maximum.accumulate(np.where(new, np.arange(n), 0))


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
                threshold: float | None, message: str, started: float | None = None,
                recovered: float | None = None) -> Finding:
        return Finding(self.signature, self.metric, self.cfg.sev(self.signature, severity),
                       _step_out(step), None if value is None else float(value),
                       None if threshold is None else float(threshold), message,
                       None if started is None else _step_out(started),
                       None if recovered is None else _step_out(recovered))

    def episode(self, severity: str, step: float, value: float | None,
                threshold: float | None, message: str, started: float,
                recovered: float | None) -> Finding:
        """A finding about an episode (a spike, a rise) that may come back: the message ends
        with when it recovered, or "not recovered" (the JSON form has no key for it)."""
        end = f"recovered at step {_g(recovered)}" if recovered is not None else "not recovered"
        return self.finding(severity, step, value, threshold, f"{message}; {end}",
                            started=started, recovered=recovered)

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


def _noise(x: np.ndarray, w: int, relative: bool = True) -> np.ndarray:
    """nu_i = mean of |x_j - x_{j-1}| / |x_{j-1}| over the previous (at most ``w``) pairs with
    j <= i - 1 (0 when there is none): the point-to-point relative noise before point i.
    ``relative=False``: the mean of |x_j - x_{j-1}| (absolute noise, the metric's units)."""
    n = len(x)
    R = np.zeros(n)
    if n > 1:   # r_j, in place (these arrays are the series' size: temporaries cost time)
        r = R[1:]
        np.abs(np.subtract(x[1:], x[:-1], out=r), out=r)
        if relative:
            den = np.abs(x[:-1])
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

    __slots__ = ("i", "prev", "R", "hist", "w", "relative")

    def __init__(self, w: int, relative: bool = True):
        self.relative = relative
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
            if self.relative:
                a = abs(self.prev)
                self.R = self.R + abs(x - self.prev) / (a if a > 1e-12 else 1e-12)
            else:
                self.R = self.R + abs(x - self.prev)
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


# Devillard's 19-exchange network for the median of 9 (after Paeth): the middle element
# ends at index 4.  Only min/max: exact.
_MED9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
         (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _median_low(x: np.ndarray, r: int) -> np.ndarray:
    """m_i = lower median of the last ``r`` points up to and including i (of all of them while
    fewer): ``sorted(window)[(len - 1) // 2]``.  An exact selection (a median network for
    r = 9, else an odd-even transposition sort of the ``r`` shifted columns: only min/max,
    no arithmetic), so the streaming twin (``_MedianState``) gives the same floats."""
    n = len(x)
    m = np.empty(n)
    head = min(n, r - 1)
    for i in range(head):
        m[i] = sorted(x[: i + 1].tolist())[i // 2]
    if n >= r:   # compare-exchange in place: one spare buffer, no temporaries per pair
        k = n - r + 1
        # the shifted columns start as views of x; a column is copied only when a pair
        # first writes to it (its max), so no pass copies x up front
        cols = [x[j:k + j] for j in range(r)]
        owned = [False] * r
        spare = np.empty(k)
        pairs = _MED9 if r == 9 else [(i, i + 1) for p in range(r)
                                      for i in range(p % 2, r - 1, 2)]
        for a, b in pairs:
            u, v = cols[a], cols[b]
            np.minimum(u, v, out=spare)
            if owned[b]:
                np.maximum(u, v, out=v)
            else:
                cols[b], owned[b] = np.maximum(u, v), True
            cols[a], spare = spare, (u if owned[a] else np.empty(k))
            owned[a] = True
        m[r - 1:] = cols[4 if r == 9 else (r - 1) // 2]
    return m


class _MedianState:
    """Streaming twin of ``_median_low``: the last ``r`` points."""

    __slots__ = ("buf", "r")

    def __init__(self, r: int):
        self.buf: list[float] = []
        self.r = r

    def push(self, x: float) -> float:
        buf = self.buf
        if len(buf) == self.r:
            del buf[0]
        buf.append(x)
        return sorted(buf)[(len(buf) - 1) // 2]


def _prev_max(x: np.ndarray, w: int) -> np.ndarray:
    """M_i = max of the previous ``w`` points (i - w .. i - 1; -inf for i = 0).

    Sliding maxima in O(n) (van Herk / Gil-Werman): blocks of ``w``, a running max from
    each block's start and from its end; a window is a suffix of one block and a prefix of
    the next.  Only max, so exact."""
    n = len(x)
    M = np.full(n, -np.inf)
    if n > 1:
        M[1:min(n, w + 1)] = np.maximum.accumulate(x[:min(n, w + 1) - 1])
    if n > w:
        y = x[:-1]                      # window of point i >= w: y[i - w .. i - 1]
        k = -(-len(y) // w)
        pad = np.full(k * w, -np.inf)
        pad[:len(y)] = y
        B = pad.reshape(k, w)
        pre = np.maximum.accumulate(B, axis=1).reshape(-1)
        suf = np.maximum.accumulate(B[:, ::-1], axis=1)[:, ::-1].reshape(-1)
        q = len(y) - w + 1              # windows start at 0 .. q - 1: slices, not gathers
        np.maximum(suf[:q], pre[w - 1:w - 1 + q], out=M[w:])
    return M


class _SlidingMax:
    """Streaming twin of ``_prev_max``: max of the last ``w`` values pushed (a monotonic
    deque: amortised O(1), exact)."""

    __slots__ = ("q", "w", "i")

    def __init__(self, w: int):
        self.q: deque = deque()  # (index, value), values decreasing
        self.w = w
        self.i = 0

    def push(self, x: float) -> None:
        q = self.q
        while q and q[-1][1] <= x:
            q.pop()
        q.append((self.i, x))
        self.i += 1
        if q[0][0] <= self.i - 1 - self.w:
            q.popleft()

    def max(self) -> float:
        return self.q[0][1]
