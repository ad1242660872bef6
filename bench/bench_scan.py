"""Signature scan throughput (issues 7 and 18).

- vectorised scan of a 1,000,000-step log with 5 metrics (budget < 2 s);
- ``invariants scan`` end to end (read + scan, ``scan_file``) of JSONL, CSV and
  TensorBoard logs of 10^5 and 10^6 records x 5 metrics, each in a fresh process that
  also reports its peak RSS over its baseline (budgets: 10^6 JSONL <= 1 s; memory
  <= ``mem_budget_mb``: 64 bytes a value, the bound docs/signatures.md states).
  TensorBoard runs at 10^5 only by default (writing 5x10^6 events takes minutes);
  ``BENCH_SCAN_LINES=100000,1000000,10000000`` (or ``--lines``) picks the sizes and
  ``BENCH_SCAN_FORMATS=jsonl,csv`` (or ``--formats``) the formats;
- the same detectors written plainly with pandas rolling windows, same data, same run
  (reported with the ratio; pandas is the ``bench`` extra, never a runtime dependency);
- ``CollapseGuard.update`` with 5 metrics (budget < 20 us per update).

The log is healthy (no detector fires), so every detector runs over the whole series
and the streaming guard keeps all its detectors active: the worst case for both.
"""
from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np

from bench import Result, best_of, row, under
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
    p, r, w = cfg.spike_min_periods, cfg.level_window, cfg.smooth_window
    level = loss.rolling(r, min_periods=1).median()      # the ladder's level (pandas: mean
    lv = level.shift(1)                                  # of the two middles while even)
    top = prev.rolling(cfg.spike_window, min_periods=1).max()
    spread = np.maximum(top - lv, cfg.spike_sigma_floor * lv.abs())
    hit("loss_spike", (loss.index >= p) & (loss > lv + cfg.spike_k * spread))
    hit("loss_jump", (loss.index < p) & (lv > 0) & (loss > cfg.jump_ratio * lv))
    idx = np.arange(len(loss))
    a = loss.diff().abs().shift(1).rolling(w, min_periods=1).mean().fillna(0.0)
    pairs = np.maximum(np.minimum(idx - 1, w), 1)
    sd = np.maximum(a * (1.0 + 1.5 / np.sqrt(pairs)) / np.sqrt(np.minimum(idx + 1, r)), 1e-300)
    ref = level.cummin()
    q = (idx + 1) // r
    bias = np.sqrt(2 * math.log(2) * np.floor(np.log2(np.maximum(q, 1))))
    d = ((level - ref) / sd - bias - cfg.divergence_k).cumsum()
    cus = d - np.minimum(d.cummin(), 0.0)
    flag = (cus > cfg.divergence_h) & ((level - ref) / ref.abs().clip(lower=1e-12)
                                      > cfg.divergence_drift)
    hit("divergence", flag)
    streak = flag.groupby((~flag).cumsum()).cumsum()   # consecutive flagged points
    hit("divergence_critical", (streak >= cfg.divergence_persist)
        & (loss.index >= cfg.warmup_points))
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
    # the floor: one plain numpy pass over the same arrays (a cumulative sum reads and writes
    # each value once, as every rolling-window rule must at least)
    t_floor = best_of(lambda: [np.cumsum(data[m]) for m in METRICS], repeat=5)
    out.append(under("floor: one numpy pass (cumsum) over the same 5 arrays", t_floor, "s", None))
    out.append(under("scan: vectorised time / numpy floor", t_vec / t_floor, "x", 10.0,
                     "issue 18: the detector set within 10x of one pass over memory"))
    try:
        import pandas  # noqa: F401
        fired = {k: v for k, v in _pandas_scan(data, cfg).items() if v >= 0}
        assert not fired, f"the pandas baseline must agree that the log is healthy: {fired}"
        t_pd = best_of(lambda: _pandas_scan(data, cfg), repeat=3)
        out.append(under("scan: pandas rolling-window baseline, same detectors", t_pd, "s", None))
        ratio = t_pd / t_vec
        out.append(Result("scan: pandas time / vectorised time", ratio, "x", 10.0, ratio >= 10.0,
                          "issue 18: at least 10x faster than pandas (a lower bound: >= budget)"))
    except ImportError:  # pragma: no cover
        out.append(Result("scan: pandas baseline", math.nan, "s", None, None, "pandas not installed"))

    out += file_figures()

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


_PROBE = """
import json, resource, sys, time
from invariants.signatures.logs import scan_file
import pyarrow.json, pyarrow.csv  # noqa: F401  (the readers import them lazily)
def status(key):
    return next(int(ln.split()[1]) for ln in open("/proc/self/status")
                if ln.startswith(key)) / 1024
base = status("VmRSS")  # resident now, after the imports
try:  # reset the high-water mark so the imports' own peak does not count
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    peak = lambda: status("VmHWM")
except OSError:  # pragma: no cover - an overestimate: includes the imports' peak
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t, c = time.perf_counter(), time.process_time()
data, found = scan_file(sys.argv[1])
dt, dc = time.perf_counter() - t, time.process_time() - c
assert found == [], found
mem = peak()
floor = None
if sys.argv[1].endswith((".jsonl", ".csv")):  # the parser alone, on the reader's blocks
    import io
    from invariants.signatures.readers.stream import CHUNK_BYTES
    raw = open(sys.argv[1], "rb").read()
    if sys.argv[1].endswith(".csv"):
        end = raw.index(b"\\n") + 1
        names = raw[:end].decode().strip().split(",")
        opts = pyarrow.csv.ReadOptions(column_names=names, block_size=1 << 20)
        read = lambda b: pyarrow.csv.read_csv(io.BytesIO(b), read_options=opts)
        i = end
    else:
        opts = pyarrow.json.ReadOptions(block_size=1 << 20)
        read = lambda b: pyarrow.json.read_json(io.BytesIO(b), read_options=opts)
        i = 0
    t = time.perf_counter()
    while i < len(raw):
        j = raw.find(b"\\n", i + CHUNK_BYTES)
        j = len(raw) if j < 0 else j + 1
        read(raw[i:j])
        i = j
    floor = time.perf_counter() - t
print(json.dumps({"seconds": dt, "cpu": dc, "records": data.records, "base_mb": base,
                  "peak_mb": mem, "parse_floor": floor}))
"""


