"""Collapse-signature detectors: one definition, two drivers.

Every signature SPEC.md names (seed sections and "Generic collapse signatures")
is one detector class here.  Each class states its rule once, in its docstring,
and implements it twice with the *same floating-point operations in the same
order*:

- ``stream()`` returns a small state object whose ``push`` takes one
  observation (constant memory per metric: a few floats, and ring buffers whose
  size is a config constant, never the length of the run).  ``StreamingScanner``
  feeds records to these states; ``CollapseGuard`` (``_guard.py``) wraps it.
- ``scan(view)`` takes a metric's whole series as numpy arrays and finds the
  first observation that triggers the rule (``VectorisedScanner`` /
  ``scan_series``; used by ``invariants scan``).

Running sums are numpy's sequential ``cumsum`` in one driver and ``+=`` in the
other, running extrema are ``minimum.accumulate`` / ``min``, and the two EMA
recursions of ZClip are ``itertools.accumulate`` over the same Python
expression, so both drivers give bit-identical findings (tests/test_signatures_*.py
checks this with Hypothesis).

A finding is reported once per (signature, metric, severity), at the first step
it was detectable.  Non-finite observations are reported by ``non_finite`` and
skipped by every other detector.  Defaults come from the seeds where they give
numbers, otherwise from the cited source; see docs/signatures.md.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from hypothesis import strategies as st

from invariants._errors import InvalidArgumentError
from invariants._validate import require

__all__ = [
    "CANONICAL_METRICS",
    "Finding",
    "SIGNATURES",
    "SampleStatistics",
    "SignatureConfig",
    "StreamingScanner",
    "VectorisedScanner",
    "build_detectors",
    "metric_series",
    "sample_statistics",
    "scan_records",
    "scan_series",
    "verdict_of",
]

NUMERIC_METRICS = (
    "loss", "val_loss", "accuracy", "val_accuracy", "grad_norm", "loss_scale", "lr",
    "entropy", "attention_sharpness", "lora_norm", "nan_batches", "bg_fraction",
    "target_bg_fraction", "z_e_step_change", "z_e_step_change_pct", "grad_norm_encoder",
)
TEXT_METRICS = ("sample",)
CANONICAL_METRICS = NUMERIC_METRICS + TEXT_METRICS
SEVERITIES = ("warning", "critical")
_NONFINITE_TEXT = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
                   "-infinity"}
SMOOTHED_LOSS = "loss~smoothed"  # internal: the smoothed training loss other detectors read
_SEVERITY_RANK = {"warning": 0, "critical": 1}

# signature name -> default severity (a level ladder lists several)
SIGNATURES: dict[str, tuple[str, ...]] = {
    "non_finite": ("critical",),
    "nan_batches": ("warning", "critical"),
    "loss_spike": ("warning",),
    "loss_jump": ("warning",),
    "grad_norm_spike": ("warning",),
    "divergence": ("critical",),
    "plateau": ("warning",),
    "overfit_gap": ("warning",),
    "lora_norm": ("warning", "critical"),
    "lora_norm_kill": ("critical",),
    "entropy_spike": ("critical",),
    "attention_collapse": ("critical",),
    "accuracy_drop": ("warning",),
    "background_collapse": ("warning", "critical"),
    "mode_collapse": ("critical",),
    "repetition": ("warning",),
    "seq_repetition": ("warning",),
    "z_e_step_change": ("warning",),
    "encoder_grad_share": ("warning",),
    "encoder_starving": ("warning",),
    "worse_than_chance": ("critical",),
}


# --------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """One collapse signature, first detectable at ``step``.

    ``value`` is what was observed (in the metric's units, or the statistic the
    message names), ``threshold`` the bound it crossed (``None`` where there is
    no numeric bound, e.g. a NaN).
    """

    signature: str
    metric: str
    severity: str
    step: int | float
    value: float | None
    threshold: float | None
    message: str

    def as_json(self) -> dict[str, Any]:
        """The DESIGN.md finding object; non-finite numbers become "nan"/"inf"/"-inf"."""
        return {"signature": self.signature, "metric": self.metric, "severity": self.severity,
                "step": self.step, "value": _json_number(self.value),
                "threshold": _json_number(self.threshold), "message": self.message}

    def sort_key(self) -> tuple:
        return (self.step, -_SEVERITY_RANK[self.severity], self.signature, self.metric)


def _json_number(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def verdict_of(findings: Iterable[Finding]) -> str:
    """``"collapse"`` if any finding is critical, ``"warning"`` if any, else ``"healthy"``."""
    sev = {f.severity for f in findings}
    return "collapse" if "critical" in sev else ("warning" if sev else "healthy")


def _step_out(step: float) -> int | float:
    step = float(step)
    return int(step) if step.is_integer() else step


def _g(x: float) -> str:
    return f"{x:.6g}"


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SignatureConfig:
    """Thresholds of every detector.  Defaults cite their source (docs/signatures.md).

    Override any field (``SignatureConfig(entropy_max=3.0)``), change a
    signature's severity with ``severity={"plateau": "critical"}`` (applies to
    every level of that signature) or switch it off with ``disabled={"plateau"}``.
    """

    # non-finite: any NaN/Inf in a numeric metric (SageMaker ExplodingTensor, Lightning check_finite)
    # NaN batches per epoch: healthy 0-10, > 50 abort (seed 000 §4)
    nan_batches_warn: float = 10.0
    nan_batches_critical: float = 50.0
    # loss spike, OLMo 2 §3.2: x - rolling mean >= k sigma over the previous `spike_window` points
    spike_k: float = 7.0
    spike_window: int = 1000
    spike_min_periods: int = 20  # ours: fewer points give no usable sigma; the ratio rule covers them
    spike_sigma_floor: float = 1e-3  # ours: sigma >= 0.1% of |mean| (a flat series has sigma ~ 0)
    # loss jump (ratio rule for short logs): x > r * previous value (SPEC; r is ours)
    jump_ratio: float = 2.0
    # grad-norm spike, ZClip: EMA z-score, alpha 0.97, z > 2.5, 25 warm-up steps
    zclip_z: float = 2.5
    zclip_alpha: float = 0.97
    zclip_warmup: int = 25
    zclip_sigma_floor: float = 0.1  # ours: an alarm (not a clip) needs >= 25% above the EMA mean
    # ours: ... and must stand out from the last `zclip_local_points` points (their median) by
    # more than noise_k x the series' relative point noise: a lagging EMA on a trend, or one
    # noisy batch, is not a spike (docs/signatures.md, golden runs)
    zclip_local_points: int = 5
    # divergence: one-sided CUSUM of the relative excess of the smoothed loss over its best
    divergence_drift: float = 0.1  # k: half of a 20% rise (SPEC: "drift ~ half the expected change")
    divergence_h: float = 0.25     # decision interval (ours, see docs)
    smooth_window: int = 50        # smoothing over the last 50 points once there are 50 (ours)
    # plateau: no improvement > min_delta within `patience` checks.  Seed 002 stops after
    # (3, 0.01); that flags every healthy curve whose improvement slows below 0.01 per 3
    # checks, so the signature uses SageMaker's train patience 5 and Lightning's min_delta 0.
    plateau_patience: int = 5
    plateau_min_delta: float = 0.0
    # overfit gap (val - train)/train > 0.1 (SageMaker Overfit); train = smoothed loss
    overfit_ratio: float = 0.1
    # LoRA norm ladder (seed 000: warn 1.0 / critical 1.5 / kill 2.0)
    lora_norm_warn: float = 1.0
    lora_norm_critical: float = 1.5
    lora_norm_kill: float = 2.0
    # prediction entropy > 2.0 collapse (seed 000 §4; healthy < 0.5), judged once the entropy
    # has been healthy (< 0.5): an untrained classifier starts near ln(classes) (ours)
    entropy_max: float = 2.0
    entropy_healthy: float = 0.5
    # attention sharpness < 0.1 collapse (seed 000 §4; healthy > 0.5), judged once healthy
    attention_min: float = 0.1
    attention_healthy: float = 0.5
    # accuracy drop > 5% (relative) from its best (seed 000 §4), on the smoothed series
    accuracy_drop: float = 0.05
    noise_k: float = 6.0  # ours: a drop must also exceed 6x the series' relative point noise ...
    noise_min_pairs: int = 20  # ... estimated from at least 20 point-to-point changes (ours);
    # divergence phases its noise term in over those first 20 changes (weight m/20, ours)
    # background collapse >= 0.99 all-BG or <= 0.01 all-FG while targets lie between (seed 001)
    bg_high: float = 0.99
    bg_low: float = 0.01
    # LM samples (seed 002; Welleck et al. 2019 seq-rep-n; Li et al. 2016 distinct-n)
    mode_collapse_distinct: float = 0.1   # distinct-1 <= 0.1 ...
    mode_collapse_min_units: int = 8      # ... over at least 8 tokens/characters (ours)
    repetition_run: int = 3               # a token repeated 3+ times in a row ("If If If")
    seq_rep_n: int = 4
    seq_rep_max: float = 0.44             # greedy decoding's seq-rep-4 (Welleck et al.)
    # seed 004: z_e step change > 0.5 bad, > 20% bad; encoder share > 0.7, < 0.2 starving
    z_e_step_change_max: float = 0.5
    z_e_step_change_pct_max: float = 0.2
    encoder_share_high: float = 0.7
    encoder_share_low: float = 0.2
    # worse than chance: LM loss > ln(vocab_size); off unless vocab_size is given
    vocab_size: int | None = None
    severity: Mapping[str, str] = field(default_factory=dict)
    disabled: frozenset = frozenset()

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("severity", "disabled", "vocab_size"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidArgumentError(f"{f.name}={v!r}: must be a finite number")
            if f.name in ("spike_window", "spike_min_periods", "zclip_warmup", "smooth_window",
                          "noise_min_pairs", "zclip_local_points",
                          "plateau_patience", "mode_collapse_min_units", "repetition_run",
                          "seq_rep_n"):
                require(isinstance(v, int) and v >= 1, f.name, v, "must be an integer >= 1")
            elif f.name in ("zclip_alpha",):
                require(0.0 < v < 1.0, f.name, v, "must lie in (0, 1)")
            elif f.name in ("plateau_min_delta", "divergence_drift"):
                require(v >= 0.0, f.name, v, "must be >= 0")
            elif f.name in ("bg_low", "bg_high", "accuracy_drop", "encoder_share_low",
                            "encoder_share_high", "mode_collapse_distinct", "seq_rep_max"):
                require(0.0 <= v <= 1.0, f.name, v, "must lie in [0, 1]")
            else:
                require(v > 0.0, f.name, v, "must be > 0")
        require(self.bg_low < self.bg_high, "bg_low", self.bg_low, f"must be < bg_high={self.bg_high}")
        require(self.lora_norm_warn <= self.lora_norm_critical <= self.lora_norm_kill,
                "lora_norm_warn", (self.lora_norm_warn, self.lora_norm_critical, self.lora_norm_kill),
                "must satisfy warn <= critical <= kill")
        require(self.entropy_healthy <= self.entropy_max, "entropy_healthy", self.entropy_healthy,
                f"must be <= entropy_max={self.entropy_max}")
        require(self.attention_healthy >= self.attention_min, "attention_healthy",
                self.attention_healthy, f"must be >= attention_min={self.attention_min}")
        require(self.nan_batches_warn <= self.nan_batches_critical, "nan_batches_warn",
                self.nan_batches_warn, f"must be <= nan_batches_critical={self.nan_batches_critical}")
        require(self.spike_min_periods <= self.spike_window, "spike_min_periods",
                self.spike_min_periods, f"must be <= spike_window={self.spike_window}")
        if self.vocab_size is not None:
            require(isinstance(self.vocab_size, int) and not isinstance(self.vocab_size, bool)
                    and self.vocab_size >= 2, "vocab_size", self.vocab_size, "must be an integer >= 2")
        require(isinstance(self.severity, Mapping), "severity", self.severity, "must be a mapping")
        for name, sev in self.severity.items():
            require(name in SIGNATURES, "severity", name,
                    f"unknown signature; known: {', '.join(sorted(SIGNATURES))}")
            require(sev in SEVERITIES, f"severity[{name!r}]", sev, "must be 'warning' or 'critical'")
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        for name in self.disabled:
            require(name in SIGNATURES, "disabled", name,
                    f"unknown signature; known: {', '.join(sorted(SIGNATURES))}")

    def sev(self, signature: str, default: str) -> str:
        return self.severity.get(signature, default)


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
        C = np.cumsum(v)   # C[i - 1] = sum of v[0 .. i-1]
        Q = np.cumsum(v * v)
        # window of point i (i >= p): points lo .. i-1 with lo = max(i - w, 0); the sums are
        # C[i-1] - C[lo-1] (C[-1] = 0), slices rather than gathers
        k = n - p
        s = min(max(w - p, 0), k)  # points with i < w: lo = 0
        Ci, Qi = C[p - 1:n - 1], Q[p - 1:n - 1]
        Clo, Qlo = np.zeros(k), np.zeros(k)
        m = np.full(k, float(w))
        m[:s] = np.arange(p, p + s)
        if k > s:
            Clo[s:] = C[p + s - w - 1:n - w - 1] if p + s - w - 1 >= 0 else \
                np.concatenate(([0.0], C[:n - w - 1]))
            Qlo[s:] = Q[p + s - w - 1:n - w - 1] if p + s - w - 1 >= 0 else \
                np.concatenate(([0.0], Q[:n - w - 1]))
        mean = (Ci - Clo) / m
        var = (Qi - Qlo) / m - mean * mean
        sd = np.sqrt(np.maximum(var, 0.0))
        mu = mean + x[0]
        sd_eff = np.maximum(sd, cfg.spike_sigma_floor * np.abs(mu))
        thr = mu + cfg.spike_k * sd_eff
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


_EPS = float(np.finfo(np.float64).eps)


def _linear_recurrence(u: np.ndarray, a: float) -> tuple[np.ndarray, float]:
    """``y_i = a y_{i-1} + u_i`` (``y_0 = u_0``) in blocks; returns ``(y, bound)`` where
    ``|y - exact| <= bound``: a loose bound on the rounding error (a within-block cumsum
    of at most B terms magnified by at most ``a^-B``, carried with factor ``a^B``)."""
    n = len(u)
    B = int(max(1, min(256, math.floor(math.log(1e6) / -math.log(a)))))
    nb = -(-n // B)
    U = np.zeros(nb * B)
    U[:n] = u
    U = U.reshape(nb, B)
    j = np.arange(B, dtype=np.float64)
    up = a ** -j                  # (B,) a^-j  <= 1e6
    down = a ** j                 # (B,) a^j
    Z = np.cumsum(U * up, axis=1) * down          # (nb, B) zero carry-in
    aB = a ** B
    ends = Z[:, -1].tolist()
    carry = list(itertools.accumulate(ends, lambda c, e: aB * c + e))  # y at each block end
    prev = np.concatenate(([0.0], carry[:-1]))    # (nb,) carry into each block
    Y = Z + prev[:, None] * (a * down)[None, :]
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
    point-to-point noise, measured from where the series is now.
    """

    signature = "grad_norm_spike"

    def _f(self, step, g, thr, mu, sd, med, nu):
        c = self.cfg
        local = med + c.noise_k * nu * abs(med)
        return self.finding("warning", step, g, max(thr, local),
                            f"{self.metric}={_g(g)} > EMA mean {_g(mu)} + {_g(c.zclip_z)} "
                            f"sigma ({_g(sd)}) = {_g(thr)} (ZClip z-score, "
                            f"alpha={_g(c.zclip_alpha)}) and > {_g(local)}, the median "
                            f"{_g(med)} of the previous {c.zclip_local_points} points plus "
                            f"{_g(c.noise_k)} x their relative noise {_g(nu)}")

    def _local(self, x: np.ndarray, nu: np.ndarray, p: np.ndarray) -> np.ndarray:
        """For candidate indices ``p`` (increasing): (p, medians) where the local rule holds."""
        L = self.cfg.zclip_local_points
        med = np.array([_local_median(x[max(q - L, 0):q].tolist()) for q in p.tolist()]) \
            if len(p) else np.zeros(0)
        return med, (x[p] - med) > self.cfg.noise_k * nu[p] * np.abs(med)

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
            med, ok = self._local(x, nu, c + 1)
            jj = _first(ok)
            if jj >= 0:
                j = int(c[jj])
                return [self._f(view.step[j + 1], x[j + 1], thr[j], mp[j], sd_eff[j], med[jj],
                                nu[j + 1])]
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
        v = b * (d * d)
        v[0] = 0.0
        var, err_v = _linear_recurrence(v, a)
        D = 2.0 * M + tol_mu
        # an error e in mu moves b*d^2 by at most b*(2De + e^2) per step; summed with weight a^k
        tol_var = 100.0 * err_v + 1e3 * _EPS * D * D + 2.0 * D * tol_mu + tol_mu * tol_mu
        tol_thr = tol_mu * (1.0 + cfg.zclip_z * cfg.zclip_sigma_floor) + \
            cfg.zclip_z * math.sqrt(tol_var)
        mp, vp = mu[:-1], var[:-1]
        sd_eff = np.maximum(np.sqrt(np.maximum(vp, 0.0)), cfg.zclip_sigma_floor * np.abs(mp))
        thr = mp + cfg.zclip_z * sd_eff
        cand = x[1:] > thr - tol_thr
        cand[: max(cfg.zclip_warmup - 1, 0)] = False
        return bool(cand.any())

    def stream(self):
        return _GradNormSpikeState(self)


