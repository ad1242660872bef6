"""``python -m bench [--json FILE] [--only NAME]``: run every bench/bench_*.py, print the table.

``python -m bench detection [--json FILE]``: the detection bench (bench/detection/cli.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import bench


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["detection"]:
        from bench.detection.cli import main as detection
        return detection(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--json", metavar="FILE", help="also write results as a JSON list")
    parser.add_argument("--only", metavar="NAME", help="run only bench_<NAME>.py")
    args = parser.parse_args(argv)
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(bench.__file__).parent)])
                   if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n == f"bench_{args.only}"]
        if not names:
            print(f"python -m bench: error: --only={args.only!r}: no bench/bench_{args.only}.py",
                  file=sys.stderr)
            return 2
    results = []
    print(f"{'benchmark':<58} {'value':>12} {'unit':<8} {'budget':>10}  met")
    for name in names:
        start = time.perf_counter()
        for r in importlib.import_module(f"bench.{name}").run():
            results.append(r)
            print(bench.row(r), flush=True)
        print(f"  ({name}: {time.perf_counter() - start:.1f}s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_json() for r in results], indent=2) + "\n")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    try:
        rc = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`): no traceback, no more output
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("python -m bench: stdout closed before the table was complete", file=sys.stderr)
        rc = 1
    sys.exit(rc)