def _write_jsonl(path: str, n: int) -> None:
    data = _log(n)
    with open(path, "w") as fh:
        for s in range(0, n, 100_000):
            rows = zip(range(s, min(n, s + 100_000)), *(data[m][s:s + 100_000].tolist()
                                                         for m in METRICS))
            fh.write("".join('{"step": %d, "loss": %r, "grad_norm": %r, "accuracy": %r, '
                             '"lora_norm": %r, "entropy": %r}\n' % r for r in rows))


def _write_csv(path: str, n: int) -> None:
    data = _log(n)
    with open(path, "w") as fh:
        fh.write("step," + ",".join(METRICS) + "\n")
        for s in range(0, n, 100_000):
            rows = zip(range(s, min(n, s + 100_000)), *(data[m][s:s + 100_000].tolist()
                                                         for m in METRICS))
            fh.write("".join("%d,%r,%r,%r,%r,%r\n" % r for r in rows))


def _write_tensorboard(path: str, n: int) -> None:
    from torch.utils.tensorboard import SummaryWriter
    data = _log(n)
    w = SummaryWriter(path, max_queue=100_000, flush_secs=3600)
    cols = [data[m].tolist() for m in METRICS]
    for i in range(n):
        for m, c in zip(METRICS, cols):
            w.add_scalar(m, c[i], i)
    w.close()


def mem_budget_mb(n: int) -> float:
    """The stated bound: 64 bytes per value (5 metrics; 8 kept, the rest the detectors'
    working arrays), plus 16 parse blocks (64 MB: the block, its carry, the Arrow table
    and what Arrow's allocator keeps)."""
    from invariants.signatures.readers.stream import CHUNK_BYTES
    return 64 * 5 * n / 2**20 + 16 * CHUNK_BYTES / 2**20


def _sizes() -> list[int]:
    raw = os.environ.get("BENCH_SCAN_LINES", "100000,1000000")
    return [int(float(x)) for x in raw.split(",") if x.strip()]


def file_figures(sizes: list[int] | None = None) -> list[Result]:
    import json
    import subprocess
    import sys
    import tempfile
    out = []
    writers = {"jsonl": _write_jsonl, "csv": _write_csv, "tensorboard": _write_tensorboard}
    formats = os.environ.get("BENCH_SCAN_FORMATS", ",".join(writers)).split(",")
    for n in sizes or _sizes():
        for fmt, write in writers.items():
            if fmt not in formats or (fmt == "tensorboard" and n > 100_000
                                      and "BENCH_SCAN_LINES" not in os.environ):
                continue
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "run" if fmt == "tensorboard" else f"log.{fmt}")
                write(path, n)
                proc = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True,
                                      text=True, check=True)
            r = json.loads(proc.stdout)
            budget = 1.0 if (fmt == "jsonl" and n == 1_000_000) else None
            out.append(under(f"scan: {fmt} end to end, {n:,} records x 5 metrics", r["seconds"],
                             "s", budget, f"read + detectors, fresh process; CPU time {r['cpu']:.3g} s"))
            if r.get("parse_floor") is not None:
                out.append(under(f"floor: pyarrow parses the {fmt} blocks alone, {n:,} records",
                                 r["parse_floor"], "s", None,
                                 "read_json/read_csv on the reader's 4 MiB blocks, threads "
                                 "on; no step checks, no columns, no detectors"))
            out.append(under(f"scan: {fmt} peak RSS over baseline, {n:,} records",
                             r["peak_mb"] - r["base_mb"], "MB", mem_budget_mb(n),
                             f"peak VmHWM minus VmRSS after the imports ({r['base_mb']:.0f} MB)"))
    return out


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import json
    parser = argparse.ArgumentParser(prog="python -m bench.bench_scan")
    parser.add_argument("--json", metavar="FILE", help="also write results as a JSON list")
    parser.add_argument("--lines", metavar="N,N", help="file sizes (default 100000,1000000)")
    parser.add_argument("--formats", metavar="F,F", help="jsonl,csv,tensorboard (default all)")
    parser.add_argument("--files-only", action="store_true", help="only the file figures")
    args = parser.parse_args()
    if args.lines:
        os.environ["BENCH_SCAN_LINES"] = args.lines
    if args.formats:
        os.environ["BENCH_SCAN_FORMATS"] = args.formats
    start = time.perf_counter()
    results = file_figures() if args.files_only else run()
    for r in results:
        print(row(r), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.as_json() for r in results], fh, indent=2)
    print(f"{time.perf_counter() - start:.1f}s")
