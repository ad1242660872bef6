"""Owns ``CollapseGuard``: the streaming signature detectors, dropped into a
training loop (with ``CollapseWarning`` and ``CollapseDetected``).

    guard = CollapseGuard(mode="stop")
    for step, batch in enumerate(loader):
        loss = ...
        guard.update(step, {"loss": loss, "grad_norm": gn, "lora_norm": lora_norm})
        if guard.should_stop:
            break

Each new finding is reported once (first step it is detectable).  Modes:
``"warn"`` emits a ``CollapseWarning`` per new finding; ``"stop"`` also sets
``should_stop`` when a finding at or above ``stop_on`` severity appears (the
loop decides what to do); ``"raise"`` raises ``CollapseDetected`` instead.
Memory is constant per metric; ``update`` costs a few microseconds per metric
(bench/bench_scan.py).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

from invariants._errors import InvalidArgumentError
from invariants._validate import require
from invariants.signatures.config import CANONICAL_METRICS, SignatureConfig
from invariants.signatures.drivers import StreamingScanner
from invariants.signatures.findings import Finding, verdict_of

_MODES = ("warn", "stop", "raise")
_RANK = {"warning": 0, "critical": 1}


class CollapseWarning(UserWarning):
    """A collapse signature was detected (``CollapseGuard`` in ``"warn"``/``"stop"`` mode)."""


class CollapseDetected(RuntimeError):
    """Raised by ``CollapseGuard(mode="raise")``; ``findings`` lists what triggered it."""

    def __init__(self, message: str, findings: list[Finding]):
        super().__init__(message)
        self.findings = findings


class CollapseGuard:
    """Watch a live run for collapse signatures.

    Args:
      config: thresholds (``SignatureConfig``); defaults are the seeds' numbers.
      mode: ``"warn"``, ``"stop"`` (sets ``should_stop``) or ``"raise"``.
      stop_on: the lowest severity that stops/raises: ``"critical"`` (default) or ``"warning"``.
      metric_map: ``{canonical_name: your_name}`` for metrics you log under other names.
      ignore_unknown: drop metrics that are neither canonical nor mapped, instead of raising.

    Attributes:
      findings: every finding so far, in detection order.
      should_stop: True once a finding at or above ``stop_on`` appeared (mode ``"stop"``).
    """

    def __init__(self, config: SignatureConfig | None = None, *, mode: str = "warn",
                 stop_on: str = "critical", metric_map: Mapping[str, str] | None = None,
                 ignore_unknown: bool = False):
        require(config is None or isinstance(config, SignatureConfig), "config", config,
                "must be a SignatureConfig or None")
        require(mode in _MODES, "mode", mode, f"must be one of {_MODES}")
        require(stop_on in _RANK, "stop_on", stop_on, "must be 'warning' or 'critical'")
        require(metric_map is None or isinstance(metric_map, Mapping), "metric_map", metric_map,
                "must be a mapping {canonical_name: your_name} or None")
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
        self.should_stop = False

    @property
    def findings(self) -> list[Finding]:
        return self._scanner.findings

    @property
    def verdict(self) -> str:
        """``"healthy"``, ``"warning"`` or ``"collapse"`` so far."""
        return verdict_of(self._scanner.findings)

    def update(self, step: int | float, metrics: Mapping[str, Any]) -> list[Finding]:
        """Feed one logged step; returns the findings new at this step.

        Values may be floats, ints, 0-d tensors, NaN/Inf/None (reported as
        ``non_finite``), and a ``str`` for ``sample``.

        Raises:
          InvalidArgumentError: unknown metric name (unless mapped or ignored), a
            non-numeric value, a non-finite or decreasing step.
          CollapseDetected: mode ``"raise"`` and a finding at or above ``stop_on``.
        """
        require(isinstance(metrics, Mapping), "metrics", metrics, "must be a mapping")
        for k, v in metrics.items():
            if isinstance(v, int) and not isinstance(v, bool):
                try:
                    float(v)
                except OverflowError:  # a Python int beyond float range
                    raise InvalidArgumentError(
                        f"metrics[{k!r}]={v!r:.40}: integer too large for a float") from None
        if self._rename or self._ignore:
            out = {}
            for k, v in metrics.items():
                k = self._rename.get(k, k)
                if k in CANONICAL_METRICS:
                    out[k] = v
                elif not self._ignore:
                    raise InvalidArgumentError(
                        f"metric={k!r}: unknown; canonical names are {', '.join(CANONICAL_METRICS)}"
                        " (pass metric_map={canonical: yours} or ignore_unknown=True)")
            metrics = out
        new = self._scanner.update(step, metrics)
        if new:
            self._act(new)
        return new

    def _act(self, new: list[Finding]) -> None:
        bad = [f for f in new if _RANK[f.severity] >= _RANK[self.stop_on]]
        if self.mode == "raise" and bad:
            raise CollapseDetected(
                "collapse signature detected: " + "; ".join(
                    f"[{f.severity}] {f.signature} at step {f.step}: {f.message}" for f in bad), bad)
        for f in new:
            warnings.warn(f"[{f.severity}] {f.signature} at step {f.step}: {f.message}",
                          CollapseWarning, stacklevel=3)
        if self.mode == "stop" and bad:
            self.should_stop = True
