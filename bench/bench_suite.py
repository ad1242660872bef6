"""Suite speed: `pytest -n auto` vs `-n 0`, the slowest tests, and `invariants check` time.

Budgets (issue 10): the default suite under 180 s with -n auto on the 2-core machine
(goal 120 s); `invariants check` over the full catalog under 60 s with the ci profile.
Set BENCH_SKIP_SUITE=1 to skip the two full-suite runs (they take minutes).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench import Result, under

ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], env_extra: dict | None = None) -> tuple[float, str, int]:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "ci", "CI": "1", **(env_extra or {})}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc.stdout + proc.stderr, proc.returncode


def run() -> list[Result]:
    results: list[Result] = []
    secs, out, rc = _timed([sys.executable, "-m", "invariants", "check", "-q"])
    results.append(under("invariants check, full catalog (ci profile)", secs, "s", 60.0,
                         "" if rc == 0 else f"exit {rc}"))
    if os.environ.get("BENCH_SKIP_SUITE"):
        return results
    par, out_par, rc_par = _timed([sys.executable, "-m", "pytest", "-n", "auto", "-q",
                                   "-p", "no:cacheprovider", "--durations=10"])
    seq, _, rc_seq = _timed([sys.executable, "-m", "pytest", "-n", "0", "-q",
                             "-p", "no:cacheprovider"])
    failed = re.findall(r"^FAILED (\S+)", out_par, re.M)
    results.append(under("pytest -n auto, whole default suite", par, "s", 180.0,
                         "goal 120 s" + ("" if rc_par == 0 else f"; exit {rc_par}: {failed[:3]}")))
    results.append(under("pytest -n 0, whole default suite", seq, "s", None,
                         "" if rc_seq == 0 else f"exit {rc_seq}"))
    results.append(under("speed-up -n auto over -n 0", seq / par, "x", None))
    durations = re.findall(r"^(\d+\.\d+)s (call|setup|teardown)\s+(\S+)", out_par, re.M)
    for secs_str, phase, test in durations[:10]:
        results.append(under(f"slowest: {test[-52:]}", float(secs_str), "s", None, phase))
    return results
