"""Seed 001 golden pair: all-background predictions to the end (``collapse.py``).

The broken run must show BROKEN_SIGNATURES as critical findings, the fixed run none.
"""
from __future__ import annotations

from invariants import GoldenTolerance
from reference_models.golden_common import EXACT, collapse_pair, rel
from reference_models.staged_modules import collapse

BROKEN_SIGNATURES = (("background_collapse", "bg_fraction"),)

# world size 2 (golden_common): measured max relative deviation over both runs in the comment
# (torch 2.13.0+cpu, gloo, 2 ranks). The held-out metrics were bit-identical at every epoch,
# and so was the broken run's loss (only the head learns); no horizon.
DISTRIBUTED_TOLERANCES: dict[str, GoldenTolerance] = {
    "loss": rel(3e-5),            # 6.23e-6 (fixed, epoch 3; 4.6e-7 at epoch 0)
    "accuracy": EXACT, "bg_fraction": EXACT, "fg_recall": EXACT, "target_bg_fraction": EXACT}

RUNS = collapse_pair("staged_modules", collapse, broken_signatures=BROKEN_SIGNATURES,
                     distributed_tolerances=DISTRIBUTED_TOLERANCES)