class _GradNormSpikeState(_State):
    __slots__ = ("det", "i", "mu", "var", "a", "b", "z", "floor", "warm", "nz", "prev", "L",
                 "nk")

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
        self.done = False

    def push(self, step, g, last):
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
            if g > thr:
                med = _local_median(prev)
                if g - med > self.nk * nu * abs(med):
                    out = [self.det._f(step, g, thr, mu, sd_eff, med, nu)]
                    self.done = True
        if len(prev) == self.L:
            prev.pop(0)
        prev.append(g)
        mu = a * self.mu + b * g
        d = g - mu
        self.var = a * self.var + b * (d * d)
        self.mu = mu
        return out


def _smoothed(x: np.ndarray, w: int, expanding: bool = False) -> np.ndarray:
    """``x_i`` (or, ``expanding``, the mean so far) while fewer than ``w`` points, then the
    mean of the last ``w``; window sums are differences of the cumsum of ``x - x_0``."""
    n = len(x)
    s = x.copy()
    if n == 0:
        return s
    V = np.concatenate(([0.0], np.cumsum(x - x[0])))  # V[c] = sum of the first c points
    if expanding:
        L = min(n, w - 1)
        s[:L] = x[0] + V[1:L + 1] / np.arange(1, L + 1, dtype=np.float64)
    if n >= w:  # counts c = w .. n
        s[w - 1:] = x[0] + (V[w:n + 1] - V[0:n + 1 - w]) / float(w)
    return s


