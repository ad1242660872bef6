"""``CollapseGuard.update`` cost per step by ``sync_every`` (issue 18.3; budget from issue 15).

- update cost per step, 5 metrics, healthy log (all detectors active), for
  ``sync_every`` in 1, 8, 16 (the default), 32, 64, with Python floats and with 0-d CPU tensors
  (budget < 20 us per update each);
- the floors the figures sit on: a bare Python call that builds the 5-metric dict, reading
  5 tensors with ``float()`` (what ``update`` did per step before: on a GPU, 5 syncs),
  one ``torch.stack`` of 5 tensors (the copy a tensor update makes), and the streaming
  scanner alone on floats (the detectors, which every update pays at its sync).

Best of 15 rounds of 1,000 updates: short rounds catch the quiet moments of a shared
machine. CPU only: on a GPU the figure that matters is the sync itself (one per ``sync_every``
updates instead of one per metric per update), which this machine cannot show.
Run: ``python -m bench --only guard``.
"""
from __future__ import annotations

import time
import warnings

import torch

from bench import Result, best_of, under
from invariants import CollapseGuard, SignatureConfig
from invariants.signatures.drivers import StreamingScanner

N = 1_000
SYNC_EVERY = (1, 8, 16, 32, 64)   # 16: the default
BUDGET_US = 20.0


def _records(n: int) -> list[dict[str, float]]:
    """A healthy 5-metric log: slow decay, small deterministic wiggles."""
    out = []
    for i in range(n):
        d = 0.999 ** i
        out.append({"loss": 0.2 + 2.0 * d + 0.01 * (i % 7), "grad_norm": 0.5 + d + 0.01 * (i % 3),
                    "accuracy": 0.9 - 0.5 * d, "lora_norm": 0.5, "entropy": 0.1 + 0.2 * d})
    return out


def _per_update(make, records) -> float:
    """Best-of-15 mean seconds per update over the whole log, flush included."""
    def go():
        g = make()
        upd = g.update
        for i, r in enumerate(records):
            upd(i, r)
        g.flush()
    return best_of(go, repeat=15) / len(records)


def run() -> list[Result]:
    torch.set_num_threads(1)
    cfg = SignatureConfig()
    floats = _records(N)
    # a training loop logs tensors it has just computed (in cache): cycle 16 steps' tensors;
    # 1,000 distinct pre-built steps (cold: ~5,000 tensors) are reported as their own line
    cold = [{k: torch.tensor(v, dtype=torch.float32) for k, v in r.items()} for r in floats]
    tensors = [cold[i % 16] for i in range(N)]
    five = list(tensors[0].values())
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy log must not warn
        for kind, recs in (("float", floats), ("0-d tensor", tensors)):
            for s in SYNC_EVERY:
                t = _per_update(lambda s=s: CollapseGuard(cfg, sync_every=s), recs)
                out.append(under(f"guard: update, 5 {kind} metrics, sync_every={s}", t * 1e6, "us",
                                 BUDGET_US, f"detection delay <= {s - 1} updates" if s > 1 and
                                 kind != "float" else "no delay"))

        t = _per_update(lambda: CollapseGuard(cfg, sync_every=16), cold)
        out.append(under("guard: update, 5 0-d tensor metrics, sync_every=16, cold tensors",
                         t * 1e6, "us", None, "1,000 distinct pre-built steps, out of cache"))

        def bare(i, m):
            return m
        floor_call = best_of(lambda: [bare(i, {"loss": 1.0, "grad_norm": 1.0, "accuracy": 0.5,
                                                "lora_norm": 0.5, "entropy": 0.3})
                                      for i in range(N)], repeat=15) / N
        floor_float = best_of(lambda: [[float(x) for x in five] for _ in range(N)], repeat=15) / N
        floor_stack = best_of(lambda: [torch.stack(five) for _ in range(N)], repeat=15) / N

        def scanner_only():
            sc = StreamingScanner(cfg)
            for i, r in enumerate(floats):
                sc.update(i, r)
        floor_scan = best_of(scanner_only, repeat=15) / N
    tensor16 = next(r.value for r in out if r.name.endswith("tensor metrics, sync_every=16"))
    float16 = next(r.value for r in out if r.name.endswith("float metrics, sync_every=16"))
    out += [
        under("guard overhead over the detectors: floats, sync_every=16",
              float16 - floor_scan * 1e6, "us", None, "update minus StreamingScanner.update"),
        under("guard overhead over the detectors: 0-d tensors, sync_every=16",
              tensor16 - floor_scan * 1e6, "us", None, "the torch.stack copy, the buffer, the read"),
        under("floor: bare Python call + 5-metric dict build", floor_call * 1e6, "us", None),
        under("floor: float() on 5 tensors (the old per-step read)", floor_float * 1e6, "us", None,
              "on a GPU: 5 host-device syncs per step"),
        under("floor: torch.stack of 5 0-d tensors (the tensor update's copy)",
              floor_stack * 1e6, "us", None),
        under("floor: StreamingScanner.update alone, 5 floats", floor_scan * 1e6, "us", None,
              "the detectors; paid by every update at its sync"),
    ]
    return out


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    for r in run():
        print(r)
    print(f"{time.perf_counter() - start:.1f}s")
