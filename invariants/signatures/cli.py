"""Owns the ``invariants scan`` subcommand (registered by ``invariants._cli``).

Contract (DESIGN.md): ``invariants scan PATH [--format auto|jsonl|csv|tensorboard]
[--json] [--plot FILE.png] [--map new=old ...]``; exit 0 no critical finding,
1 collapse, 2 unreadable input or bad usage (``FILE:LINE: problem`` on stderr).
PATH may be a file, ``-`` or a pipe (read whole), or a directory searched
recursively: one report per run, the exit code is the worst of them, and ``--json``
prints ``{"runs": [{"path", "verdict", "findings"} | {"path", "verdict": "error",
"error"}], "verdict": worst}`` (docs/signatures.md).  A single run keeps the
single-file shape ``{"verdict", "findings"}``.

``--plot``: the destination is checked (a writable directory, not a directory
itself) before anything is read, and the plot is written before anything is
printed, so a plot failure exits 2 with one line on stderr that still names the
scan's verdict, and never after half a report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from invariants._errors import InvalidArgumentError
from invariants.signatures.findings import verdict_of
from invariants.signatures.logs import FORMATS, LogError, scan_runs
from invariants.signatures.readers.stream import cut, short
from invariants.signatures.report import render_report, write_plot

_EXIT = {"healthy": 0, "warning": 0, "collapse": 1, "error": 2}
_ORDER = ("healthy", "warning", "collapse", "error")


def _parse_map(items: Sequence[str] | None) -> dict[str, str]:
    mapping: dict[str, str] = {}
    sources: dict[str, str] = {}
    for item in items or ():
        new, sep, old = item.partition("=")
        if not sep or not new or not old:
            raise InvalidArgumentError(f"--map {short(item)}: expected new=old, e.g. "
                                       "loss=train/loss")
        if new in mapping:
            raise InvalidArgumentError(f"--map {short(item)}: {cut(new)!r} is mapped twice")
        if old in sources:
            raise InvalidArgumentError(f"--map {short(item)}: column {cut(old)!r} is already "
                                       f"mapped to {sources[old]!r}; one column fills one metric")
        mapping[new] = old
        sources[old] = new
    return mapping


def _print(text: str, err: bool = False) -> None:
    """print, tolerating a reader that went away (``invariants scan ... | head``)."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())


def _check_plot(plot: str) -> None:
    parent = os.path.dirname(os.path.abspath(plot))
    if os.path.isdir(plot):
        raise InvalidArgumentError(f"--plot={plot!r}: is a directory; give a file name, "
                                   "e.g. plot.png")
    if not os.path.isdir(parent):
        raise InvalidArgumentError(f"--plot={plot!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"--plot={plot!r}: directory {parent!r} is not writable")


def _cmd_scan(args: argparse.Namespace) -> int:
    mapping = _parse_map(args.map)
    if args.plot:
        _check_plot(args.plot)
    results = scan_runs(args.path, args.format, mapping)
    single = len(results) == 1
    if single and isinstance(results[0], LogError):
        raise results[0]
    if args.plot:
        if not single:
            raise InvalidArgumentError(f"--plot={args.plot!r}: PATH holds {len(results)} runs; "
                                       "--plot draws one (scan a single run)")
        data, findings = results[0]
        try:
            write_plot(data, findings, args.plot)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{exc} (the scan's verdict: {verdict_of(findings)})") \
                from None
    verdicts = []
    docs = []
    for r in results:
        if isinstance(r, LogError):
            verdicts.append("error")
            _print(f"invariants scan: error: {r}", err=True)
            docs.append({"path": getattr(r, "path", args.path), "verdict": "error", "error": str(r)})
            continue
        data, findings = r
        v = verdict_of(findings)
        verdicts.append(v)
        docs.append({"path": data.path, "verdict": v, "findings": [f.as_json() for f in findings]})
        if args.json:
            for note in data.notes:
                _print(f"invariants scan: note: {data.path}: {note}", err=True)
        else:
            if not single:
                _print("")
            _print(render_report(data, findings)
                   + "".join(f"\nnote: {note}" for note in data.notes))
    worst = max(verdicts, key=_ORDER.index)
    if args.json:
        doc = ({"verdict": docs[0]["verdict"], "findings": docs[0]["findings"]} if single
               else {"runs": docs, "verdict": worst})
        _print(json.dumps(doc, indent=2, allow_nan=False))
    elif not single:
        counts = {v: verdicts.count(v) for v in _ORDER if v in verdicts}
        _print(f"\n{len(results)} runs: " + ", ".join(f"{n} {v}" for v, n in counts.items())
               + f"; worst: {worst}")
    if args.plot and not args.json:
        _print(f"plot written to {args.plot}")
    return _EXIT[worst]


def register(subparsers) -> None:
    """Add the ``scan`` subcommand (called by ``invariants._cli``)."""
    p = subparsers.add_parser("scan", help="scan training logs for collapse signatures")
    p.add_argument("path", metavar="PATH",
                   help="JSONL/CSV log, TensorBoard event file or run dir, HF trainer_state.json, "
                        "'-' for stdin, or a directory searched recursively")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="log format (default: %(default)s: by file name, then content)")
    p.add_argument("--json", action="store_true", help="print the JSON contract instead")
    p.add_argument("--plot", metavar="FILE.png", help="draw flagged metrics to this PNG")
    p.add_argument("--map", metavar="new=old", nargs="+", action="extend",
                   help="read canonical metric NEW from the log's column OLD "
                        "(step=COLUMN names the step column)")
    p.set_defaults(func=_cmd_scan)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    from invariants._cli import main as cli_main
    return cli_main(["scan", *(argv or sys.argv[1:])])