def _noise(x: np.ndarray, w: int) -> np.ndarray:
    """nu_i = mean of |x_j - x_{j-1}| / |x_{j-1}| over the previous (at most ``w``) pairs with
    j <= i - 1 (0 when there is none): the point-to-point relative noise before point i."""
    n = len(x)
    r = np.zeros(n)
    if n > 1:
        r[1:] = np.abs(x[1:] - x[:-1]) / np.maximum(np.abs(x[:-1]), 1e-12)
    R = np.cumsum(r)  # R[j] = r_1 + ... + r_j
    nu = np.zeros(n)
    if n > 2:
        # point i >= 2: pairs lo+1 .. hi with hi = i - 1, lo = max(hi - w, 0)
        hi = np.arange(1, n - 1)
        s = min(w, n - 2)             # hi <= w: lo = 0 (R[0] = 0)
        Rlo = np.zeros(n - 2)
        Rlo[s:] = R[1:n - 1 - s]    # hi > w: lo = hi - w = 1, 2, ...
        cnt = np.minimum(hi, w).astype(np.float64)
        nu[2:] = (R[1:n - 1] - Rlo) / cnt
    return nu


def _segments(n: int, w: int) -> list[tuple[int, int, bool]]:
    """Index ranges of the raw regime (fewer than ``w`` points) and the smoothed regime.

    Reference values (best so far) and CUSUM sums restart where smoothing starts:
    a lagging window mean must not be compared with a raw minimum.
    """
    if n < w:
        return [(0, n, False)]
    return [(0, w - 1, False), (w - 1, n, True)]


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
        idx = np.arange(len(x))
        for a, b, smoothed in _segments(len(x), w):
            seg = s[a:b]
            # noise term phased in over the first noise_min_pairs changes (weight m / 20)
            wgt = np.minimum(np.maximum(idx[a:b] - 1, 0), c.noise_min_pairs) / \
                float(c.noise_min_pairs)
            k = np.maximum(c.noise_k * nu[a:b] / (math.sqrt(w) if smoothed else 1.0) * wgt,
                           c.divergence_drift)
            ref = np.minimum.accumulate(seg)
            e = (seg - ref) / np.maximum(np.abs(ref), 1e-12)
            D = np.cumsum(e - k)
            S = D - np.minimum(np.minimum.accumulate(D), 0.0)
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


