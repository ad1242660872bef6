"""Signature scan throughput (issue 7).

- vectorised scan of a 1,000,000-step log with 5 metrics (budget < 2 s);
- the same detectors written plainly with pandas rolling windows, same data, same run
  (reported with the ratio; pandas is the ``bench`` extra, never a runtime dependency);
- ``CollapseGuard.update`` with 5 metrics (budget < 20 us per update).

The log is healthy (no detector fires), so every detector runs over the whole series
and the streaming guard keeps all its detectors active: the worst case for both.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np

from bench import Result, best_of, under
from invariants import CollapseGuard, SignatureConfig, VectorisedScanner

N = 1_000_000
METRICS = ("loss", "grad_norm", "accuracy", "lora_norm", "entropy")


def _log(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64) / n
    decay = np.exp(-t / 0.3)
    return {
        "loss": (0.2 + 2.0 * decay) * (1.0 + 0.02 * rng.standard_normal(n)),
        "grad_norm": (0.5 + 2.0 * decay) * (1.0 + 0.02 * rng.standard_normal(n)),
        "accuracy": np.clip((0.9 - 0.6 * decay) * (1.0 + 0.01 * rng.standard_normal(n)), 0, 1),
        "lora_norm": 0.3 + 0.5 * (1.0 - decay),
        "entropy": (0.1 + 0.3 * decay) * (1.0 + 0.02 * rng.standard_normal(n)),
    }


def _pandas_scan(data: dict[str, np.ndarray], cfg: SignatureConfig) -> dict[str, int]:
    """The same rules, written the obvious way with pandas; returns first-detection indices."""
    import pandas as pd

    first = {}

    def hit(name, mask):
        idx = np.flatnonzero(mask.to_numpy() if hasattr(mask, "to_numpy") else mask)
        first[name] = int(idx[0]) if len(idx) else -1

    loss = pd.Series(data["loss"])
    prev = loss.shift(1)
    mu = prev.rolling(cfg.spike_window, min_periods=cfg.spike_min_periods).mean()
    sd = prev.rolling(cfg.spike_window, min_periods=cfg.spike_min_periods).std(ddof=0)
    sd = np.maximum(sd, cfg.spike_sigma_floor * mu.abs())
    hit("loss_spike", loss >= mu + cfg.spike_k * sd)
    hit("loss_jump", (prev > 0) & (loss > cfg.jump_ratio * prev))
    w = cfg.smooth_window
    s = loss.rolling(w).mean().fillna(loss)
    ref = s.cummin()
    e = (s - ref) / ref.abs().clip(lower=1e-12)
    nu = (loss.diff().abs() / loss.shift(1).abs()).shift(1).rolling(w, min_periods=1).mean()
    phase_in = np.minimum(np.maximum(np.arange(len(loss)) - 1, 0), cfg.noise_min_pairs) \
        / cfg.noise_min_pairs
    k = np.maximum(cfg.divergence_drift, cfg.noise_k * nu / math.sqrt(w) * phase_in)
    d = (e - k).cumsum()
    hit("divergence", (d - np.minimum(d.cummin(), 0.0)) > cfg.divergence_h)
    g = pd.Series(data["grad_norm"])
    ema = g.ewm(alpha=1 - cfg.zclip_alpha, adjust=False).mean()
    var = ((g - ema) ** 2).ewm(alpha=1 - cfg.zclip_alpha, adjust=False).mean()
    thr = ema.shift(1) + cfg.zclip_z * np.maximum(np.sqrt(var.shift(1)),
                                                 cfg.zclip_sigma_floor * ema.shift(1).abs())
    med = g.shift(1).rolling(cfg.zclip_local_points, min_periods=1).median()
    nu_g = (g.diff().abs() / g.shift(1).abs()).shift(1).rolling(w, min_periods=1).mean()
    local = (g - med) > cfg.noise_k * nu_g * med.abs()
    hit("grad_norm_spike", (g.index >= cfg.zclip_warmup) & (g > thr) & local)
    acc = pd.Series(data["accuracy"])
    sa = acc.rolling(w).mean().fillna(acc)
    best = sa.cummax()
    hit("accuracy_drop", (best - sa) / best > cfg.accuracy_drop)
    lora = pd.Series(data["lora_norm"])
    hit("lora_norm_warn", lora > cfg.lora_norm_warn)
    hit("lora_norm_critical", lora > cfg.lora_norm_critical)
    hit("lora_norm_kill", lora > cfg.lora_norm_kill)
    ent = pd.Series(data["entropy"])
    was_healthy = (ent < cfg.entropy_healthy).shift(1, fill_value=False).cummax()
    hit("entropy_spike", (ent > cfg.entropy_max) & was_healthy)
    for m, v in data.items():
        hit(f"non_finite/{m}", ~np.isfinite(v))
    return first


def run() -> list[Result]:
    cfg = SignatureConfig()
    data = _log(N)
    steps = np.arange(N, dtype=np.float64)
    pos = np.arange(N, dtype=np.int64)
    raw = {m: (pos, steps, data[m]) for m in METRICS}
    scanner = VectorisedScanner(cfg)
    found = scanner.scan(raw)
    assert found == [], f"the benchmark log must be healthy, got {found}"
    t_vec = best_of(lambda: scanner.scan(raw), repeat=3)
    out = [under(f"scan: vectorised, {N:,} steps x 5 metrics", t_vec, "s", 2.0,
                 "VectorisedScanner.scan on in-memory series")]
    try:
        import pandas  # noqa: F401
        fired = {k: v for k, v in _pandas_scan(data, cfg).items() if v >= 0}
        assert not fired, f"the pandas baseline must agree that the log is healthy: {fired}"
        t_pd = best_of(lambda: _pandas_scan(data, cfg), repeat=3)
        out.append(under("scan: pandas rolling-window baseline, same detectors", t_pd, "s", None))
        out.append(under("scan: pandas time / vectorised time", t_pd / t_vec, "x", None,
                         "> 1 means the vectorised driver is faster"))
    except ImportError:  # pragma: no cover
        out.append(Result("scan: pandas baseline", math.nan, "s", None, None, "pandas not installed"))

    import json
    import os
    import tempfile
    from invariants import scan_file
    n_file = 100_000
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "log.jsonl")
        with open(path, "w") as fh:
            for i in range(n_file):
                fh.write(json.dumps({"step": i, **{m: float(data[m][i]) for m in METRICS}}) + "\n")
        t_file = best_of(lambda: scan_file(path), repeat=1)
    out.append(under(f"scan: JSONL file end to end, {n_file:,} lines x 5 metrics", t_file, "s", None,
                     "parse + scan; json decoding dominates"))

    n_upd = 100_000
    records = [{m: float(data[m][i]) for m in METRICS} for i in range(n_upd)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy log must not warn

        def guard_run():
            g = CollapseGuard(cfg)
            upd = g.update
            for i, r in enumerate(records):
                upd(i, r)
        t_g = best_of(guard_run, repeat=3) / n_upd
    out.append(under("guard: CollapseGuard.update, 5 metrics", t_g * 1e6, "us", 20.0,
                     f"mean over {n_upd:,} healthy steps, all detectors active"))
    return out


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    for r in run():
        print(r)
    print(f"{time.perf_counter() - start:.1f}s")
