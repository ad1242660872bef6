"""``invariants scan``: read a training log, run the vectorised signature detectors.

Contract (DESIGN.md): ``invariants scan PATH [--format auto|jsonl|csv|tensorboard]
[--json] [--plot FILE.png] [--map new=old ...]``; exit 0 no critical finding,
1 collapse, 2 unreadable input or bad usage (``FILE:LINE: problem`` on stderr).

Readers return ``LogData``: per canonical metric the record ordinals, steps and
values, ready for ``VectorisedScanner``.  JSONL values may be numbers, ``NaN``/
``Infinity`` as Python's json writes them, ``null`` (read as NaN) or the strings
``"nan"``/``"inf"``/``"-inf"``; CSV cells the same text, an empty cell meaning
"not logged"; TensorBoard event files are read with tensorboard's own
``EventAccumulator`` (scalars, and text summaries for ``sample``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from invariants._errors import InvalidArgumentError
from invariants._signatures import (CANONICAL_METRICS, TEXT_METRICS, Finding, SignatureConfig,
                                    VectorisedScanner, verdict_of)

__all__ = ["LogData", "read_log", "render_report", "scan_file", "write_plot"]

FORMATS = ("auto", "jsonl", "csv", "tensorboard")
_NAN = {"nan", "+nan", "-nan"}
_INF = {"inf", "+inf", "infinity", "+infinity"}
_NINF = {"-inf", "-infinity"}
_RATIO_SIGS = ("encoder_grad_share", "encoder_starving")


@dataclass
class LogData:
    """A parsed log: ``columns[metric] = (pos, steps, values)`` in record order."""

    path: str
    format: str
    records: int
    step_key: str
    columns: dict[str, tuple[list, list, list]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        _, steps, values = self.columns[metric]
        return np.asarray(steps, dtype=np.float64), (
            np.asarray(values, dtype=object) if metric in TEXT_METRICS
            else np.asarray(values, dtype=np.float64))


class _Bad(InvalidArgumentError):
    pass


def _err(path: str, line: int | None, problem: str) -> _Bad:
    where = f"{path}:{line}" if line is not None else path
    return _Bad(f"{where}: {problem}")


def _number(v: Any, path: str, line: int | None, key: str) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool):
        raise _err(path, line, f"{key}={v!r}: not a number")
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:  # a JSON integer beyond float range (e.g. 400 digits)
            raise _err(path, line, f"{key}={_short(v)}: integer too large for a float "
                                   f"({len(str(abs(v)))} digits)") from None
    if isinstance(v, str):
        s = v.strip().lower()
        if s in _NAN:
            return math.nan
        if s in _INF:
            return math.inf
        if s in _NINF:
            return -math.inf
        try:
            return float(s)
        except ValueError:
            pass
    raise _err(path, line, f"{key}={v!r}: not a number (numbers, NaN/Infinity, null or "
                           "\"nan\"/\"inf\" are accepted)")


class _Builder:
    def __init__(self, path: str, fmt: str, mapping: Mapping[str, str]):
        self.path = path
        self.fmt = fmt
        self.rename = {old: new for new, old in mapping.items()}
        self.mapping = dict(mapping)
        self.cols: dict[str, tuple[list, list, list]] = {}
        self.ignored: set[str] = set()
        self.seen_sources: set[str] = set()
        self.step_key: str | None = None
        self.n = 0
        self.prev = -math.inf

    def add(self, line: int | None, rec: Mapping[str, Any], step_where: str = "") -> None:
        if self.step_key is None:
            self.step_key = "step" if "step" in rec else ("epoch" if "epoch" in rec else None)
            if self.step_key is None:
                raise _err(self.path, line, f"no 'step' or 'epoch' key in {_short(rec)}; every "
                                            "record needs one")
        if self.step_key not in rec:
            raise _err(self.path, line, f"no {self.step_key!r} key (the first record has one) "
                                        f"in {_short(rec)}")
        step = _number(rec[self.step_key], self.path, line, self.step_key)
        if not math.isfinite(step):
            raise _err(self.path, line, f"{self.step_key}={rec[self.step_key]!r}: must be finite")
        if step < self.prev:
            raise _err(self.path, line, f"{self.step_key} goes backwards ({_g(self.prev)} -> "
                                        f"{_g(step)}); a resumed run? split the log")
        self.prev = step
        pos = self.n
        self.n += 1
        for key, v in rec.items():
            if key in ("step", "epoch"):
                continue
            if key in self.rename:
                self.seen_sources.add(key)
                name = self.rename[key]
            elif key in CANONICAL_METRICS:
                name = key
                if key in self.mapping:
                    raise _err(self.path, line, f"--map {key}={self.mapping[key]}: the log already "
                                                f"has a {key!r} column")
            else:
                self.ignored.add(key)
                continue
            if name in TEXT_METRICS:
                if v is None or v == "":
                    continue
                if not isinstance(v, str):
                    raise _err(self.path, line, f"{key}={v!r}: a sample must be text")
                value: Any = v
            else:
                value = _number(v, self.path, line, key)
            c = self.cols.get(name)
            if c is None:
                c = self.cols[name] = ([], [], [])
            c[0].append(pos)
            c[1].append(step)
            c[2].append(value)

    def done(self) -> LogData:
        if self.n == 0:
            raise _err(self.path, None, "empty log: no records")
        for new, old in self.mapping.items():
            if old not in self.seen_sources:
                raise _err(self.path, None, f"--map {new}={old}: no metric {old!r} in the log")
        if not self.cols:
            raise _err(self.path, None,
                       f"no known metric in {self.n} records (ignored: "
                       f"{', '.join(sorted(self.ignored)) or 'nothing'}); canonical names: "
                       f"{', '.join(CANONICAL_METRICS)}; map yours with --map canonical=yours")
        return LogData(self.path, self.fmt, self.n, self.step_key or "step", self.cols,
                       sorted(self.ignored))


def _short(x: Any, limit: int = 60) -> str:
    t = repr(x)
    return t if len(t) <= limit else t[: limit - 3] + "..."


def _g(x: float) -> str:
    return f"{x:.6g}"


def _lines(path: str):
    try:
        with open(path, "r", encoding="utf-8", newline="") as fh:
            for i, line in enumerate(fh, 1):
                yield i, line
    except UnicodeDecodeError as exc:
        raise _err(path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start}); "
                               "a TensorBoard file? pass --format tensorboard") from None


def _read_jsonl(path: str, b: _Builder) -> None:
    for i, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _err(path, i, f"not valid JSON ({exc.msg} at column {exc.colno}); a truncated "
                                "line?") from None
        except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
            raise _err(path, i, f"not readable JSON ({str(exc).splitlines()[0][:80]})") from None
        except RecursionError:
            raise _err(path, i, "JSON nested too deeply to read (expected one flat object "
                                "per line)") from None
        if not isinstance(rec, dict):
            raise _err(path, i, f"expected a JSON object per line, got {type(rec).__name__}")
        b.add(i, rec)


def _read_csv(path: str, b: _Builder) -> None:
    import csv
    header: list[str] | None = None
    with open(path, "r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if header is None:
                    header = [c.strip() for c in row]
                    if len(set(header)) != len(header):
                        raise _err(path, line, f"duplicate column names in header {header}")
                    continue
                if len(row) != len(header):
                    raise _err(path, line, f"{len(row)} fields but the header has {len(header)}; "
                                           "a truncated line?")
                b.add(line, {k: v for k, v in zip(header, row) if v.strip() != ""})
        except csv.Error as exc:
            raise _err(path, reader.line_num, f"not valid CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise _err(path, None, f"not UTF-8 text ({exc.reason})") from None
    if header is not None and b.n == 0:
        raise _err(path, None, "a header but no records")


def _read_tensorboard(path: str, b: _Builder) -> None:
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    import logging

    from tensorboard.backend.event_processing import event_file_loader as efl

    class _Truncations(logging.Handler):
        """The reader stops quietly at a truncated or corrupt record (it is built to tail
        live files) and only logs it at DEBUG; a finished log that stops early is bad input."""

        def __init__(self):
            super().__init__(logging.DEBUG)
            self.seen: list[str] = []

        def emit(self, record):
            msg = record.getMessage()
            if "Truncated record" in msg or "corrupt" in msg.lower():
                self.seen.append(msg)

    acc = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    watcher = _Truncations()
    log = efl.logger
    old_level, old_prop = log.level, log.propagate
    log.addHandler(watcher)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        acc.Reload()
    except Exception as exc:  # the reader raises several types on corrupt files
        raise _err(path, None, f"not a readable TensorBoard event file ({type(exc).__name__}: "
                               f"{exc})") from None
    finally:
        log.removeHandler(watcher)
        log.setLevel(old_level)
        log.propagate = old_prop
    if watcher.seen:
        raise _err(path, None, f"truncated or corrupt TensorBoard event file: {watcher.seen[0]}")
    by_step: dict[float, dict[str, Any]] = {}
    tags = acc.Tags()
    for tag in tags.get(ea.SCALARS, []):
        for ev in acc.Scalars(tag):
            by_step.setdefault(float(ev.step), {})[tag] = float(ev.value)
    for tag in tags.get(ea.TENSORS, []):
        name = tag[: -len("/text_summary")] if tag.endswith("/text_summary") else tag
        for ev in acc.Tensors(tag):
            arr = tensor_util.make_ndarray(ev.tensor_proto)
            if arr.dtype.kind in "SO" and arr.size >= 1:
                v = arr.reshape(-1)[0]
                by_step.setdefault(float(ev.step), {})[name] = (
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
            elif arr.size == 1 and arr.dtype.kind in "fiu":
                by_step.setdefault(float(ev.step), {})[name] = float(arr.reshape(-1)[0])
    if not by_step:
        raise _err(path, None, "no scalar or text events found (is this a TensorBoard log "
                               "directory or event file?)")
    for step in sorted(by_step):
        b.add(None, {"step": step, **by_step[step]})


def _detect(path: str) -> str:
    p = Path(path)
    if p.is_dir() or "tfevents" in p.name:
        return "tensorboard"
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv",):
        return "csv"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise _err(path, None, f"cannot read ({exc.strerror or exc})") from None
    text = head.lstrip()
    if text.startswith(b"{"):
        return "jsonl"
    first = text.split(b"\n", 1)[0]
    if b"," in first and (b"step" in first or b"epoch" in first):
        return "csv"
    raise _err(path, None, "cannot tell the format (not .jsonl/.csv/tfevents and the content "
                           "is not recognisable); pass --format jsonl|csv|tensorboard")


def read_log(path: str | os.PathLike, fmt: str = "auto",
             mapping: Mapping[str, str] | None = None) -> LogData:
    """Parse a JSONL, CSV or TensorBoard log into per-metric series.

    Args:
      path: a file (or, for TensorBoard, a run directory).
      fmt: ``"auto"`` (by name, then content), ``"jsonl"``, ``"csv"`` or ``"tensorboard"``.
      mapping: ``{canonical_name: name_in_log}``.

    Raises:
      InvalidArgumentError: ``FILE[:LINE]: problem`` for anything it cannot read.
    """
    path = os.fspath(path)
    mapping = dict(mapping or {})
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"--format={fmt!r}: must be one of {', '.join(FORMATS)}")
    for new, old in mapping.items():
        if new not in CANONICAL_METRICS:
            raise InvalidArgumentError(
                f"--map {new}={old}: {new!r} is not a known metric; canonical names: "
                f"{', '.join(CANONICAL_METRICS)}")
    if not os.path.exists(path):
        raise _err(path, None, "no such file or directory")
    if fmt == "auto":
        fmt = _detect(path)
    if fmt != "tensorboard" and os.path.isdir(path):
        raise _err(path, None, f"is a directory; --format {fmt} needs a file")
    b = _Builder(path, fmt, mapping)
    try:
        {"jsonl": _read_jsonl, "csv": _read_csv, "tensorboard": _read_tensorboard}[fmt](path, b)
    except OSError as exc:
        raise _err(path, None, f"cannot read ({exc.strerror or exc})") from None
    return b.done()


def scan_file(path: str | os.PathLike, fmt: str = "auto", mapping: Mapping[str, str] | None = None,
              config: SignatureConfig | None = None) -> tuple[LogData, list[Finding]]:
    """``read_log`` then the vectorised detectors; returns (data, findings sorted by step)."""
    data = read_log(path, fmt, mapping)
    return data, VectorisedScanner(config).scan(data.columns)


def render_report(data: LogData, findings: Sequence[Finding]) -> str:
    """The human-readable report ``invariants scan`` prints by default."""
    verdict = verdict_of(findings)
    steps = [s for _, st, _ in data.columns.values() for s in st]
    lines = [f"{data.path}: {data.format}, {data.records} records, {data.step_key} "
             f"{_g(min(steps))}..{_g(max(steps))}",
             "metrics: " + ", ".join(f"{m} ({len(c[0])})" for m, c in sorted(data.columns.items()))]
    if data.ignored:
        lines.append("ignored (not canonical, not mapped): " + ", ".join(data.ignored))
    n_crit = sum(f.severity == "critical" for f in findings)
    n_warn = len(findings) - n_crit
    head = {"healthy": "HEALTHY: no collapse signature found",
            "warning": f"WARNING: {n_warn} warning(s), no critical finding",
            "collapse": f"COLLAPSE: {n_crit} critical, {n_warn} warning(s)"}[verdict]
    lines.append(head)
    if verdict == "collapse":
        first = next(f for f in findings if f.severity == "critical")
        lines.append(f"first critical: {first.signature} on {first.metric} at "
                     f"{data.step_key} {first.step}")
    if findings:
        w_step = max(len(data.step_key), *(len(str(f.step)) for f in findings))
        w_sig = max(len("signature"), *(len(f.signature) for f in findings))
        lines.append(f"  {data.step_key:>{w_step}}  {'severity':<8}  {'signature':<{w_sig}}  message")
        for f in findings:
            lines.append(f"  {str(f.step):>{w_step}}  {f.severity:<8}  {f.signature:<{w_sig}}  "
                         f"{f.message}")
    return "\n".join(lines)


def write_plot(data: LogData, findings: Sequence[Finding], out: str | os.PathLike) -> None:
    """Draw each flagged numeric metric with its thresholds and first-detection steps; atomic."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    out = os.fspath(out)
    if os.path.isdir(out):
        raise InvalidArgumentError(f"--plot={out!r}: is a directory; give a file name, "
                                   "e.g. plot.png")
    flagged = [m for m in dict.fromkeys(f.metric for f in findings)
               if m in data.columns and m not in TEXT_METRICS]
    text_findings = [f for f in findings if f.metric in TEXT_METRICS]
    metrics = flagged or [m for m in data.columns if m not in TEXT_METRICS][:4]
    rows = max(len(metrics), 1)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.6 * rows + (0.6 if text_findings else 0)),
                             squeeze=False, sharex=True)
    verdict = verdict_of(findings)
    fig.suptitle(f"{os.path.basename(data.path)}: {verdict}", fontsize=12,
                 color={"healthy": "green", "warning": "darkorange", "collapse": "red"}[verdict])
    colors = {"warning": "darkorange", "critical": "red"}
    for ax, m in zip(axes[:, 0], metrics):
        steps, values = data.series(m)
        fin = np.isfinite(values)
        ax.plot(steps[fin], values[fin], lw=1.0, color="tab:blue", label=m)
        if (~fin).any():
            y0 = float(np.min(values[fin])) if fin.any() else 0.0
            ax.plot(steps[~fin], np.full(int((~fin).sum()), y0), "x", color="red", ms=8,
                    label="non-finite")
        for k, f in enumerate(f for f in findings if f.metric == m):
            c = colors[f.severity]
            if f.threshold is not None and math.isfinite(f.threshold):
                ax.axhline(f.threshold, color=c, ls="--", lw=0.9)
            ax.axvline(f.step, color=c, ls=":", lw=1.2)
            if f.value is not None and math.isfinite(f.value) and f.signature not in _RATIO_SIGS:
                ax.plot([f.step], [f.value], "o", color=c, ms=5)
            thr = "" if f.threshold is None else f", threshold {f.threshold:.4g}"
            ax.annotate(f"{f.severity}: {f.signature} @ {f.step}{thr}", xy=(0.01, 0.97 - 0.1 * k),
                        xycoords="axes fraction", va="top", color=c, fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    axes[-1, 0].set_xlabel(data.step_key)
    if text_findings:
        fig.text(0.01, 0.005, "\n".join(f"{f.signature} @ {f.step}: {f.message}"[:140]
                                        for f in text_findings[:3]), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.025 * min(len(text_findings), 3) + 0.01 if text_findings else 0, 1, 0.97))
    directory = os.path.dirname(os.path.abspath(out))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".scan-", suffix=".png", dir=directory)
    except OSError as exc:
        plt.close(fig)
        raise InvalidArgumentError(f"--plot={out!r}: cannot write in {directory!r} "
                                   f"({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
        os.replace(tmp, out)
    except OSError as exc:
        raise InvalidArgumentError(f"--plot={out!r}: cannot write the plot "
                                   f"({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):  # only left behind when savefig or the rename failed
            os.unlink(tmp)
        plt.close(fig)


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