class AccuracyDrop(Detector):
    """Smoothed accuracy (as in ``Divergence``) falls more than ``t_i`` (relative) below its best.

    ``t_i = max(accuracy_drop, noise_k * nu_i / sqrt(m_i))``: ``nu_i`` is the mean
    relative point-to-point change over the previous ``smooth_window`` pairs, ``m_i``
    the number of points averaged (1 before smoothing starts). Before smoothing, ``nu_i``
    rests on ``c_i = min(i - 1, smooth_window)`` pairs and is replaced by its upper
    confidence bound ``nu_i * (1 + 1.5 / sqrt(c_i))`` (the mean of |N| over c samples has
    a relative spread of about 0.76/sqrt(c)): the thorough profile found a healthy
    1%-noise run whose low noise estimate at 30 pairs let a 5.2-sigma range fire.  Judged once
    ``noise_min_pairs`` changes have been seen.  Per-batch accuracy
    is noisy; the best of a noisy series is an extreme, so a fixed 5% would fire on
    healthy runs.  Epoch-level logs have small ``nu`` and keep the seed's 5%.
    """

    signature = "accuracy_drop"

    def _f(self, step, s, best, t, smoothed):
        what = f" (mean of the last {self.cfg.smooth_window})" if smoothed else ""
        return self.finding("warning", step, s, best * (1.0 - t),
                            f"{self.metric}{what} {_g(s)} is more than {_g(100 * t)}% below "
                            f"its best {_g(best)} (seed 000: > {_g(100 * self.cfg.accuracy_drop)}%"
                            f" drop; raised to the series' noise where larger)")

    def scan(self, view, ctx):
        c = self.cfg
        w = c.smooth_window
        s = _smoothed(view.x, w)
        nu = _noise(view.x, w)
        for a, b, smoothed in _segments(len(s), w):
            seg = s[a:b]
            best = np.maximum.accumulate(seg)
            if smoothed:
                t = np.maximum(c.noise_k * nu[a:b] / math.sqrt(w), c.accuracy_drop)
            else:  # raw points: nu rests on few pairs, take its upper confidence bound
                cnt = np.maximum(np.minimum(np.arange(a, b) - 1, w), 1).astype(np.float64)
                t = np.maximum(c.noise_k * nu[a:b] * (1.0 + 1.5 / np.sqrt(cnt)),
                               c.accuracy_drop)
            with np.errstate(divide="ignore", invalid="ignore"):
                drop = (best - seg) / best
            known = np.arange(a, b) > c.noise_min_pairs
            j = _first(known & (best > 0.0) & (drop > t))
            if j >= 0:
                return [self._f(view.step[a + j], seg[j], best[j], t[j], smoothed)]
        return []

    def stream(self):
        return _AccuracyDropState(self)


