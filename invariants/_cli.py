"""The ``invariants`` command line.

``invariants check`` runs the kill matrix (contract in DESIGN.md), its cases spread over
forked worker processes (``--jobs``, ``_catalog.run_cases``; the output does not depend on
how many), and prints the elapsed time of the run in its last line. Other
subcommands (``scan``, ``golden``) register themselves through ``_SUBCOMMANDS``:
each entry maps the command to a module exposing ``register(subparsers)`` that sets
``func=handler(args) -> exit code`` on its parser.

Exit codes: 0 success, 1 a verdict failed (a fixed case violated, a broken case
missed, a collapse found), 2 bad usage or unreadable input (message on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

from invariants._errors import InvalidArgumentError
from invariants._profiles import load_profile
from invariants._validate import require

if TYPE_CHECKING:   # the check's machinery (torch) is imported when `check` runs, not for `scan`
    from invariants._catalog import Outcome

# subcommand -> the module that registers it; only the one asked for is imported
# (`invariants scan` never imports torch: tests/test_scan_sources.py)
_SUBCOMMANDS: dict[str, str] = {"scan": "invariants.signatures.cli",
                                "golden": "invariants.golden.cli"}
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default exit code is 2 already; keep it
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _table(outcomes: list[Outcome]) -> str:
    rows: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        rows[(o.case.system, o.case.invariant)].append(o)
    sys_w = max([len("SYSTEM")] + [len(k[0]) for k in rows])
    lines = [f"{'SYSTEM':<{sys_w}}  {'INV':<4} {'FIXED':<9} {'BROKEN':<25} TIME"]
    for (system, inv), group in rows.items():
        fixed = [o for o in group if o.case.expected == "holds"]
        broken = [o for o in group if o.case.expected != "holds"]
        fixed_txt = ",".join(o.outcome for o in fixed) or "—"
        parts = []
        for kind, label in (("caught", "caught"), ("refuted", "refuted")):
            group_kind = [o for o in broken if o.case.expected == kind]
            if group_kind:
                n_ok = sum(o.ok for o in group_kind)
                parts.append(f"{label} {n_ok}/{len(group_kind)}" if n_ok == len(group_kind)
                             else ",".join(o.outcome for o in group_kind if not o.ok))
        broken_txt = ", ".join(parts) or "—"
        secs = sum(o.seconds for o in group)
        lines.append(f"{system:<{sys_w}}  {inv:<4} {fixed_txt:<9} {broken_txt:<25} {secs:5.1f}s")
        for o in group:
            if o.outcome == "error" or (not o.ok and o.case.expected == "holds"):
                lines.append(f"    {o.case.variant}: {o.outcome}: {_first(o.detail)}")
            elif o.case.expected != "holds":
                text = o.counterexample if o.ok else "no counterexample found: the invariant has no teeth"
                lines.append(f"    {o.case.variant}: {text}")
    return "\n".join(lines)


def _first(text: str | None, limit: int = 300) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: ``--jobs`` default: one worker process per usable CPU (over ``--threads``), at most this
#: many (the catalog's slowest cases, 1-2 s each, bound what more workers gain), and none
#: for fewer than two cases a worker (forking and torch's first-use imports cost ~1 s).
MAX_AUTO_JOBS = 4


def _jobs(jobs: int | None, threads: int, n_cases: int) -> int:
    if jobs is not None:
        require(jobs >= 1, "--jobs", jobs,
                "must be an integer >= 1 (1: every case in this process)")
        return jobs
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_AUTO_JOBS, (cpus or 1) // max(1, threads), n_cases // 2))


def _cmd_check(args: argparse.Namespace) -> int:
    from invariants._catalog import load_catalog, run_cases
    from invariants._determinism import set_num_threads
    profile = load_profile()
    set_num_threads(args.threads)
    _jobs(args.jobs, args.threads, 0)  # a bad --jobs is refused before anything is loaded
    cases = load_catalog(args.catalog)
    if args.system:
        systems = sorted({c.system for c in cases})
        if args.system not in systems:
            raise InvalidArgumentError(
                f"--system={args.system!r}: not in catalog {args.catalog!r}; known systems: "
                f"{', '.join(systems)}")
        cases = [c for c in cases if c.system == args.system]
    if args.invariant:
        cases = [c for c in cases if c.invariant == args.invariant]
        if not cases:
            raise InvalidArgumentError(f"--invariant={args.invariant!r}: no case has this id")

    def progress(o: Outcome) -> None:
        if not args.json and not args.quiet:
            print(f"  ran {o.case.id}: {o.outcome}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    outcomes = run_cases(cases, jobs=_jobs(args.jobs, args.threads, len(cases)),
                         on_outcome=progress)
    elapsed = time.perf_counter() - start  # with workers, less than the rows' TIME summed
    ok = all(o.ok for o in outcomes)
    if args.json:
        print(json.dumps({"cases": [o.as_json() for o in outcomes], "ok": ok}, indent=2))
    else:
        print(_table(outcomes))
        n_fixed = sum(o.case.expected == "holds" for o in outcomes)
        n_broken = len(outcomes) - n_fixed
        print(f"\n{sum(o.ok for o in outcomes if o.case.expected == 'holds')}/{n_fixed} fixed hold, "
              f"{sum(o.ok for o in outcomes if o.case.expected != 'holds')}/{n_broken} broken "
              f"caught or claims refuted (Hypothesis profile {profile!r}, "
              f"{elapsed:.1f}s): {'OK' if ok else 'FAILED'}")
    return EXIT_OK if ok else EXIT_FAIL


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``only``: register just that subcommand (a key of
    ``_SUBCOMMANDS``), so the imports are what that command needs."""
    parser = _Parser(prog="invariants",
                     description="Property-based invariants for training-stability fixes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("check", help="run the kill matrix: fixed must hold, broken must be caught")
    check.add_argument("--catalog", default="reference_models.catalog",
                       help="module defining CASES or cases() (default: %(default)s)")
    check.add_argument("--system", help="only this system")
    check.add_argument("--invariant", help="only this SPEC id (e.g. L1)")
    check.add_argument("--json", action="store_true", help="print the JSON contract instead")
    check.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (default 1: the reference models are tiny)")
    check.add_argument("--jobs", type=int, default=None,
                       help="worker processes running cases side by side (default: one per "
                            f"usable CPU, at most {MAX_AUTO_JOBS}, none for fewer than 2 cases "
                            "each; 1: all in this process); outcomes, counterexamples and "
                            "output order do not depend on it")
    check.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    check.set_defaults(func=_cmd_check)
    for command, module in _SUBCOMMANDS.items():
        if only is None or command == only:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in _SUBCOMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) become return codes
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except InvalidArgumentError as exc:
        print(f"invariants {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
