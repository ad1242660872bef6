"""Owns the log-reading entry points ``invariants scan`` and users call: ``read_log``,
``read_runs``, ``scan_file`` and ``scan_runs`` (read, then the vectorised detectors).

The readers themselves live in ``invariants.signatures.readers`` (one module per
format, the streaming byte source, the columnar builder, the known metric names).
"""
from __future__ import annotations

import os
from typing import Mapping

from invariants.signatures.config import SignatureConfig
from invariants.signatures.drivers import VectorisedScanner
from invariants.signatures.findings import Finding
from invariants.signatures.readers import FORMATS, LogData, LogError, read_log, read_runs


def scan_file(path: str | os.PathLike, fmt: str = "auto", mapping: Mapping[str, str] | None = None,
              config: SignatureConfig | None = None) -> tuple[LogData, list[Finding]]:
    """``read_log`` then the vectorised detectors; returns (data, findings sorted by step)."""
    data = read_log(path, fmt, mapping)
    return data, VectorisedScanner(config).scan(data.columns)


def scan_runs(path: str | os.PathLike, fmt: str = "auto", mapping: Mapping[str, str] | None = None,
              config: SignatureConfig | None = None
              ) -> list[tuple[LogData, list[Finding]] | LogError]:
    """Every run under ``path`` (``read_runs``), scanned; a run that cannot be read
    stays in the list as its ``LogError``."""
    scanner = VectorisedScanner(config)
    return [r if isinstance(r, LogError) else (r, scanner.scan(r.columns))
            for r in read_runs(path, fmt, mapping)]


__all__ = ["FORMATS", "LogData", "LogError", "read_log", "read_runs", "scan_file", "scan_runs"]
