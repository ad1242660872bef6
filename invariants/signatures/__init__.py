"""Collapse signatures: one definition per rule, two drivers, and the tools built on them.

Owns the public face of the signature machinery; the names below are re-exported
by ``invariants``.  Where each concern lives:

- ``config``: canonical metric names, the signatures and ``SignatureConfig``.
- ``findings``: ``Finding`` and ``verdict_of``.
- ``detectors/<family>.py``: each rule's vectorised ``scan`` and streaming
  ``_XState.push`` side by side (see ``detectors/__init__.py``).
- ``drivers``: ``build_detectors``, ``StreamingScanner``, ``VectorisedScanner``,
  ``scan_series``, ``scan_records``.
- ``strategies``: ``metric_series`` (Hypothesis).
- ``logs``: ``read_log`` / ``LogData`` / ``scan_file``; ``report``: the text report
  and plot; ``cli``: the ``invariants scan`` subcommand.
- ``guard``: ``CollapseGuard`` for live training loops.
"""
import importlib as _importlib
import typing as _typing

from invariants.signatures.config import CANONICAL_METRICS, SIGNATURES, SignatureConfig
from invariants.signatures.detectors.samples import SampleStatistics, sample_statistics
from invariants.signatures.drivers import (StreamingScanner, VectorisedScanner, build_detectors,
                                           scan_records, scan_series)
from invariants.signatures.findings import Finding, verdict_of
from invariants.signatures.logs import LogData, read_log, scan_file
from invariants.signatures.report import render_report, write_plot

if _typing.TYPE_CHECKING:
    from invariants.signatures.guard import CollapseDetected, CollapseGuard, CollapseWarning
    from invariants.signatures.strategies import metric_series

# loaded on first use (PEP 562): the guard needs torch, the strategies Hypothesis's
# strategy machinery; the scan path (`invariants scan`, ``scan_series``) uses neither (it
# does import Hypothesis itself: `import invariants` registers the test profiles)
_LAZY = {"CollapseDetected": "invariants.signatures.guard",
         "CollapseGuard": "invariants.signatures.guard",
         "CollapseWarning": "invariants.signatures.guard",
         "metric_series": "invariants.signatures.strategies"}

__all__ = [
    "CANONICAL_METRICS",
    "CollapseDetected",
    "CollapseGuard",
    "CollapseWarning",
    "Finding",
    "LogData",
    "SIGNATURES",
    "SampleStatistics",
    "SignatureConfig",
    "StreamingScanner",
    "VectorisedScanner",
    "build_detectors",
    "metric_series",
    "read_log",
    "render_report",
    "sample_statistics",
    "scan_file",
    "scan_records",
    "scan_series",
    "verdict_of",
    "write_plot",
]


def __getattr__(name: str):
    owner = _LAZY.get(name)
    if owner is None:
        raise AttributeError(f"module 'invariants.signatures' has no attribute {name!r}")
    value = getattr(_importlib.import_module(owner), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
