"""Owns turning parsed blocks of records into ``LogData``: the columnar store every
reader feeds, resumed runs, and which source name becomes which canonical metric.

A reader hands ``Builder.add`` a ``Block``: the steps of its records (float64) and,
per source key, the rows that carry it (``None``: every row) and their values
(float64, or ``object`` for text).  Memory is the values themselves plus 8 bytes a
record for the step: a dense metric shares the record steps and ordinals.

Resumed runs: a step lower than the previous one starts a resumed segment; the
earlier records at steps >= that step are dropped (the newer data wins) and a note
says so.  ``done()`` picks, per canonical metric, the best-ranked source name
(``names.resolve``; ``--map`` ranks first) and splits W&B exports holding several
runs (``<run> - <metric>`` columns) into one ``LogData`` each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from invariants.signatures.config import CANONICAL_METRICS, TEXT_METRICS
from invariants.signatures.findings import _g
from invariants.signatures.readers import names
from invariants.signatures.readers.stream import cut, err, short


@dataclass
class LogData:
    """A parsed log: ``columns[metric] = (pos, steps, values)`` in record order."""

    path: str
    format: str
    records: int
    step_key: str
    columns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # resumed segments, names read via aliases

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        _, steps, values = self.columns[metric]
        return np.asarray(steps, dtype=np.float64), (
            np.asarray(values, dtype=object) if metric in TEXT_METRICS
            else np.asarray(values, dtype=np.float64))


@dataclass
class Block:
    """Parsed records: ``steps`` (n,), ``cols[key] = (rows or None, values)``."""

    steps: np.ndarray
    cols: dict[str, tuple[np.ndarray | None, np.ndarray]]
    first_line: int | None = None  # line of the first record, when known
    lines: np.ndarray | None = None  # line of each record, when known

    def line_of(self, row: int) -> int | None:
        if self.lines is not None:
            return int(self.lines[row])
        return None

    def take(self, lo: int, hi: int) -> Block:
        cols = {}
        for k, (rows, v) in self.cols.items():
            if rows is None:
                cols[k] = (None, v[lo:hi])
            else:
                a, b = np.searchsorted(rows, (lo, hi))
                if b > a:
                    cols[k] = (rows[a:b] - lo, v[a:b])
        return Block(self.steps[lo:hi], cols, None,
                     None if self.lines is None else self.lines[lo:hi])


_NAN = {"nan", "+nan", "-nan"}
_INF = {"inf", "+inf", "infinity", "+infinity"}
_NINF = {"-inf", "-infinity"}


def number(v: Any, path: str, line: int | None, key: str) -> float:
    """One value as a float: numbers, None (NaN), "nan"/"inf" text; else ``FILE:LINE`` error."""
    if v is None:
        return math.nan
    if isinstance(v, bool):
        raise err(path, line, f"{cut(key, 80)}={v!r}: not a number")
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:  # a JSON integer beyond float range (e.g. 400 digits)
            digits = len(str(abs(v)))
            raise err(path, line, f"{cut(key, 80)}={str(v)[:20]}...: integer too large for a "
                                  f"float ({digits} digits)") from None
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
    raise err(path, line, f"{cut(key, 80)}={short(v)}: not a number (numbers, NaN/Infinity, "
                          "null or \"nan\"/\"inf\" are accepted)")


def block_from_records(b: "Builder", records: Iterable[tuple[int | None, Mapping[str, Any]]]
                       ) -> Block:
    """The slow path and the authority on errors: validate each record, build a ``Block``."""
    path = b.path
    steps: list[float] = []
    lines: list[int] = []
    known = True
    rows: dict[str, list[int]] = {}
    vals: dict[str, list] = {}
    for line, rec in records:
        if b.step_key is None:
            b.choose_step_key(rec.keys(), line, rec)
        sk = b.step_key
        if sk not in rec:
            raise err(path, line, f"no {sk!r} key (the first record has one) in {short(rec)}")
        step = number(rec[sk], path, line, sk)
        if not math.isfinite(step):
            raise err(path, line, f"{sk}={short(rec[sk])}: must be finite")
        i = len(steps)
        steps.append(step)
        if known and isinstance(line, int):
            lines.append(line)
        else:
            known = False
        for key, v in rec.items():
            kind = b.kind(key)
            if kind is None:
                continue
            problem = b.collision(key)
            if problem:
                raise err(path, line, problem)
            if kind == "text":
                if v is None or v == "":
                    continue
                if not isinstance(v, str):
                    raise err(path, line, f"{cut(key, 80)}={short(v)}: a sample must be text")
                value: Any = v
            else:
                value = number(v, path, line, key)
            r = rows.get(key)
            if r is None:
                r = rows[key] = []
                vals[key] = []
            r.append(i)
            vals[key].append(value)
    n = len(steps)
    cols = {}
    for key, r in rows.items():
        v = vals[key]
        arr = (np.array(v, dtype=object) if b.kind(key) == "text"
               else np.array(v, dtype=np.float64))
        cols[key] = (None if len(r) == n else np.array(r, dtype=np.int64), arr)
    return Block(np.array(steps, dtype=np.float64), cols, lines[0] if lines else None,
                 np.array(lines, dtype=np.int64) if known and lines else None)


class Builder:
    """Collects blocks; ``kind(key)`` tells a reader how to parse a key's values."""

    def __init__(self, path: str, fmt: str, mapping: Mapping[str, str]):
        self.path = path
        self.fmt = fmt
        self.mapping = {k: v for k, v in mapping.items() if k != "step"}
        self.step_map = mapping.get("step")
        self.rename = {old: new for new, old in self.mapping.items()}
        self.step_key: str | None = None
        self._blocks: list[Block] = []
        self._n = 0
        self._prev = -np.inf
        self._kinds: dict[str, str | None] = {}
        self.ignored: set[str] = set()
        self.notes: list[str] = []

    # -- what a key is -------------------------------------------------------------------
    def canonical(self, key: str) -> tuple[str, int] | None:
        if key in self.rename:
            return self.rename[key], -1
        metric = names.split_run(key)[1]
        if metric in self.rename:
            return self.rename[metric], -1
        return names.resolve(metric)

    def kind(self, key: str) -> str | None:
        """``"text"``, ``"number"`` or ``None`` (not a metric: ignored)."""
        k = self._kinds.get(key, "?")
        if k == "?":
            if key == self.step_key or key in ("step", "epoch"):
                k = None
            else:
                hit = self.canonical(key)
                k = None if hit is None else ("text" if hit[0] in TEXT_METRICS else "number")
            if k is None and key not in ("step", "epoch", self.step_key):
                self.ignored.add(key)
            self._kinds[key] = k
        return k

    def collision(self, key: str) -> str | None:
        """The problem when ``key`` is a canonical name that ``--map`` also fills."""
        if key in self.mapping and key not in self.rename:
            return (f"--map {key}={self.mapping[key]}: the log already has a {key!r} column")
        return None

    def choose_step_key(self, keys, line: int | None, first: Mapping | None = None) -> str:
        """The step column, from the first record's (or header's) keys."""
        keys = list(keys)
        if self.step_map is not None:
            if self.step_map not in keys:
                raise err(self.path, line, f"--map step={self.step_map}: no {self.step_map!r} "
                                           f"key in the first record {short(first or keys)}")
            self.step_key = self.step_map
        else:
            self.step_key = next((k for k in names.STEP_KEYS if k in keys), None)
            if self.step_key is None:
                raise err(self.path, line, f"no 'step' or 'epoch' key in {short(first or keys)}; "
                                           "every record needs one (or name it: --map step=COLUMN)")
        self._kinds[self.step_key] = None
        return self.step_key

    # -- collecting ----------------------------------------------------------------------
    def add(self, block: Block) -> None:
        n = len(block.steps)
        if n == 0:
            return
        steps = block.steps
        bounds = [0] + (np.flatnonzero(np.diff(steps) < 0) + 1).tolist() + [n]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = block if (lo, hi) == (0, n) else block.take(lo, hi)
            if part.steps[0] < self._prev:
                self._resume(float(part.steps[0]), block.line_of(lo))
            self._blocks.append(part)
            self._n += hi - lo
            self._prev = float(part.steps[-1])

    def _resume(self, step: float, line: int | None) -> None:
        dropped = 0
        while self._blocks and self._blocks[-1].steps[0] >= step:
            dropped += len(self._blocks.pop().steps)
        if self._blocks:
            last = self._blocks[-1]
            cut = int(np.searchsorted(last.steps, step, "left"))
            dropped += len(last.steps) - cut
            self._blocks[-1] = last.take(0, cut)
        self._n -= dropped
        where = f" (line {line})" if line is not None else ""
        self.notes.append(f"resumed run: {self.step_key} went back to {_g(step)}{where}; "
                          f"{dropped} earlier record(s) at {self.step_key} >= {_g(step)} "
                          "replaced by the newer data")

    # -- the result ----------------------------------------------------------------------
    def done(self) -> list[LogData]:
        if self._n == 0 and not self.notes:
            raise err(self.path, None, "empty log: no records")
        keys = list(dict.fromkeys(k for b in self._blocks for k in b.cols))
        seen = set(keys) | self.ignored
        seen_metrics = seen | {names.split_run(k)[1] for k in seen}
        for new, old in self.mapping.items():
            if old not in seen_metrics:
                raise err(self.path, None, f"--map {new}={old}: no metric {short(old)} in the log")
        runs: dict[str, dict[str, tuple[int, str]]] = {}  # run -> canonical -> (rank, key)
        losers: dict[str, list[str]] = {}
        for key in keys:
            hit = self.canonical(key)
            if hit is None:
                continue
            run = names.split_run(key)[0]
            best = runs.setdefault(run, {}).get(hit[0])
            if best is None or (hit[1], key) < best:
                if best is not None:
                    losers.setdefault(run, []).append(best[1])
                runs[run][hit[0]] = (hit[1], key)
            else:
                losers.setdefault(run, []).append(key)
        if not runs:
            ign = sorted(self.ignored)
            listed = ", ".join(cut(k, 40) for k in ign[:12]) + (
                f" and {len(ign) - 12} more" if len(ign) > 12 else "")
            raise err(self.path, None,
                      f"no known metric in {self._n} records (ignored: {listed or 'nothing'}); "
                      f"canonical names: {', '.join(CANONICAL_METRICS)}; map yours with "
                      "--map canonical=yours")
        offsets = np.cumsum([0] + [len(b.steps) for b in self._blocks])
        steps = (np.concatenate([b.steps for b in self._blocks]) if self._blocks
                 else np.zeros(0))
        for b in self._blocks:
            b.steps = b.steps[:0]  # each block's data is released as soon as it is copied
        pos = np.arange(len(steps), dtype=np.int64)
        out = []
        for run in sorted(runs):
            cols: dict[str, tuple] = {}
            used_rows = []
            for canon, (_, key) in sorted(runs[run].items()):
                col = self._column(key, offsets, steps, pos)
                if col is not None:
                    cols[canon] = col
                    used_rows.append(col[0])
            if not cols:
                continue
            notes = list(self.notes)
            aliased = [f"{c} <- {cut(k, 50)}" for c, (_, k) in sorted(runs[run].items())
                       if c != k and c in cols]
            if aliased:
                notes.append("read " + ", ".join(aliased))
            ignored = sorted(set(self.ignored) | set(losers.get(run, []))
                             | {k for r, m in runs.items() if r != run for _, k in m.values()})
            records = (len(steps) if len(runs) == 1 else
                       len(np.unique(np.concatenate(used_rows))))
            path = self.path if len(runs) == 1 else f"{self.path}#{run or '(no run)'}"
            out.append(LogData(path, self.fmt, records, self.step_key or "step", cols,
                               [k for k in ignored if not names.is_band(k)] if len(runs) > 1
                               else ignored, notes))
        if not out:
            raise err(self.path, None, f"no values for any known metric in {self._n} records")
        return out

    def _column(self, key, offsets, steps, pos):
        parts_rows, parts_vals, dense = [], [], True
        for b, off in zip(self._blocks, offsets):
            c = b.cols.pop(key, None)
            if c is None:
                dense = False
                continue
            rows, vals = c
            dense = dense and rows is None
            parts_rows.append(off + (np.arange(len(vals)) if rows is None else rows))
            parts_vals.append(vals)
        if not parts_vals:
            return None
        values = np.concatenate(parts_vals)
        if dense and len(values) == len(steps):
            return pos, steps, values
        rows = np.concatenate(parts_rows)
        if len(rows) == 0:
            return None
        return pos[rows], steps[rows], values
