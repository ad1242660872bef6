"""The ``invariants`` command line.

``invariants check`` runs the kill matrix (contract in DESIGN.md). Other
subcommands (``scan``, ``golden``) register themselves through ``_SUBCOMMANDS``:
each entry is a module exposing ``register(subparsers)`` that sets
``func=handler(args) -> exit code`` on its parser.

Exit codes: 0 success, 1 a verdict failed (a fixed case violated, a broken case
missed, a collapse found), 2 bad usage or unreadable input (message on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections import defaultdict
from typing import Sequence

from invariants._catalog import Outcome, load_catalog, run_case
from invariants._determinism import set_num_threads
from invariants._errors import InvalidArgumentError
from invariants._profiles import load_profile

_SUBCOMMANDS: tuple[str, ...] = ("invariants.signatures.cli", "invariants.golden.cli")
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


def _cmd_check(args: argparse.Namespace) -> int:
    profile = load_profile()
    set_num_threads(args.threads)
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
    outcomes = []
    for case in cases:
        outcomes.append(run_case(case))
        if not args.json and not args.quiet:
            print(f"  ran {case.id}: {outcomes[-1].outcome}", file=sys.stderr, flush=True)
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
              f"{sum(o.seconds for o in outcomes):.1f}s): {'OK' if ok else 'FAILED'}")
    return EXIT_OK if ok else EXIT_FAIL


def build_parser() -> argparse.ArgumentParser:
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
    check.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    check.set_defaults(func=_cmd_check)
    for name in _SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
