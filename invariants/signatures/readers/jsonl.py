"""Owns JSONL logs: one JSON object per line, read in blocks by pyarrow's native JSON
parser, with Python's ``json`` as the slow path that decides every hard case.

Fast path (``_fast``): a block goes to ``pyarrow.json.read_json`` and comes back
as columns.  It hands the block to the slow path whenever it cannot be exact: a
``null`` token in a block where a column it reads has nulls (Arrow cannot tell
``null``, which reads as NaN, from a missing key, which means "not logged"; such a block
is parsed twice), text in a numeric column (``"nan"``, ``"inf"``), a
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
    try:
        table = pa.json.read_json(io.BytesIO(chunk), read_options=pa.json.ReadOptions(
            use_threads=True, block_size=1 << 20))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    if b.step_key not in table.column_names:
        return None
    # a null in a column we read is a `null` token or a missing key, and only the slow path
    # tells them apart; the byte scan for the token runs only then (a dense log skips it)
    if any(table.column(n).null_count for n in table.column_names
           if n == b.step_key or b.kind(n) is not None) and b"null" in chunk:
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
    steps = _numpy(step).astype(np.float64, copy=False)
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
            values = np.asarray(col.to_pylist(), dtype=object)
            rows = np.flatnonzero([not blank(v) for v in values])
            if len(rows):
                cols[name] = (rows, values[rows])
            continue
        if not _is_number(pa, t):
            return None
        if col.null_count == 0:
            rows, values = None, _numpy(col).astype(np.float64, copy=False)
        else:
            rows = np.flatnonzero(_numpy(col.is_valid()))
            values = _numpy(col.drop_null()).astype(np.float64, copy=False)
        if reject_inf and np.isinf(values).any():
            return None  # 1e400 or a 400-digit integer: the slow path tells them apart
        cols[name] = (rows, values)
    lines = (np.arange(first_line, first_line + len(steps))
             if n_lines == len(steps) else None)  # no blank lines: row k is line first+k
    return Block(steps, cols, first_line, lines)


# pyarrow type name -> numpy dtype of its values buffer (fixed width, little-endian as numpy's)
_DTYPES = {"double": np.float64, "float": np.float32, "halffloat": np.float16,
           "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
           "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8}


def _numpy(col) -> np.ndarray:
    """A numeric or boolean pyarrow (chunked) array WITHOUT nulls as numpy, read from its
    buffers (zero copy for one chunk, read-only like pyarrow's own zero-copy ``to_numpy``).

    pyarrow's ``to_numpy`` / ``__array__`` import pandas whenever it is installed: 0.2 s and
    40 MB of every ``invariants scan`` process (measured: 10^5 JSONL records 0.19 s -> 0.37 s,
    peak memory 58 -> 101 MB over baseline), for nothing the reader uses."""
    parts = []
    for c in getattr(col, "chunks", [col]):
        n, off, name = len(c), c.offset, str(c.type)
        if name == "bool":          # bit-packed, least significant bit first
            bits = np.unpackbits(np.frombuffer(c.buffers()[1], np.uint8), bitorder="little") \
                if n else np.zeros(0, np.uint8)
            parts.append(bits[off:off + n].astype(bool))
        elif name in _DTYPES:
            dt = np.dtype(_DTYPES[name])
            parts.append(np.frombuffer(c.buffers()[1], dt, count=n, offset=off * dt.itemsize)
                         if n else np.zeros(0, dt))
        else:                       # pragma: no cover - a type the readers never produce
            parts.append(c.to_numpy(zero_copy_only=False))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0)


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

