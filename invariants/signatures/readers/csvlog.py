"""Owns CSV logs (Lightning's CSVLogger ``metrics.csv``, W&B exports, hand-written):
a header row, then one record per row; an empty cell means "not logged".

Blocks end at a record end (a newline after an even number of quote characters),
go to ``pyarrow.csv.read_csv`` with the header's names, and fall back to Python's
``csv`` module (the slow path, which raises the ``FILE:LINE: problem`` errors)
whenever a block has a short row, text in a numeric column, a ``--map`` collision or
anything else Arrow cannot read exactly.
"""
from __future__ import annotations

import csv
import io

import numpy as np

from invariants.signatures.readers.columns import Block, Builder, block_from_records
from invariants.signatures.readers.jsonl import _arrow, arrow_block
from invariants.signatures.readers.stream import Source, err


def read_csv(src: Source, b: Builder) -> None:
    pa = _arrow()
    if pa is not None:
        import pyarrow.csv  # noqa: F401
    header: list[str] | None = None
    records = 0
    for first_line, chunk, newlines in src.chunks(quoted=True):
        text = _decode(src.path, chunk, first_line)
        if header is None:
            header, skip_lines, body_off = _header(src.path, text, first_line)
            b.choose_step_key(header, first_line + skip_lines, None)
            first_line += skip_lines + 1
            chunk = chunk[len(text[:body_off].encode("utf-8")):]
            text = text[body_off:]
            newlines = chunk.count(b"\n")
        block = (_fast(pa, chunk, first_line, newlines, header, b) if pa is not None
                 else None)
        if block is None:
            block = block_from_records(b, _rows(src.path, text, first_line, header))
        records += len(block.steps)
        b.add(block)
    if header is not None and records == 0:
        raise err(src.path, None, "a header but no records")


def _decode(path: str, chunk: bytes, first_line: int) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise err(path, first_line + chunk.count(b"\n", 0, exc.start),
                  f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _header(path: str, text: str, first_line: int) -> tuple[list[str], int, int]:
    """(names, blank lines before it, offset of the first data character)."""
    off, skipped = 0, 0
    while True:
        end = text.find("\n", off)
        while end >= 0 and text.count('"', off, end) % 2:
            end = text.find("\n", end + 1)
        line = text[off:] if end < 0 else text[off:end]
        if line.strip() or end < 0:
            break
        off, skipped = end + 1, skipped + 1
    try:
        row = next(csv.reader([line.rstrip("\r")]), [])
    except csv.Error as exc:
        raise err(path, first_line + skipped, f"not valid CSV ({exc})") from None
    header = [c.strip() for c in row]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise err(path, first_line + skipped, f"duplicate column names in the header: "
                                              f"{', '.join(repr(d) for d in dup[:5])}")
    return header, skipped, (len(text) if end < 0 else end + 1)


def _fast(pa, chunk: bytes, first_line: int, newlines: int, header: list[str],
          b: Builder) -> Block | None:
    if not chunk.strip():
        return Block(np.zeros(0), {})
    try:
        table = pa.csv.read_csv(
            io.BytesIO(chunk),
            read_options=pa.csv.ReadOptions(column_names=header, use_threads=True,
                                            block_size=1 << 20),
            parse_options=pa.csv.ParseOptions(newlines_in_values=True),
            convert_options=pa.csv.ConvertOptions(null_values=[""], strings_can_be_null=True,
                                                  quoted_strings_can_be_null=True))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    n_lines = newlines + (0 if chunk.endswith(b"\n") else 1)
    return arrow_block(pa, table, header, b, first_line,
                       None if b'"' in chunk else n_lines,   # a quoted newline: rows != lines
                       blank=lambda v: v is None or v.strip() == "", reject_inf=False)


def _rows(path: str, text: str, first_line: int, header: list[str]):
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            line = first_line + reader.line_num - 1
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise err(path, line, f"{len(row)} fields but the header has {len(header)}; "
                                      "a truncated line?")
            yield line, {k: v for k, v in zip(header, row) if v.strip() != ""}
    except csv.Error as exc:
        raise err(path, first_line + reader.line_num - 1, f"not valid CSV ({exc})") from None
