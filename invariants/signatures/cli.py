"""Owns the ``invariants scan`` subcommand (registered by ``invariants._cli``).

Contract (DESIGN.md): ``invariants scan PATH [--format auto|jsonl|csv|tensorboard]
[--json] [--plot FILE.png] [--map new=old ...]``; exit 0 no critical finding,
1 collapse, 2 unreadable input or bad usage (``FILE:LINE: problem`` on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from invariants._errors import InvalidArgumentError
from invariants.signatures.findings import verdict_of
from invariants.signatures.logs import FORMATS, scan_file
from invariants.signatures.report import render_report, write_plot


def _parse_map(items: Sequence[str] | None) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items or ():
        new, sep, old = item.partition("=")
        if not sep or not new or not old:
            raise InvalidArgumentError(f"--map {item!r}: expected new=old, e.g. loss=train/loss")
        if new in mapping:
            raise InvalidArgumentError(f"--map {item!r}: {new!r} is mapped twice")
        mapping[new] = old
    return mapping


def _print(text: str) -> None:
    """print, tolerating a reader that went away (``invariants scan ... | head``)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _cmd_scan(args: argparse.Namespace) -> int:
    mapping = _parse_map(args.map)
    if args.plot:
        parent = os.path.dirname(os.path.abspath(args.plot))
        if os.path.isdir(args.plot):
            raise InvalidArgumentError(f"--plot={args.plot!r}: is a directory; give a file "
                                       "name, e.g. plot.png")
        if not os.path.isdir(parent):
            raise InvalidArgumentError(f"--plot={args.plot!r}: directory {parent!r} does not exist")
    data, findings = scan_file(args.path, args.format, mapping)
    verdict = verdict_of(findings)
    if args.json:
        _print(json.dumps({"verdict": verdict, "findings": [f.as_json() for f in findings]},
                          indent=2, allow_nan=False))
    else:
        _print(render_report(data, findings))
    if args.plot:
        write_plot(data, findings, args.plot)
        if not args.json:
            _print(f"plot written to {args.plot}")
    return 1 if verdict == "collapse" else 0


def register(subparsers) -> None:
    """Add the ``scan`` subcommand (called by ``invariants._cli``)."""
    p = subparsers.add_parser("scan", help="scan a training log for collapse signatures")
    p.add_argument("path", metavar="PATH", help="JSONL/CSV log, or TensorBoard event file/dir")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="log format (default: %(default)s: by file name, then content)")
    p.add_argument("--json", action="store_true", help="print the JSON contract instead")
    p.add_argument("--plot", metavar="FILE.png", help="draw flagged metrics to this PNG")
    p.add_argument("--map", metavar="new=old", nargs="+", action="extend",
                   help="read canonical metric NEW from the log's column OLD")
    p.set_defaults(func=_cmd_scan)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    from invariants._cli import main as cli_main
    return cli_main(["scan", *(argv or sys.argv[1:])])
