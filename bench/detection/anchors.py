"""Owns the anchor rules: faithful re-implementations (from their public descriptions and
sources, no code copied) of what the tools people leave switched on would have said on
a logged run, plus the naive rules.  Each rule reads the logged points in order and
returns ``(index, severity)`` of every alarm it raises (first alarm is what scoring
uses).  Severity is what the tool does: ``critical`` where it stops the run, ``warning``
where it only skips or clips a step.

- ``lightning_spike``: Lightning ``SpikeDetection`` (window 10, warmup 1, rtol 2.0,
  atol None, finite_only): a non-finite loss is a spike; a loss that did not improve on
  the previous one is a spike when ``|x - mean| >= 2 * mean`` of the running mean of the
  last 10 finite losses.  Raises ``TrainingSpikeException``: critical.
- ``llmfoundry_kill_loss_spike``: llm-foundry ``KillLossSpike`` (window 100, patience 4,
  outlier_multiplier 2, loss_cap 10): once 100 losses are in the window, a loss >= 2x
  their mean is an outlier; more than 4 consecutive outliers stop the run; else, from
  step 200 on, half the window above the cap stops it (high-loss rule).  Critical.
- ``olmo_core_skip_step``: OLMo-core ``SkipStepOptimizer`` (rolling 128, sigma 6): once
  64 finite values are in the window, a loss or grad norm above mean + 6 sigma of the
  window skips the step; non-finite values never enter the window.  Warning.
- ``zclip``: ZClip on the grad norm (alpha 0.97, z 2.5, 25 warm-up steps): EMA mean and
  variance, z = (g - mu) / sigma > 2.5 clips.  Warning.
- ``megatron_spiky_loss``: Megatron-LM's rerun state machine: a loss above 10x the
  largest loss seen so far is a spiky loss (and NaN/Inf is an error).  Critical.
- naive: ``naive_nan`` (any non-finite loss or grad norm), ``naive_jump_1.5x`` (loss >
  1.5x the previous), ``naive_2x_min`` (loss > 2x the lowest so far).  Critical.
"""
from __future__ import annotations

import math

import numpy as np

Alarms = list  # [(index, severity)]


def _loss(log):
    return log["loss"][1]


def _nonfinite_first(v: np.ndarray) -> int:
    bad = np.flatnonzero(~np.isfinite(v))
    return int(bad[0]) if len(bad) else -1


def lightning_spike(log, window: int = 10, rtol: float = 2.0, warmup: int = 1) -> Alarms:
    x = _loss(log)
    win: list[float] = []
    last = 0.0
    for i, v in enumerate(x.tolist()):
        if i >= warmup:
            if not math.isfinite(v):
                return [(i, "critical")]
            mean = sum(win) / len(win) if win else math.nan
            if not v - last <= 0.0 and abs(v - mean) >= abs(rtol * mean):
                return [(i, "critical")]
        if math.isfinite(v):
            win.append(v)
            if len(win) > window:
                win.pop(0)
            last = v
    return []


def llmfoundry_kill_loss_spike(log, window: int = 100, patience: int = 4,
                               multiplier: float = 2.0, cap: float = 10.0) -> Alarms:
    x = _loss(log)
    win: list[float] = []
    total = 0.0
    outliers = 0
    for i, v in enumerate(x.tolist()):
        if len(win) == window:
            mean = total / window
            if v >= mean * multiplier or not math.isfinite(v):
                outliers += 1
                if outliers > patience:
                    return [(i, "critical")]
            else:
                outliers = 0
                if i >= 2 * window and sum(1 for u in win if u > cap) >= window / 2:
                    return [(i, "critical")]
        win.append(v)
        total += v
        if len(win) > window:
            total -= win.pop(0)
        if not math.isfinite(total):
            total = sum(win)
    return []


def _rolling_sigma_alarm(v: np.ndarray, window: int, sigma: float, min_count: int) -> int:
    fin = np.isfinite(v)
    win: list[float] = []
    for i, (u, ok) in enumerate(zip(v.tolist(), fin.tolist())):
        if ok and len(win) >= min_count:
            a = np.asarray(win)
            if u > a.mean() + sigma * a.std():
                return i
        if ok:
            win.append(u)
            if len(win) > window:
                win.pop(0)
    return -1


def olmo_core_skip_step(log, window: int = 128, sigma: float = 6.0) -> Alarms:
    hits = [j for j in (_rolling_sigma_alarm(_loss(log), window, sigma, window // 2),
                        _rolling_sigma_alarm(log["grad_norm"][1], window, sigma, window // 2))
            if j >= 0]
    return [(min(hits), "warning")] if hits else []


def zclip(log, alpha: float = 0.97, z: float = 2.5, warmup: int = 25) -> Alarms:
    g = log["grad_norm"][1]
    fin = g[np.isfinite(g)]
    idx = np.flatnonzero(np.isfinite(g))
    if len(fin) <= warmup:
        return []
    mu = fin[:warmup].mean()
    var = fin[:warmup].var()
    for j in range(warmup, len(fin)):
        x = fin[j]
        sd = math.sqrt(var)
        if sd > 0 and (x - mu) / sd > z:
            return [(int(idx[j]), "warning")]
        mu = alpha * mu + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mu) ** 2
    return []


def megatron_spiky_loss(log, factor: float = 10.0) -> Alarms:
    x = _loss(log)
    top = -math.inf
    for i, v in enumerate(x.tolist()):
        if not math.isfinite(v) or (top > 0 and v > factor * top):
            return [(i, "critical")]
        top = max(top, v)
    return []


def naive_nan(log) -> Alarms:
    js = [j for j in (_nonfinite_first(_loss(log)), _nonfinite_first(log["grad_norm"][1]))
          if j >= 0]
    return [(min(js), "critical")] if js else []


def naive_jump(log, ratio: float = 1.5) -> Alarms:
    x = _loss(log)
    ok = np.isfinite(x[1:]) & np.isfinite(x[:-1])
    hit = np.flatnonzero((~np.isfinite(x[1:])) | (ok & (x[1:] > ratio * x[:-1])))
    return [(int(hit[0]) + 1, "critical")] if len(hit) else []


def naive_2x_min(log, ratio: float = 2.0) -> Alarms:
    x = _loss(log)
    lo = np.minimum.accumulate(np.where(np.isfinite(x), x, np.inf))
    hit = np.flatnonzero(~np.isfinite(x) | (x[1:].size and np.concatenate(
        ([False], x[1:] > ratio * lo[:-1]))))
    return [(int(hit[0]), "critical")] if len(hit) else []


ANCHORS = {
    "lightning_spike_detection": lightning_spike,
    "llmfoundry_kill_loss_spike": llmfoundry_kill_loss_spike,
    "olmo_core_skip_step": olmo_core_skip_step,
    "zclip": zclip,
    "megatron_spiky_loss": megatron_spiky_loss,
    "naive_nan": naive_nan,
    "naive_jump_1.5x": naive_jump,
    "naive_2x_min": naive_2x_min,
}
