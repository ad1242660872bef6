"""Owns reading training logs: ``read_log`` (JSONL, CSV, TensorBoard) into ``LogData``,
every reader's ``FILE:LINE: problem`` errors, and ``scan_file`` (read, then the
vectorised detectors).

Readers return ``LogData``: per canonical metric the record ordinals, steps and
values, ready for ``VectorisedScanner``.  JSONL values may be numbers, ``NaN``/
``Infinity`` as Python's json writes them, ``null`` (read as NaN) or the strings
``"nan"``/``"inf"``/``"-inf"``; CSV cells the same text, an empty cell meaning
"not logged"; TensorBoard event files are read with tensorboard's own
``EventAccumulator`` (scalars, and text summaries for ``sample``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from invariants._errors import InvalidArgumentError
from invariants.signatures.config import CANONICAL_METRICS, TEXT_METRICS, SignatureConfig
from invariants.signatures.drivers import VectorisedScanner
from invariants.signatures.findings import Finding, _g

FORMATS = ("auto", "jsonl", "csv", "tensorboard")
_NAN = {"nan", "+nan", "-nan"}
_INF = {"inf", "+inf", "infinity", "+infinity"}
_NINF = {"-inf", "-infinity"}


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
