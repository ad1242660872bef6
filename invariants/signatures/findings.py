"""Owns what a detector reports: ``Finding`` (and its JSON form), the verdict of a
list of findings, and the number formatting every message uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

_SEVERITY_RANK = {"warning": 0, "critical": 1}


@dataclass(frozen=True)
class Finding:
    """One collapse signature, first detectable at ``step``.

    ``value`` is what was observed (in the metric's units, or the statistic the
    message names), ``threshold`` the bound it crossed (``None`` where there is
    no numeric bound, e.g. a NaN).  ``started_step`` is where the anomaly began (the
    first point of a sustained rise, the spike itself), ``recovered_step`` the first later
    point back within bounds (``None``: not recovered, or not applicable); the JSON form
    keeps the scan contract's seven keys and says both in ``message``.
    """

    signature: str
    metric: str
    severity: str
    step: int | float
    value: float | None
    threshold: float | None
    message: str
    started_step: int | float | None = None
    recovered_step: int | float | None = None

    def as_json(self) -> dict[str, Any]:
        """The DESIGN.md finding object, exactly its seven keys; non-finite numbers become
        "nan"/"inf"/"-inf".  When a finding started and recovered is in its ``message`` (and
        in ``started_step`` / ``recovered_step`` for Python callers)."""
        return {"signature": self.signature, "metric": self.metric, "severity": self.severity,
                "step": self.step, "value": _json_number(self.value),
                "threshold": _json_number(self.threshold), "message": self.message}

    def sort_key(self) -> tuple:
        return (self.step, -_SEVERITY_RANK[self.severity], self.signature, self.metric)


def _json_number(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def verdict_of(findings: Iterable[Finding]) -> str:
    """``"collapse"`` if any finding is critical, ``"warning"`` if any, else ``"healthy"``."""
    sev = {f.severity for f in findings}
    return "collapse" if "critical" in sev else ("warning" if sev else "healthy")


def _step_out(step: float) -> int | float:
    step = float(step)
    return int(step) if step.is_integer() else step


def _g(x: float) -> str:
    return f"{x:.6g}"
