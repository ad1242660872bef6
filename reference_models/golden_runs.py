"""The golden runs module ``invariants golden`` and ``pytest -m golden`` read by default.

It holds no runs of its own: each seed system defines its fixed and broken run in
``reference_models/<system>/golden.py`` and ``catalog.golden_runs()`` gathers them. A user's
own runs module only needs a ``RUNS`` tuple of ``GoldenRun`` (``--runs MODULE``).
"""
from __future__ import annotations

from reference_models import catalog

RUNS = catalog.golden_runs()

# world size >= 2: the broken runs compared only before a measured step (docs/golden.md)
DISTRIBUTED_HORIZONS: dict[str, tuple[int, str]] = {
    run.name: run.distributed_horizon for run in RUNS if run.distributed_horizon is not None}

__all__ = ["DISTRIBUTED_HORIZONS", "RUNS"]
