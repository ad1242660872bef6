"""Owns JSONL logs: one JSON object per line, read in blocks by pyarrow's native JSON
parser, with Python's ``json`` as the slow path that decides every hard case.

Fast path (``_fast``): a block goes to ``pyarrow.json.read_json`` and comes back
as columns.  It hands the block to the slow path whenever it cannot be exact: a
``null`` token (Arrow cannot tell ``null``, which reads as NaN, from a missing key,
which means "not logged"), text in a numeric column (``"nan"``, ``"inf"``), a
boolean, a missing or non-finite step, a parse error, or a ``--map`` collision.
The slow path (``_slow``) parses the same block line by line and raises the
``FILE:LINE: problem`` error, so line numbers stay right.  Without pyarrow every
block takes the slow path.
"""
from __future__ import annotations

import io
import json

import numpy as np

from invariants.signatures.readers.columns import Block, Builder, block_from_records
from invariants.signatures.readers.stream import Source, err


def read_jsonl(src: Source, b: Builder) -> None:
    pa = _arrow()
    for first_line, chunk, newlines in src.chunks():
        block = None
        if pa is not None:
            if b.step_key is None:
                _step_key_from_first(chunk, first_line, b)
            if b.step_key is not None:
                block = _fast(pa, chunk, first_line, newlines, b)
        if block is None:
            block = _slow(src.path, chunk, first_line, b)
        b.add(block)


def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.json
    except ImportError:  # pragma: no cover - pyarrow is a dependency; the slow path still works
        return None
    return pa


def _step_key_from_first(chunk: bytes, first_line: int, b: Builder) -> None:
    for k, raw in enumerate(chunk.split(b"\n", 64)[:64]):
        if raw.strip():
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError):
                return  # the slow path names the problem
            if isinstance(rec, dict):
                b.choose_step_key(list(rec), first_line + k, rec)
            return


def _fast(pa, chunk: bytes, first_line: int, newlines: int, b: Builder) -> Block | None:
    """The block as columns, or None when only the slow path can be exact."""
    if b"null" in chunk:
        return None
    try:
        table = pa.json.read_json(io.BytesIO(chunk), read_options=pa.json.ReadOptions(
            use_threads=True, block_size=1 << 20))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    if b.step_key not in table.column_names:
        return None
    n_lines = newlines + (0 if chunk.endswith(b"\n") else 1)
    return arrow_block(pa, table, table.column_names, b, first_line, n_lines,
                       blank=lambda v: v is None or v == "", reject_inf=True)


def arrow_block(pa, table, names, b: Builder, first_line: int, n_lines: int | None, *,
                blank, reject_inf: bool) -> Block | None:
    """A parsed pyarrow table (JSONL or CSV) as a ``Block``, or None when only the slow path
    can be exact (a non-numeric or non-finite step, a text where a number belongs, a name
    collision; with ``reject_inf`` an infinity, which only the slow path tells from 1e400).
    ``blank(v)``: a text cell that means "not logged". ``n_lines``: the chunk's line count
    when row k is line first_line + k (None when rows and lines may differ)."""
    step = table.column(b.step_key)
    if step.null_count or not _is_number(pa, step.type):
        return None
    steps = step.to_numpy().astype(np.float64, copy=False)
    if not np.isfinite(steps).all():
        return None
    cols = {}
    for name in names:
        kind = b.kind(name)
        if kind is None:
            continue
        if b.collision(name):
            return None
        col = table.column(name)
        t = col.type
        if pa.types.is_null(t):
            continue
        if kind == "text":
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                return None
            values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
            rows = np.flatnonzero([not blank(v) for v in values])
            if len(rows):
                cols[name] = (rows, values[rows])
            continue
        if not _is_number(pa, t):
            return None
        if col.null_count == 0:
            rows, values = None, col.to_numpy().astype(np.float64, copy=False)
        else:
            rows = np.flatnonzero(np.asarray(col.is_valid()))
            values = col.drop_null().to_numpy().astype(np.float64, copy=False)
        if reject_inf and np.isinf(values).any():
            return None  # 1e400 or a 400-digit integer: the slow path tells them apart
        cols[name] = (rows, values)
    lines = (np.arange(first_line, first_line + len(steps))
             if n_lines == len(steps) else None)  # no blank lines: row k is line first+k
    return Block(steps, cols, first_line, lines)


def _is_number(pa, t) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _slow(path: str, chunk: bytes, first_line: int, b: Builder) -> Block:
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + chunk.count(b"\n", 0, exc.start)
        raise err(path, line, f"not UTF-8 text ({exc.reason} at byte {exc.start}); a "
                              "TensorBoard file? pass --format tensorboard") from None
    return block_from_records(b, _records(path, text, first_line))


def _records(path: str, text: str, first_line: int):
    for i, line in enumerate(text.split("\n"), first_line):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise err(path, i, f"not valid JSON ({exc.msg} at column {exc.colno}); a truncated "
                               "line?") from None
        except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
            raise err(path, i, f"not readable JSON ({str(exc).splitlines()[0][:80]})") from None
        except RecursionError:
            raise err(path, i, "JSON nested too deeply to read (expected one flat object "
                               "per line)") from None
        if not isinstance(rec, dict):
            raise err(path, i, f"expected a JSON object per line, got {type(rec).__name__}")
        yield i, rec