class _AccuracyDropState(_State):
    __slots__ = ("det", "sm", "nz", "best", "d", "k", "sqw", "minp")

    def __init__(self, det):
        self.det = det
        self.sm = _SmoothState(det.cfg.smooth_window)
        self.nz = _NoiseState(det.cfg.smooth_window)
        self.best = -math.inf
        self.d = det.cfg.accuracy_drop
        self.k = det.cfg.noise_k
        self.sqw = math.sqrt(det.cfg.smooth_window)
        self.minp = det.cfg.noise_min_pairs + 1
        self.done = False

    def push(self, step, x, last):
        s = self.sm.push(x)
        nu = self.nz.push(x)
        smoothing = self.sm.n >= self.sm.w
        if self.sm.n == self.sm.w:  # smoothing starts: a fresh best
            self.best = -math.inf
        if s > self.best:
            self.best = s
        best = self.best
        if smoothing:
            t = self.k * nu / self.sqw
        else:  # pairs behind nu: min(i - 1, w), at least 1 (as the vectorised driver)
            cnt = float(max(min(self.nz.i - 2, self.nz.w), 1))
            t = self.k * nu * (1.0 + 1.5 / math.sqrt(cnt))
        if t < self.d:
            t = self.d
        if self.sm.n > self.minp and best > 0.0 and (best - s) / best > t:
            self.done = True
            return [self.det._f(step, s, best, t, smoothing)]
        return None


class Plateau(Detector):
    """No point among the last ``patience`` is below (best before them) - ``min_delta``."""

    signature = "plateau"

    def _f(self, step, recent, prior):
        c = self.cfg
        return self.finding("warning", step, recent, prior - c.plateau_min_delta,
                            f"{self.metric} has not improved by more than {_g(c.plateau_min_delta)} "
                            f"for {c.plateau_patience} checks: best of them {_g(recent)}, best "
                            f"before {_g(prior)}")

    def scan(self, view, ctx):
        p = self.cfg.plateau_patience
        x = view.x
        n = len(x)
        if n <= p:
            return []
        prior = np.minimum.accumulate(x)[: n - p]                  # best of x[0 .. i-p]
        recent = np.lib.stride_tricks.sliding_window_view(x, p).min(axis=1)[1:]  # min x[i-p+1 .. i]
        j = _first(recent >= prior - self.cfg.plateau_min_delta)
        return [self._f(view.step[j + p], recent[j], prior[j])] if j >= 0 else []

    def stream(self):
        return _PlateauState(self)


class _PlateauState(_State):
    __slots__ = ("det", "buf", "prior", "p", "delta")

    def __init__(self, det):
        self.det = det
        self.buf: list[float] = []
        self.prior = math.inf
        self.p = det.cfg.plateau_patience
        self.delta = det.cfg.plateau_min_delta
        self.done = False

    def push(self, step, x, last):
        buf = self.buf
        if len(buf) == self.p:
            old = buf.pop(0)
            if old < self.prior:
                self.prior = old
        buf.append(x)
        if self.prior < math.inf:
            recent = min(buf)
            if recent >= self.prior - self.delta:
                self.done = True
                return [self.det._f(step, recent, self.prior)]
        return None


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


class EncoderShare(Detector):
    """share = ``grad_norm_encoder`` / last finite ``grad_norm`` (> 0): > high or < low."""

    def __init__(self, signature: str, metric: str, cfg: SignatureConfig, high: bool):
        super().__init__(metric, cfg)
        self.signature = signature
        self.high = high
        self.bound = cfg.encoder_share_high if high else cfg.encoder_share_low

    def _f(self, step, share):
        what = ("the encoder dominates the gradient" if self.high
                else "the encoder is starving")
        return self.finding("warning", step, share, self.bound,
                            f"encoder gradient share {_g(share)} {'>' if self.high else '<'} "
                            f"{_g(self.bound)}: {what} (seed 004)")

    def scan(self, view, ctx):
        tot, ok = ctx.last_before("grad_norm", view.pos)
        ok &= tot > 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            share = view.x / tot
        j = _first(ok & ((share > self.bound) if self.high else (share < self.bound)))
        return [self._f(view.step[j], share[j])] if j >= 0 else []

    def stream(self):
        return _EncoderShareState(self)


class _EncoderShareState(_State):
    __slots__ = ("det", "high", "bound")

    def __init__(self, det):
        self.det = det
        self.high = det.high
        self.bound = det.bound
        self.done = False

    def push(self, step, x, last):
        tot = last.get("grad_norm")
        if tot is None or not tot > 0.0:
            return None
        share = x / tot
        if (share > self.bound) if self.high else (share < self.bound):
            self.done = True
            return [self.det._f(step, share)]
        return None


# --------------------------------------------------------------------------- LM samples
@dataclass(frozen=True)
class SampleStatistics:
    """Statistics of one generated text (``sample``).

    Units are whitespace tokens; a text that is one whitespace token (``"::::"``)
    is split into characters.  ``distinct_1`` = unique units / units;
    ``seq_rep`` = 1 - unique n-grams / n-grams (Welleck et al. 2019);
    ``longest_run`` = longest run of one unit repeated back to back.
    """

    units: int
    distinct_1: float
    distinct_2: float
    seq_rep: float
    longest_run: int


