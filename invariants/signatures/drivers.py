"""Owns the two drivers of the detectors and the registry that builds them:
``build_detectors`` (which rule reads which metric), ``StreamingScanner``
(``update(step, metrics)``, constant memory per metric; ``CollapseGuard`` wraps
it) and ``VectorisedScanner`` / ``scan_series`` / ``scan_records`` (whole series;
``invariants scan`` uses them).  Both give the same findings on the same data.

A finding is reported once per (signature, metric, severity), at the first step
it was detectable.  When it later recovers, the streaming driver replaces it in
``findings`` by the same finding with ``recovered_step`` set (``update`` does not
return it again): at the end both drivers hold the same findings.  Non-finite
observations are reported by ``non_finite`` and skipped by every other detector.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from invariants._errors import InvalidArgumentError
from invariants._validate import require
from invariants.signatures.config import (CANONICAL_METRICS, LOSS_COUNT, SMOOTHED_LOSS,
                                          TEXT_METRICS, SignatureConfig)
from invariants.signatures.detectors.accuracy import AccuracyDrop
from invariants.signatures.detectors.background import BackgroundCollapse
from invariants.signatures.detectors.base import (Detector, _Context, _smoothed, _SmoothState,
                                                  _View)
from invariants.signatures.detectors.encoder import EncoderShare
from invariants.signatures.detectors.grad_norm import GradNormSpike
from invariants.signatures.detectors.loss import Divergence, LossJump, LossSpike
from invariants.signatures.detectors.overfit import OverfitGap
from invariants.signatures.detectors.plateau import Plateau
from invariants.signatures.detectors.samples import SampleDetector
from invariants.signatures.detectors.threshold import NonFinite, Threshold
from invariants.signatures.findings import Finding

_NONFINITE_TEXT = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
                   "-infinity"}


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
                    last[LOSS_COUNT] = last.get(LOSS_COUNT, 0) + 1
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
            elif f.recovered_step is not None:  # a reported finding has recovered: update it
                for j, g in enumerate(self.findings):
                    if (g.signature, g.metric, g.severity) == key and g.recovered_step is None \
                            and g.step == f.step:
                        self.findings[j] = f
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
