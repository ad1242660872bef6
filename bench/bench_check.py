"""`invariants check`, the whole kill matrix under the ci profile: wall and CPU time (issue 18).

Figures, each command in a fresh subprocess with ``HYPOTHESIS_PROFILE=ci``:

- ``invariants check -q`` end to end, default ``--jobs``: wall time (budget <= 6 s on the 2-core
  machine) and CPU time (user + sys of the command and of its worker processes);
- the floors it cannot go under: importing ``invariants`` and ``reference_models.catalog``
  (best of 3), and the same plus ``torch._dynamo``, which torch imports on the first call of
  ``torch.manual_seed``, an optimizer step or ``torch.utils.checkpoint`` (so once per process
  that runs any case);
- per fixed case, in this process, CPU time and examples/s (the 8 costliest): a fixed case
  runs all its ci-profile examples, a broken one stops at its first counterexample and shrinks.
  ``BENCH_CHECK_CASES=0`` (or ``--no-cases``) skips them.

``python -m bench --only check`` runs it inside the table; ``python -m bench.bench_check
[--json FILE] [--no-cases]`` alone.
"""
from __future__ import annotations

import importlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench import Result, row, under

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 6.0
IMPORTS = "import invariants, reference_models.catalog"


def _child(args: list[str]) -> tuple[float, float, int, str]:
    """(wall s, CPU s of the child and every descendant it waited for, exit code, output)."""
    env = {**os.environ, "HYPOTHESIS_PROFILE": "ci"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)  # a failing check is a figure, not a crash
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, proc.stdout + proc.stderr


def _floor(code: str, repeat: int = 3) -> tuple[float, float]:
    """Best wall and best CPU time of ``python -c code`` over ``repeat`` fresh processes."""
    runs = [_child(["-c", code]) for _ in range(repeat)]
    for _, _, rc, out in runs:
        if rc != 0:
            raise RuntimeError(f"python -c {code!r} failed (exit {rc}): {out[-500:]}")
    return min(r[0] for r in runs), min(r[1] for r in runs)


def check_figures() -> list[Result]:
    floor_wall, floor_cpu = _floor(IMPORTS)
    dyn_wall, dyn_cpu = _floor(IMPORTS + ", torch._dynamo")
    wall, cpu, rc, out = _child(["-m", "invariants", "check", "-q"])
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    verdict = "" if rc == 0 else f"; exit {rc}: {summary[-120:]}"
    return [
        under("invariants check, whole catalog, ci profile: wall", wall, "s", BUDGET_S,
              f"floor {floor_wall:.2f} s imports, {dyn_wall:.2f} s with torch._dynamo{verdict}"),
        under("invariants check, whole catalog, ci profile: CPU", cpu, "s", None,
              "user + sys, command and its workers"),
        under("floor: import invariants, reference_models.catalog (wall)", floor_wall, "s", None,
              f"CPU {floor_cpu:.2f} s; best of 3"),
        under("floor: the imports + torch._dynamo (wall)", dyn_wall, "s", None,
              f"CPU {dyn_cpu:.2f} s; torch imports it on the first seeded/optimizer/"
              "checkpoint call, once per process"),
    ]


def case_figures(top: int = 8) -> list[Result]:
    """CPU time of every case in this process; the ``top`` costliest fixed cases in examples/s."""
    from hypothesis import settings

    from invariants import load_profile, one_thread, run_case
    from reference_models.catalog import CASES

    load_profile("ci")
    importlib.import_module("torch._dynamo")  # paid once per process: not the first case's cost
    n = settings.default.max_examples
    timed = []
    with one_thread():
        for case in CASES:
            start = time.process_time()
            outcome = run_case(case)
            timed.append((time.process_time() - start, case, outcome.ok))
    total = sum(t[0] for t in timed)
    fixed = sorted((t for t in timed if t[1].expected == "holds"), key=lambda t: -t[0])
    results = [under(f"check {c.system}/{c.invariant} fixed ({n} examples a property)",
                     n / secs, "ex/s", None, f"CPU {secs:.2f}s" + ("" if ok else "; VIOLATED"))
               for secs, c, ok in fixed[:top]]
    results.append(under("kill matrix in one process, every case: CPU", total, "s", None,
                         f"fixed cases {sum(t[0] for t in fixed):.2f} s; imports not included"))
    return results


def run() -> list[Result]:
    results = check_figures()
    if os.environ.get("BENCH_CHECK_CASES", "1") != "0":
        results += case_figures()
    return results


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.bench_check")
    parser.add_argument("--json", metavar="FILE", help="also write results as a JSON list")
    parser.add_argument("--no-cases", action="store_true", help="skip the per-case figures")
    args = parser.parse_args()
    if args.no_cases:
        os.environ["BENCH_CHECK_CASES"] = "0"
    results = run()
    for r in results:
        print(row(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_json() for r in results], indent=2) + "\n")
    sys.exit(0 if all(r.met is not False for r in results) else 1)