def sample_statistics(text: str, *, n: int = 4) -> SampleStatistics:
    """Compute ``SampleStatistics`` of ``text`` (seq-rep over ``n``-grams)."""
    require(isinstance(text, str), "text", text, "must be a str")
    require(isinstance(n, int) and n >= 1, "n", n, "must be an integer >= 1")
    units: list[str] = text.split()
    if len(units) == 1 and len(units[0]) > 1:
        units = list(units[0])
    m = len(units)
    if m == 0:
        return SampleStatistics(0, 1.0, 1.0, 0.0, 0)
    d1 = len(set(units)) / m
    bigrams = list(zip(units, units[1:]))
    d2 = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    grams = [tuple(units[i:i + n]) for i in range(m - n + 1)]
    rep = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    run = best = 1
    for a, b in zip(units, units[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return SampleStatistics(m, d1, d2, rep, best)


class SampleDetector(Detector):
    """Mode collapse (distinct-1 <= 0.1 over >= 8 units), repetition (a run >= 3),
    seq-rep-n >= 0.44; each reported at the first sample that shows it."""

    def __init__(self, metric: str, cfg: SignatureConfig):
        super().__init__(metric, cfg)

    def _check(self, step, text) -> list[Finding]:
        c = self.cfg
        st_ = sample_statistics(text, n=c.seq_rep_n)
        out = []
        short = text if len(text) <= 40 else text[:37] + "..."
        if st_.units >= c.mode_collapse_min_units and st_.distinct_1 <= c.mode_collapse_distinct:
            out.append(self._named("mode_collapse", "critical", step, st_.distinct_1,
                                   c.mode_collapse_distinct,
                                   f"sample {short!r} is mode-collapsed: distinct-1 "
                                   f"{_g(st_.distinct_1)} <= {_g(c.mode_collapse_distinct)} over "
                                   f"{st_.units} units"))
        if st_.longest_run >= c.repetition_run:
            out.append(self._named("repetition", "warning", step, float(st_.longest_run),
                                   float(c.repetition_run),
                                   f"sample {short!r} repeats one token {st_.longest_run} times "
                                   f"in a row (>= {c.repetition_run})"))
        if st_.seq_rep >= c.seq_rep_max and st_.units > c.seq_rep_n:
            out.append(self._named("seq_repetition", "warning", step, st_.seq_rep, c.seq_rep_max,
                                   f"sample {short!r} has seq-rep-{c.seq_rep_n} "
                                   f"{_g(st_.seq_rep)} >= {_g(c.seq_rep_max)}"))
        return [f for f in out if f.signature not in c.disabled]

    def _named(self, sig, sev, step, value, thr, msg):
        return Finding(sig, self.metric, self.cfg.sev(sig, sev), _step_out(step), float(value),
                       float(thr), msg)

    def scan(self, view, ctx):
        seen: dict[tuple, Finding] = {}
        for step, text in zip(view.step, view.x):
            for f in self._check(step, text):
                seen.setdefault((f.signature, f.severity), f)
            if len(seen) == 3:
                break
        return list(seen.values())

    def stream(self):
        return _SampleState(self)


class _SampleState(_State):
    __slots__ = ("det",)

    def __init__(self, det):
        self.det = det
        self.done = False

    def push(self, step, x, last):
        return self.det._check(step, x) or None


# --------------------------------------------------------------------------- registry
def build_detectors(cfg: SignatureConfig | None = None) -> dict[str, list[Detector]]:
    """The detectors of every canonical metric under ``cfg`` (disabled ones left out).

    ``non_finite`` is handled by the drivers (it reads raw values) and is not listed.
    """
    c = cfg or SignatureConfig()
    d: dict[str, list[Detector]] = {m: [] for m in CANONICAL_METRICS}
    for m in ("loss", "val_loss"):
        d[m] += [LossSpike(m, c), LossJump(m, c), Divergence(m, c)]
        if c.vocab_size is not None:
            b = math.log(c.vocab_size)
            d[m].append(Threshold("worse_than_chance", m, c,
                                  [(b, "critical", f"ln(vocab_size={c.vocab_size}): worse than "
                                                   "uniform guessing")]))
    d["val_loss"] += [Plateau("val_loss", c), OverfitGap("val_loss", c)]
    d["grad_norm"].append(GradNormSpike("grad_norm", c))
    d["nan_batches"].append(Threshold("nan_batches", "nan_batches", c, [
        (c.nan_batches_warn, "warning", "healthy is 0-10 per epoch, seed 000"),
        (c.nan_batches_critical, "critical", "abort above 50 per epoch, seed 000")]))
    d["lora_norm"].append(Threshold("lora_norm", "lora_norm", c, [
        (c.lora_norm_warn, "warning", "warn threshold, seed 000"),
        (c.lora_norm_critical, "critical", "critical threshold, seed 000")]))
    d["lora_norm"].append(Threshold("lora_norm_kill", "lora_norm", c, [
        (c.lora_norm_kill, "critical", "kill threshold: stop training, seed 000")]))
    d["entropy"].append(Threshold("entropy_spike", "entropy", c, [
        (c.entropy_max, "critical", "collapse, seed 000")], healthy=c.entropy_healthy))
    d["attention_sharpness"].append(Threshold("attention_collapse", "attention_sharpness", c, [
        (c.attention_min, "critical", "collapse, seed 000")], above=False,
        healthy=c.attention_healthy))
    for m in ("accuracy", "val_accuracy"):
        d[m].append(AccuracyDrop(m, c))
    d["bg_fraction"].append(BackgroundCollapse("bg_fraction", c))
    d["sample"].append(SampleDetector("sample", c))
    d["z_e_step_change"].append(Threshold("z_e_step_change", "z_e_step_change", c, [
        (c.z_e_step_change_max, "warning", "bad: the decoder cannot adapt, seed 004")]))
    d["z_e_step_change_pct"].append(Threshold("z_e_step_change", "z_e_step_change_pct", c, [
        (c.z_e_step_change_pct_max, "warning", "bad: > 20% per step, seed 004")]))
    d["grad_norm_encoder"] += [EncoderShare("encoder_grad_share", "grad_norm_encoder", c, True),
                               EncoderShare("encoder_starving", "grad_norm_encoder", c, False)]
    for m in d:
        d[m] = [det for det in d[m]
                if isinstance(det, SampleDetector) or det.signature not in c.disabled]
    return d


def _dedupe(findings: Iterable[Finding]) -> list[Finding]:
    first: dict[tuple, Finding] = {}
    for f in sorted(findings, key=Finding.sort_key):
        first.setdefault((f.signature, f.metric, f.severity), f)
    return sorted(first.values(), key=Finding.sort_key)


# --------------------------------------------------------------------------- drivers
def _check_metric(name: str) -> None:
    if name not in CANONICAL_METRICS:
        raise InvalidArgumentError(
            f"metric={name!r}: unknown metric; canonical names are {', '.join(CANONICAL_METRICS)} "
            "(map other names to these)")


class StreamingScanner:
    """Streaming driver: ``update(step, metrics)`` -> new findings.  Constant memory per metric.

    Steps must be non-decreasing.  ``metrics`` maps canonical names to numbers
    (NaN/Inf/None allowed: reported by ``non_finite``) or, for ``sample``, text.
    """

    def __init__(self, config: SignatureConfig | None = None):
        self.config = config or SignatureConfig()
        self._dets = build_detectors(self.config)
        self._states: dict[str, list] = {}
        self._last: dict[str, float] = {}
        self._nonfinite_done: set[str] = set()
        self._check_nonfinite = "non_finite" not in self.config.disabled
        self._seen: set[tuple] = set()
        self._step = -math.inf
        self._loss_smoother = _SmoothState(self.config.smooth_window, expanding=True)
        self.findings: list[Finding] = []

    def _states_for(self, metric: str) -> list:
        _check_metric(metric)
        states = self._states[metric] = [d.stream() for d in self._dets[metric]]
        return states

    def update(self, step: float, metrics: Mapping[str, Any]) -> list[Finding]:
        if step.__class__ is not int and step.__class__ is not float:
            require(not isinstance(step, (bool, str, bytes)) and hasattr(step, "__float__"),
                    "step", step, "must be a number")
            step = float(step)  # numpy scalars, 0-d tensors
        require(step >= self._step, "step", step,
                f"must be non-decreasing (previous step was {self._step}); finite")
        require(step < math.inf, "step", step, "must be finite")
        self._step = step
        last = self._last
        vals = []
        out: list[Finding] = []
        for name, raw in metrics.items():
            if name == "sample":
                if raw is None:
                    continue
                require(isinstance(raw, str), "metrics['sample']", raw, "must be a str")
                vals.append((name, raw))
                continue
            if raw is None:
                x = math.nan
            elif raw.__class__ is float:
                x = raw
            else:
                try:
                    if isinstance(raw, (bool, str, bytes)) and not (
                            isinstance(raw, str) and raw.strip().lower() in _NONFINITE_TEXT):
                        raise TypeError
                    x = float(raw)
                except (TypeError, ValueError):
                    _check_metric(name)
                    raise InvalidArgumentError(
                        f"metrics[{name!r}]={raw!r}: must be a number (or NaN/Inf/None)") from None
            if x - x == 0.0:
                last[name] = x
                if name == "loss":
                    last[SMOOTHED_LOSS] = self._loss_smoother.push(x)
                vals.append((name, x))
            else:
                if name not in self._states:
                    self._states_for(name)
                if self._check_nonfinite and name not in self._nonfinite_done:
                    self._nonfinite_done.add(name)
                    self._emit([NonFinite(name, self.config)._f(step, x)], out)
        new: list[Finding] = []
        for name, x in vals:
            states = self._states.get(name)
            if states is None:
                states = self._states_for(name)
            fired = False
            for st_ in states:
                r = st_.push(step, x, last)
                if r:
                    new += r
                if st_.done:
                    fired = True
            if fired:
                self._states[name] = [s for s in states if not s.done]
        if new:
            return self._emit(new, out)
        return out

    def _emit(self, found: list[Finding], out: list[Finding]) -> list[Finding]:
        for f in _dedupe(found):
            key = (f.signature, f.metric, f.severity)
            if key not in self._seen:
                self._seen.add(key)
                self.findings.append(f)
                out.append(f)
        return out


class VectorisedScanner:
    """Vectorised driver: the same detectors over whole series (numpy)."""

    def __init__(self, config: SignatureConfig | None = None):
        self.config = config or SignatureConfig()
        self._dets = build_detectors(self.config)

    def scan(self, raw: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[Finding]:
        """``raw[metric] = (pos, step, values)``: record ordinals (non-decreasing), steps, values
        (float64 with NaN/Inf, or an object array of str for ``sample``)."""
        views: dict[str, _View] = {}
        found: list[Finding] = []
        for name, (pos, step, values) in raw.items():
            _check_metric(name)
            pos = np.asarray(pos, dtype=np.int64)
            step = np.asarray(step, dtype=np.float64)
            if name in TEXT_METRICS:
                views[name] = _View(np.asarray(values, dtype=object), step, pos)
                continue
            values = np.asarray(values, dtype=np.float64)
            fin = np.isfinite(values)
            if not fin.all():
                if "non_finite" not in self.config.disabled:
                    found += NonFinite(name, self.config).scan_raw(values, step)
                views[name] = _View(values[fin], step[fin], pos[fin])
            else:
                views[name] = _View(values, step, pos)
        lv = views.get("loss")
        if lv is not None and len(lv.x):
            views[SMOOTHED_LOSS] = _View(_smoothed(lv.x, self.config.smooth_window, expanding=True),
                                         lv.step, lv.pos)
        ctx = _Context(views)
        for name, view in list(views.items()):
            if name == SMOOTHED_LOSS:
                continue
            if len(view.x) == 0:
                continue
            for det in self._dets[name]:
                found += det.scan(view, ctx)
        return _dedupe(found)


def scan_series(series: Mapping[str, tuple[Sequence[float], Sequence[Any]]],
                config: SignatureConfig | None = None) -> list[Finding]:
    """Vectorised scan of ``{metric: (steps, values)}``; points at one step form one record.

    Each metric's steps must be non-decreasing.  Returns findings sorted by step.
    """
    raw = {}
    all_steps = []
    for name, (steps, values) in series.items():
        s = np.asarray(steps, dtype=np.float64)
        require(s.ndim == 1 and len(s) == len(values), f"series[{name!r}]", (len(s), len(values)),
                "steps and values must be 1-D and of equal length")
        require(bool(np.all(np.isfinite(s))), f"series[{name!r}] steps", s, "must be finite")
        require(bool(np.all(np.diff(s) >= 0)), f"series[{name!r}] steps", s,
                "must be non-decreasing")
        all_steps.append(s)
    uniq = np.unique(np.concatenate(all_steps)) if all_steps else np.zeros(0)
    for (name, (steps, values)), s in zip(series.items(), all_steps):
        raw[name] = (np.searchsorted(uniq, s), s, values)
    return VectorisedScanner(config).scan(raw)


def scan_records(records: Iterable[tuple[float, Mapping[str, Any]]],
                 config: SignatureConfig | None = None) -> list[Finding]:
    """Vectorised scan of ``(step, {metric: value})`` records in order (steps non-decreasing)."""
    cols: dict[str, tuple[list, list, list]] = {}
    prev = -math.inf
    for i, (step, metrics) in enumerate(records):
        step = float(step)
        require(math.isfinite(step) and step >= prev, f"records[{i}].step", step,
                f"must be finite and non-decreasing (previous {prev})")
        prev = step
        for name, v in metrics.items():
            if name == "sample" and v is None:
                continue
            c = cols.get(name)
            if c is None:
                _check_metric(name)
                c = cols[name] = ([], [], [])
            c[0].append(i)
            c[1].append(step)
            c[2].append(v if name == "sample" else (math.nan if v is None else float(v)))
    return VectorisedScanner(config).scan(cols)


# --------------------------------------------------------------------------- strategies
@st.composite
def _series(draw, metrics, min_points, max_points, nan_rate):
    n = draw(st.integers(min_points, max_points))
    gaps = draw(st.lists(st.sampled_from([1, 1, 1, 2, 10, 37]), min_size=n, max_size=n))
    steps = np.cumsum(gaps).astype(np.float64)
    out = {}
    for m in metrics:
        kind = draw(st.sampled_from(["decay", "flat", "spike", "rise", "plateau", "constant"]))
        base = draw(st.sampled_from([1e-3, 0.05, 0.5, 1.0, 3.0, 1e3]))
        noise = draw(st.sampled_from([0.0, 0.01, 0.03, 0.3]))
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        t = np.arange(n, dtype=np.float64)
        y = base * (1.0 + np.exp(-t / max(n / 4, 1)))
        if kind == "flat" or kind == "constant":
            y = np.full(n, base)
        elif kind == "rise":
            y = base * (1.0 + np.maximum(t - n / 2, 0) / max(n / 8, 1))
        elif kind == "plateau":
            y = np.where(t < n / 3, base * (2 - t / n), base * (2 - 1 / 3))
        if kind != "constant":
            y = y * (1.0 + noise * rng.standard_normal(n))
        if kind == "spike" and n > 2:
            k = draw(st.integers(1, n - 1))
            y[k] *= draw(st.sampled_from([1.5, 3.0, 50.0]))
        present = rng.random(n) < draw(st.sampled_from([1.0, 0.7, 0.3]))
        present[0] = present[0] or kind == "constant"
        nan_mask = rng.random(n) < nan_rate
        y = np.where(nan_mask, rng.choice([np.nan, np.inf, -np.inf], n), y)
        if m in ("bg_fraction", "target_bg_fraction", "accuracy", "val_accuracy"):
            y = np.clip(y / (2 * base), 0.0, 1.0) if draw(st.booleans()) else np.where(
                np.isfinite(y), draw(st.sampled_from([0.0, 0.005, 0.5, 0.995, 1.0])), y)
        out[m] = (steps[present], y[present])
    return out


def metric_series(*, metrics: Sequence[str] | st.SearchStrategy = st.sets(
                      st.sampled_from(NUMERIC_METRICS), min_size=1, max_size=5),
                  min_points: int = 1, max_points: int = 80,
                  nan_rate: float = 0.05) -> st.SearchStrategy[dict]:
    """``{metric: (steps, values)}`` dicts: decays, plateaus, spikes, rises, constants,
    several magnitudes and noise levels, sparse and uneven steps, NaN/±Inf sprinkled in.

    Args:
      metrics: names or a strategy of sets of names (canonical numeric metrics).
      min_points, max_points: bounds on the number of steps (each metric keeps a subset).
      nan_rate: probability that a point is non-finite.
    """
    require(isinstance(min_points, int) and min_points >= 1, "min_points", min_points,
            "must be an integer >= 1")
    if max_points < min_points:
        raise InvalidArgumentError(f"Cannot have max_points={max_points} < min_points={min_points}")
    require(0.0 <= nan_rate <= 1.0, "nan_rate", nan_rate, "must lie in [0, 1]")
    if not isinstance(metrics, st.SearchStrategy):
        metrics = tuple(metrics)
        for m in metrics:
            require(m in NUMERIC_METRICS, "metrics", m, "must be canonical numeric metric names")
        metrics = st.just(metrics)
    return metrics.flatmap(lambda ms: _series(tuple(sorted(ms)), min_points, max_points, nan_rate))
