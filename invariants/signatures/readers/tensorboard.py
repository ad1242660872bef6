"""Owns TensorBoard event files: a run directory's ``*tfevents*`` files (in name order,
which is write order) or one event file, streamed record by record.

Records are framed as TFRecords (length, length CRC, ``Event`` proto, data CRC) and
parsed with tensorboard's own ``Event`` protobuf; only the values are kept (8 bytes
each), never the events, so memory does not grow with the events' overhead the way
``EventAccumulator`` does.  Scalars come from ``simple_value`` (torch, tensorboardX,
HF Trainer, Lightning) or scalar tensors (TF2); text summaries (``<tag>/text_summary``)
give ``sample``.  Events of one step form one record; a step that goes back (a run
resumed from a checkpoint, often in a new event file) starts a resumed segment
(``columns.Builder``).  A file that ends inside a record, or a record that is not an
``Event``, is an error: a finished log that stops early is bad input.  The data
CRC is not checked (pure-Python CRC32C would cost more than the parse).
"""
from __future__ import annotations

import os
import struct

import numpy as np

from invariants.signatures.readers.columns import Block, Builder
from invariants.signatures.readers.stream import Source, err, open_source

_ROWS_PER_BLOCK = 65536
_MAX_RECORD = 256 << 20


def event_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path))
                if "tfevents" in f and os.path.isfile(os.path.join(path, f))]
    return [path]


def read_tensorboard(path: str, b: Builder, src: Source | None = None) -> None:
    b.step_key = "step"
    files = event_files(path)
    if not files:
        raise err(path, None, "no scalar or text events found (is this a TensorBoard log "
                              "directory or event file?)")
    acc = _Rows(b)
    for f in files:
        s = src if src is not None else open_source(f)
        try:
            _read_file(s, acc)
        finally:
            if src is None:
                s.close()
    acc.flush()
    if acc.events == 0:
        raise err(path, None, "no scalar or text events found (is this a TensorBoard log "
                              "directory or event file?)")


class _Rows:
    """Groups events into records (one per step run) and hands ``Block``s to the builder."""

    def __init__(self, b: Builder):
        self.b = b
        self.steps: list[float] = []
        self.rows: dict[str, list[int]] = {}
        self.vals: dict[str, list] = {}
        self.events = 0
        self._last: set[str] = set()

    def put(self, step: float, key: str, value) -> None:
        if not self.steps or self.steps[-1] != step or key in self._last:
            if len(self.steps) >= _ROWS_PER_BLOCK:
                self.flush()
            self.steps.append(step)
            self._last = set()
        self._last.add(key)
        r = self.rows.get(key)
        if r is None:
            r = self.rows[key] = []
            self.vals[key] = []
        r.append(len(self.steps) - 1)
        self.vals[key].append(value)
        self.events += 1

    def flush(self) -> None:
        if not self.steps:
            return
        n = len(self.steps)
        cols = {}
        for key, r in self.rows.items():
            dtype = object if self.b.kind(key) == "text" else np.float64
            cols[key] = (None if len(r) == n else np.asarray(r, dtype=np.int64),
                         np.asarray(self.vals[key], dtype=dtype))
        self.b.add(Block(np.asarray(self.steps, dtype=np.float64), cols))
        self.steps, self.rows, self.vals = [], {}, {}


def _read_file(src: Source, acc: _Rows) -> None:
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    parse = event_pb2.Event.FromString
    unpack = struct.Struct("<Q").unpack_from
    path = src.path
    buf = b""
    off = 0
    n = 0
    kind = acc.b.kind
    while True:
        if len(buf) - off < 12:
            more = src.read(4 << 20)
            buf = buf[off:] + more
            off = 0
            if not more:
                if buf:
                    raise err(path, None, f"truncated or corrupt TensorBoard event file: "
                                          f"{len(buf)} stray bytes after record {n}")
                return
            continue
        (length,) = unpack(buf, off)
        if length > _MAX_RECORD:
            raise err(path, None, f"truncated or corrupt TensorBoard event file: record {n + 1} "
                                  f"claims {length} bytes")
        end = off + 12 + length + 4
        if end > len(buf):
            more = src.read(max(4 << 20, end - len(buf)))
            if not more:
                raise err(path, None, f"truncated or corrupt TensorBoard event file: record "
                                      f"{n + 1} is cut off ({len(buf) - off} of {end - off} bytes)")
            buf = buf[off:] + more
            off = 0
            continue
        try:
            ev = parse(buf[off + 12:end - 4])
        except DecodeError as exc:
            raise err(path, None, f"truncated or corrupt TensorBoard event file: record {n + 1} "
                                  f"is not an Event ({exc})") from None
        off = end
        n += 1
        if not ev.HasField("summary"):
            continue
        step = float(ev.step)
        for v in ev.summary.value:
            tag = v.tag.removesuffix("/text_summary")
            k = kind(tag)
            if k is None:
                continue
            which = v.WhichOneof("value")
            if which == "simple_value" and k == "number":
                acc.put(step, tag, v.simple_value)
            elif which == "tensor":
                value = _tensor_value(v.tensor, k)
                if value is not None:
                    acc.put(step, tag, value)


def _tensor_value(proto, kind: str):
    from tensorboard.util import tensor_util
    arr = tensor_util.make_ndarray(proto)
    if kind == "text" and arr.dtype.kind in "SO" and arr.size >= 1:
        v = arr.reshape(-1)[0]
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    if kind == "number" and arr.size == 1 and arr.dtype.kind in "fiu":
        return float(arr.reshape(-1)[0])
    return None
