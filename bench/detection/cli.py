"""Owns ``python -m bench detection [--json FILE] [--half test|tune] [--processes N]``:
generates (or reads from the cache) the corpus, scores our detectors and the anchors on
one half (default: the held-out test half), prints the table and issue 15's acceptance
for our row, and writes the JSON ``{"detectors": [...], "half", "acceptance", "corpus"}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.detection import corpus, score

_COLS = ("name", "healthy_runs", "false_critical", "false_any", "broken_runs", "recall",
         "median_delay", "recall_critical", "early", "false_any_ci95", "recall_ci95",
         "combined")


def _cell(v) -> str:
    return f"{v[0]:.3f}-{v[1]:.3f}" if isinstance(v, list) else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench detection")
    ap.add_argument("--json", metavar="FILE", help="write the table as JSON")
    ap.add_argument("--half", choices=("test", "tune"), default="test",
                    help="which half of the corpus to score (default: the held-out test half)")
    ap.add_argument("--processes", type=int, default=2,
                    help="generator processes for runs missing from the cache (default 2)")
    args = ap.parse_args(argv)
    if args.processes < 1:
        print(f"python -m bench detection: error: --processes={args.processes}: must be >= 1",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    logs = corpus.load(processes=args.processes)
    t_gen = time.perf_counter() - t0
    table, _ = score.evaluate(logs, args.half)
    print(f"corpus {corpus.GENERATOR_VERSION}: {len(logs)} runs ({t_gen:.1f}s to load or "
          f"generate); scored on the {args.half} half")
    print("  ".join(f"{c:>{max(len(c), 8)}}" if i else f"{c:<28}" for i, c in enumerate(_COLS)))
    for r in table:
        print("  ".join(f"{_cell(r[c]):>{max(len(c), 8)}}" if i else f"{r[c]:<28}"
                        for i, c in enumerate(_COLS)))
    checks = score.acceptance(table)
    print(f"acceptance (issue 15) on the {args.half} half:")
    for criterion, holds, numbers in checks:
        print(f"  {'met    ' if holds else 'NOT met'}  {criterion}: {numbers}")
    if args.json:
        specs = [s for s in corpus.specs() if s.half == args.half]
        doc = {"detectors": table, "half": args.half,
               "acceptance": [{"criterion": c, "met": h, "measured": m} for c, h, m in checks],
               "corpus": {"generator_version": corpus.GENERATOR_VERSION, "runs": len(specs),
                          "healthy": sum(s.healthy for s in specs),
                          "broken": sum(not s.healthy for s in specs)}}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0
