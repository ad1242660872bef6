"""Per-case cost of the kill matrix: Hypothesis examples per second of every fixed case.

A fixed case runs all of its ci-profile examples (a broken one stops at the first
counterexample and shrinks), so examples/s of the fixed cases is the figure that
decides what a check of a real model costs.
"""
from __future__ import annotations

import time

from hypothesis import settings

from bench import Result, under
from invariants import load_profile, run_case
from reference_models.catalog import CASES


def run() -> list[Result]:
    load_profile("ci")
    n = settings.default.max_examples
    timed = []
    for case in CASES:
        if case.expected != "holds":
            continue
        start = time.perf_counter()
        outcome = run_case(case)
        secs = time.perf_counter() - start
        timed.append((secs, case, outcome.ok))
    timed.sort(key=lambda t: t[0], reverse=True)
    results = [under(f"check {c.system}/{c.invariant} ({n} examples)", n / secs, "ex/s", None,
                     f"{secs:.2f}s" + ("" if ok else "; VIOLATED"))
               for secs, c, ok in timed[:8]]
    results.append(under("kill matrix, fixed cases only", sum(t[0] for t in timed), "s", None))
    return results
