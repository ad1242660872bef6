"""Owns ``CollapseGuard``: the streaming signature detectors, dropped into a
training loop (with ``CollapseWarning`` and ``CollapseDetected``), and the
buffer that keeps it free of per-step host-device syncs.

    guard = CollapseGuard(mode="stop")
    for step, batch in enumerate(loader):
        loss = ...
        guard.update(step, {"loss": loss, "grad_norm": gn, "lora_norm": lora_norm})
        if guard.should_stop:
            break
    guard.flush()                      # the last partial buffer (or use ``with guard:``)

Each new finding is reported once (first step it is detectable).  Modes:
``"warn"`` emits a ``CollapseWarning`` per new finding; ``"stop"`` also sets
``should_stop`` when a finding at or above ``stop_on`` severity appears (the
loop decides what to do); ``"raise"`` raises ``CollapseDetected`` instead.

Tensor values are never read one step at a time: each update's tensors are
copied into one small tensor on their device (``torch.stack``), and every
``sync_every`` updates all of them are read to the host at once
(``torch.cat(...).tolist()``, one transfer per device) and pushed through the
streaming detectors in step order, so the findings (and their steps) are those
of ``sync_every=1``.  Python numbers, with nothing buffered, go straight through.
Memory is constant per metric (plus at most ``sync_every`` buffered updates).
Costs: bench/bench_guard.py; the choice of ``DEFAULT_SYNC_EVERY``: docs/signatures.md.
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any, Mapping

import torch

from invariants._errors import InvalidArgumentError
from invariants._validate import require, require_scalar_tensor, require_sync_every
from invariants.signatures.config import CANONICAL_METRICS, SignatureConfig
from invariants.signatures.drivers import StreamingScanner, _check_metric
from invariants.signatures.findings import Finding, verdict_of

__all__ = ["DEFAULT_SYNC_EVERY", "CollapseDetected", "CollapseGuard", "CollapseWarning"]

# Measured (bench/bench_guard.py, docs/signatures.md "Host reads"): with 0-d tensors the
# cost per update is flat from 8 on, and 16 keeps the detection delay at <= 15 steps.
DEFAULT_SYNC_EVERY = 16

_MODES = ("warn", "stop", "raise")
_RANK = {"warning": 0, "critical": 1}
_CANONICAL = frozenset(CANONICAL_METRICS)
_NONFINITE_TEXT = frozenset({"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity",
                             "+infinity", "-infinity"})
_FAST_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16,
                          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})
_FLOAT_MAX = 1.7976931348623157e308


class CollapseWarning(UserWarning):
    """A collapse signature was detected (``CollapseGuard`` in ``"warn"``/``"stop"`` mode)."""


class CollapseDetected(RuntimeError):
    """Raised by ``CollapseGuard(mode="raise")``; ``findings`` lists what triggered it."""

    def __init__(self, message: str, findings: list[Finding]):
        super().__init__(message)
        self.findings = findings


def _host_value(name: str, raw: Any) -> Any:
    """A non-tensor value as the streaming driver will read it (validated here, at the
    update that logs it, not at the later sync)."""
    if name == "sample":
        require(raw is None or isinstance(raw, str), "metrics['sample']", raw, "must be a str")
        return raw
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        if not -_FLOAT_MAX <= raw <= _FLOAT_MAX:  # a Python int beyond float range
            raise InvalidArgumentError(
                f"metrics[{name!r}]={raw!r:.40}: integer too large for a float")
        return float(raw)
    if isinstance(raw, (bool, bytes)) or (
            isinstance(raw, str) and raw.strip().lower() not in _NONFINITE_TEXT):
        raise InvalidArgumentError(f"metrics[{name!r}]={raw!r}: must be a number (or NaN/Inf/None)")
    try:
        return float(raw)  # numpy scalars, "nan"/"inf" text
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"metrics[{name!r}]={raw!r}: must be a number (or NaN/Inf/None)") from None


class CollapseGuard:
    """Watch a live run for collapse signatures.

    Args:
      config: thresholds (``SignatureConfig``); defaults are the seeds' numbers.
      mode: ``"warn"``, ``"stop"`` (sets ``should_stop``) or ``"raise"``.
      stop_on: the lowest severity that stops/raises: ``"critical"`` (default) or ``"warning"``.
      metric_map: ``{canonical_name: your_name}`` for metrics you log under other names.
      ignore_unknown: drop metrics that are neither canonical nor mapped, instead of raising.
      sync_every: tensor values are read to the host once every ``sync_every`` updates
        (default ``DEFAULT_SYNC_EVERY`` = 16). A finding then surfaces (warning,
        ``should_stop``, ``CollapseDetected``) up to ``sync_every - 1`` updates after the
        step it belongs to; its ``step`` is still the true step at which it was detectable.
        1 reads every step (no delay, one host-device sync per step on a GPU). Measured
        cost per update for 1/8/32/64: bench/bench_guard.py and docs/signatures.md.

    Call ``flush()`` after the loop (or use the guard as a context manager) so the last
    partial buffer is scanned; ``findings``, ``verdict`` and ``should_stop`` reflect what
    has been read so far.

    Attributes:
      findings: every finding so far, in detection order.
      should_stop: True once a finding at or above ``stop_on`` appeared (mode ``"stop"``).
    """

    def __init__(self, config: SignatureConfig | None = None, *, mode: str = "warn",
                 stop_on: str = "critical", metric_map: Mapping[str, str] | None = None,
                 ignore_unknown: bool = False, sync_every: int = DEFAULT_SYNC_EVERY):
        require(config is None or isinstance(config, SignatureConfig), "config", config,
                "must be a SignatureConfig or None")
        require(mode in _MODES, "mode", mode, f"must be one of {_MODES}")
        require(stop_on in _RANK, "stop_on", stop_on, "must be 'warning' or 'critical'")
        require(metric_map is None or isinstance(metric_map, Mapping), "metric_map", metric_map,
                "must be a mapping {canonical_name: your_name} or None")
        require_sync_every(sync_every)
        rename: dict[str, str] = {}
        for canon, theirs in (metric_map or {}).items():
            require(canon in CANONICAL_METRICS, "metric_map", canon,
                    f"keys must be canonical metric names: {', '.join(CANONICAL_METRICS)}")
            require(isinstance(theirs, str), f"metric_map[{canon!r}]", theirs, "must be a str")
            rename[theirs] = canon
        self._rename = rename
        self._ignore = bool(ignore_unknown)
        self._scanner = StreamingScanner(config)
        self.config = self._scanner.config
        self.mode = mode
        self.stop_on = stop_on
        self.sync_every = sync_every
        self.should_stop = False
        self._last_step: int | float = -math.inf
        self._records: list[tuple] = []   # (step, keys, values, slots), not read yet
        self._chunks: dict[torch.device, list[torch.Tensor]] = {}   # per device, on device
        self._fill: dict[torch.device, int] = {}                    # values per device so far
        self._ready: deque = deque()      # read, not yet pushed (left by a CollapseDetected)

    @property
    def findings(self) -> list[Finding]:
        return self._scanner.findings

    @property
    def verdict(self) -> str:
        """``"healthy"``, ``"warning"`` or ``"collapse"`` so far (call ``flush()`` first
        for the buffered steps)."""
        return verdict_of(self._scanner.findings)

    @property
    def pending(self) -> int:
        """Updates logged but not yet pushed through the detectors."""
        return len(self._records) + len(self._ready)

    def __enter__(self) -> "CollapseGuard":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.flush()
        else:  # the loop failed: scan what it logged, but do not mask its exception
            try:
                self.flush()
            except CollapseDetected:
                pass
        return False

    def update(self, step: int | float, metrics: Mapping[str, Any]) -> list[Finding]:
        """Log one step; returns the findings that became known during this call.

        Values may be floats, ints, one-element real tensors on any device (not read
        here), NaN/Inf/None (reported as ``non_finite``), and a ``str`` for ``sample``.
        With tensors, the returned findings are those of the buffered steps read at this
        call (every ``sync_every``-th), else ``[]``; with Python numbers and nothing
        buffered, those of this step. A tensor ``step`` is read on the host: pass an int.

        Raises:
          InvalidArgumentError: unknown metric name (unless mapped or ignored); a value
            that is not a number (bool, str, bytes, an int beyond float range, a complex,
            bool, meta or multi-element tensor); a step that is not a finite number, is a
            bool or an int beyond float range, or is below the previous step. Nothing is
            logged by an update that raises it.
          CollapseDetected: mode ``"raise"`` and a finding at or above ``stop_on``.
        """
        if metrics.__class__ is not dict:
            require(isinstance(metrics, Mapping), "metrics", metrics, "must be a mapping")
        step = self._check_step(step)
        rename, ignore = self._rename, self._ignore
        keys: list[str] = []
        vals: list[Any] = []
        tvals: list[torch.Tensor] | None = None   # this update's tensors, and where they go
        tidx: list[int] = []
        odd = False                               # tensors of several dtypes
        same = not (rename or ignore)             # metrics can be handed over unchanged
        for k, v in metrics.items():
            if rename:
                k = rename.get(k, k)
            if k not in _CANONICAL:
                if ignore:
                    continue
                if rename:
                    raise InvalidArgumentError(
                        f"metric={k!r}: unknown; canonical names are {', '.join(CANONICAL_METRICS)}"
                        " (pass metric_map={canonical: yours} or ignore_unknown=True)")
                _check_metric(k)
            if v.__class__ is not float or k == "sample":
                if isinstance(v, torch.Tensor):   # checked in _stage, on the stacked copy
                    if k == "sample":
                        require(False, "metrics['sample']", v, "must be a str")
                    dt = v.dtype
                    if tvals is None:
                        tvals, dt0 = [v], dt
                    else:
                        tvals.append(v)
                        if dt is not dt0:
                            odd = True
                    tidx.append(len(vals))
                else:
                    x = _host_value(k, v)
                    same = same and x is v
                    v = x
            keys.append(k)
            vals.append(v)
        if tvals is None:
            self._last_step = step
            if not self._records and not self._ready:   # nothing buffered: straight through
                new = self._scanner.update(step, metrics if same else dict(zip(keys, vals)))
                if new:
                    self._act(new, 3)
                return new
            groups = None
        else:
            groups = self._stage(tvals, tidx, keys, odd or dt0 not in _FAST_DTYPES)
            self._last_step = step
            if len(tvals) == len(vals) and len(groups) == 1:
                vals = None                      # every value is in the one chunk, in order
        self._records.append((step, keys, vals, groups))
        if len(self._records) >= self.sync_every:
            self._read()
        return self._drain() if self._ready else []

    def flush(self) -> list[Finding]:
        """Read every buffered value to the host (one transfer per device) and push the
        buffered steps through the detectors in order; returns the findings new here.

        Raises:
          CollapseDetected: mode ``"raise"`` and a buffered step produced a finding at or
            above ``stop_on`` (the steps after it stay buffered for the next call).
        """
        self._read()
        return self._drain()

    # ------------------------------------------------------------------ internals
    def _check_step(self, step: Any) -> int | float:
        cls = step.__class__
        if cls is int:
            if not -_FLOAT_MAX <= step <= _FLOAT_MAX:
                raise InvalidArgumentError(f"step={step!r:.40}: integer too large for a float")
        elif cls is not float:
            require(not isinstance(step, (bool, str, bytes)) and hasattr(step, "__float__"),
                    "step", step, "must be a number")
            try:
                step = float(step)  # numpy scalars, 0-d tensors (read on the host)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise InvalidArgumentError(f"step={step!r:.60}: must be a number") from None
        require(step >= self._last_step, "step", step,
                f"must be non-decreasing (previous step was {self._last_step}); finite")
        require(-math.inf < step < math.inf, "step", step, "must be finite")
        return step

    def _stage(self, tvals: list[torch.Tensor], tidx: list[int], keys: list[str],
               odd: bool) -> list[tuple]:
        """Copy this update's tensors into one tensor per device, reading no value; returns
        the groups ``(device, position in the device's values, indices in the record)``.

        The usual update (one device, one dtype, 0-d) is one ``torch.stack`` whose result is
        checked once; anything else is checked tensor by tensor (raising before anything is
        buffered) and copied as float64 (exact) per device.
        """
        if not odd:
            try:
                chunk = torch.stack(tvals)  # a copy: later in-place edits do not leak in
            except RuntimeError:            # several devices, or one-element shapes differ
                chunk = None
            if chunk is not None and chunk.numel() == len(tvals) and not chunk.is_meta:
                if chunk.requires_grad:
                    chunk = chunk.detach()  # drop the graph: only the values are kept
                if chunk.dim() != 1:        # one-element tensors that were not 0-d
                    chunk = chunk.reshape(-1)
                dev = chunk.device
                fill = self._fill.get(dev, 0)
                self._chunks.setdefault(dev, []).append(chunk)
                self._fill[dev] = fill + len(tidx)
                return [(dev, fill, tidx)]
        for i, t in zip(tidx, tvals):
            require_scalar_tensor(f"metrics[{keys[i]!r}]", t)
        by_dev: dict[torch.device, tuple[list, list]] = {}
        for i, t in zip(tidx, tvals):
            ts, ix = by_dev.setdefault(t.device, ([], []))
            ts.append(t.detach().reshape(()).to(torch.float64))
            ix.append(i)
        return [self._append(dev, torch.stack(ts), ix) for dev, (ts, ix) in by_dev.items()]

    def _append(self, dev: torch.device, chunk: torch.Tensor, idx: list[int]) -> tuple:
        fill = self._fill.get(dev, 0)
        self._chunks.setdefault(dev, []).append(chunk)
        self._fill[dev] = fill + len(idx)
        return dev, fill, idx

    def _read(self) -> None:
        """The host read: every device's buffered values in one transfer each."""
        if not self._records:
            return
        host = {}
        for dev, chunks in self._chunks.items():
            parts = [c if c.is_floating_point() else c.to(torch.float64) for c in chunks]
            host[dev] = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
        for step, keys, vals, groups in self._records:
            if vals is None:
                dev, start, _ = groups[0]
                self._ready.append((step, dict(zip(keys, host[dev][start:start + len(keys)]))))
                continue
            if groups:
                for dev, start, idx in groups:
                    hv = host[dev]
                    for j, i in enumerate(idx, start):
                        vals[i] = hv[j]
            self._ready.append((step, dict(zip(keys, vals))))
        self._records, self._chunks, self._fill = [], {}, {}

    def _drain(self) -> list[Finding]:
        out: list[Finding] = []
        ready = self._ready
        while ready:
            step, metrics = ready.popleft()
            new = self._scanner.update(step, metrics)
            if new:
                out += new
                self._act(new, 4)
        return out

    def _act(self, new: list[Finding], stacklevel: int) -> None:
        bad = [f for f in new if _RANK[f.severity] >= _RANK[self.stop_on]]
        if self.mode == "raise" and bad:
            raise CollapseDetected(
                "collapse signature detected: " + "; ".join(
                    f"[{f.severity}] {f.signature} at step {f.step}: {f.message}" for f in bad), bad)
        for f in new:
            warnings.warn(f"[{f.severity}] {f.signature} at step {f.step}: {f.message}",
                          CollapseWarning, stacklevel=stacklevel)
        if self.mode == "stop" and bad:
            self.should_stop = True
