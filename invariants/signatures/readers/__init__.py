"""Reading training logs: every source (file, ``-``, pipe, directory) and format
(JSONL, CSV, TensorBoard, HF ``trainer_state.json``) into ``LogData``.

- ``stream``: bytes in, peeked without loss, in bounded blocks, lines bounded.
- ``columns``: ``LogData``, the columnar ``Builder`` every reader feeds (resumed runs,
  which source name becomes which canonical metric), the slow-path record checks.
- ``names``: the metric names HF Trainer, Lightning and W&B write.
- ``jsonl``, ``csvlog``, ``tensorboard``, ``hf_state``: one reader per format.

``read_runs(path)`` finds the runs under ``path`` (a directory is searched
recursively) and reads each; ``read_log`` is the one-run form.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

from invariants._errors import InvalidArgumentError
from invariants.signatures.config import CANONICAL_METRICS
from invariants.signatures.readers.columns import Builder, LogData
from invariants.signatures.readers.stream import (LogError, Source, err, is_stream,
                                                  open_source)

FORMATS = ("auto", "jsonl", "csv", "tensorboard")
_LOG_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv"}


def check_mapping(mapping: Mapping[str, str]) -> dict[str, str]:
    mapping = dict(mapping or {})
    for new, old in mapping.items():
        if new != "step" and new not in CANONICAL_METRICS:
            raise InvalidArgumentError(
                f"--map {new}={old}: {new!r} is not a known metric; canonical names: "
                f"{', '.join(CANONICAL_METRICS)} (and step)")
    return mapping


def _sniff(src: Source) -> str:
    from invariants.signatures.readers.hf_state import looks_like_state
    head = src.peek()
    if head[12:40].find(b"brain.Event") >= 0:
        return "tensorboard"
    text = head.lstrip()
    if looks_like_state(head) and text.split(b"\n", 1)[0].strip() == b"{":
        return "trainer_state"  # a pretty-printed document, not one object per line
    if text.startswith(b"{"):
        return "jsonl"
    first = text.split(b"\n", 1)[0]
    if b"," in first and any(k.encode() in first for k in ("step", "epoch", "Step")):
        return "csv"
    raise err(src.path, None, "cannot tell the format (not .jsonl/.csv/tfevents and the content "
                              "is not recognisable); pass --format jsonl|csv|tensorboard")


def _format_by_name(path: str) -> str | None:
    p = Path(path)
    if "tfevents" in p.name:
        return "tensorboard"
    if p.name == "trainer_state.json":
        return "trainer_state"
    return _LOG_SUFFIXES.get(p.suffix.lower())


def find_runs(root: str) -> list[tuple[str, str]]:
    """``(path, format)`` of every log under ``root``, recursively, in path order.

    A directory holding event files is one TensorBoard run; ``*.jsonl``/``*.ndjson``/
    ``*.csv`` files and ``trainer_state.json`` are runs.  HF ``checkpoint-N/`` folders
    repeat their run's history: only the newest checkpoint's state is read, and none
    when the output directory has its own ``trainer_state.json``.
    """
    found: list[tuple[str, str]] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        files = sorted(files)
        if any("tfevents" in f for f in files):
            found.append((d, "tensorboard"))
        for f in files:
            fmt = _format_by_name(f)
            if fmt in ("jsonl", "csv", "trainer_state"):
                if fmt == "trainer_state" and _CHECKPOINT.match(os.path.basename(d)):
                    continue  # picked below, per output directory
                found.append((os.path.join(d, f), fmt))
        if "trainer_state.json" not in files:
            ckpts = [(int(m.group(1)), x) for x in dirs if (m := _CHECKPOINT.match(x))
                     and os.path.isfile(os.path.join(d, x, "trainer_state.json"))]
            if ckpts:
                found.append((os.path.join(d, max(ckpts)[1], "trainer_state.json"),
                              "trainer_state"))
    return sorted(found)


def read_runs(path: str | os.PathLike, fmt: str = "auto",
              mapping: Mapping[str, str] | None = None) -> list[LogData | LogError]:
    """Every run under ``path``: a ``LogData`` each, or the ``LogError`` that one raised.

    ``path`` may be a file, ``-`` (stdin), a pipe, a TensorBoard run directory, or a
    directory searched recursively.  A W&B export holding several runs gives one each.
    """
    path = os.fspath(path)
    mapping = check_mapping(mapping or {})
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"--format={fmt!r}: must be one of {', '.join(FORMATS)}")
    if path != "-" and not os.path.exists(path):
        raise err(path, None, "no such file or directory")
    if os.path.isdir(path):
        from invariants.signatures.readers.tensorboard import event_files
        if fmt not in ("auto", "tensorboard"):
            raise err(path, None, f"is a directory; --format {fmt} needs a file")
        if fmt == "tensorboard" or event_files(path):
            return [_one(path, "tensorboard", mapping)]
        runs = find_runs(path)
        if not runs:
            raise err(path, None, "no log found (searched recursively for *.jsonl, *.ndjson, "
                                  "*.csv, trainer_state.json and TensorBoard event files)")
        out: list[LogData | LogError] = []
        for p, f in runs:
            try:
                out += _read(p, f, mapping)
            except LogError as exc:
                out.append(exc)
        return out
    return _read(path, fmt, mapping)


def _one(path: str, fmt: str, mapping) -> LogData | LogError:
    try:
        (data,) = _read(path, fmt, mapping)[:1]
        return data
    except LogError as exc:
        return exc


def _read(path: str, fmt: str, mapping: Mapping[str, str]) -> list[LogData]:
    from invariants.signatures.readers import csvlog, hf_state, jsonl, tensorboard
    if fmt == "tensorboard" and os.path.isdir(path):
        b = Builder(path, "tensorboard", mapping)
        tensorboard.read_tensorboard(path, b)
        return b.done()
    src = open_source(path)
    try:
        if fmt == "auto":
            fmt = (None if is_stream(path) else _format_by_name(path)) or _sniff(src)
            if fmt == "jsonl" and path.endswith(".json") and hf_state.looks_like_state(
                    src.peek()):
                fmt = "trainer_state"
        b = Builder(src.path, fmt, mapping)
        reader = {"jsonl": jsonl.read_jsonl, "csv": csvlog.read_csv,
                  "trainer_state": hf_state.read_trainer_state}.get(fmt)
        try:
            if reader is None:
                tensorboard.read_tensorboard(path, b, src)
            else:
                reader(src, b)
        except OSError as exc:
            raise err(src.path, None, f"cannot read ({exc.strerror or exc})") from None
        return b.done()
    finally:
        src.close()


def read_log(path: str | os.PathLike, fmt: str = "auto",
             mapping: Mapping[str, str] | None = None) -> LogData:
    """Parse one run (JSONL, CSV, TensorBoard, HF ``trainer_state.json``) into series.

    Args:
      path: a file, ``-`` (stdin), a pipe, or a TensorBoard run directory.
      fmt: ``"auto"`` (by name, then content), ``"jsonl"``, ``"csv"`` or ``"tensorboard"``.
      mapping: ``{canonical_name: name_in_log}``; ``{"step": column}`` names the step.

    Raises:
      InvalidArgumentError: ``FILE[:LINE]: problem`` for anything it cannot read, or
      when ``path`` holds several runs (use ``read_runs``).
    """
    runs = read_runs(path, fmt, mapping)
    for r in runs:
        if isinstance(r, LogError):
            raise r
    if len(runs) != 1:
        raise err(os.fspath(path), None, f"holds {len(runs)} runs "
                                         f"({', '.join(r.path for r in runs[:3])}...); "
                                         "read them with read_runs")
    return runs[0]


__all__ = ["FORMATS", "LogData", "LogError", "find_runs", "read_log", "read_runs"]
