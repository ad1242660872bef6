"""Golden runs of seed 004 (``evolving_context``): the fixed and the broken collapse run.

The runs themselves (task, model, horizon, the fixed/broken configs that differ only in what
the seed blames, the ablations, the checks and the note) are in ``collapse.py``. The broken
run must show the seed's downstream collapse (loss divergence after the z_e instability) as a
critical finding; the fixed run must show no finding at all (docs/golden.md).

Both runs are recorded on seed 1: the broken run diverges on seeds 1-4 but only wobbles on
seed 0 (loss up to 1.34x its best, under the divergence threshold; measured, 4/5 seeds), and
a golden must hold the collapse it documents. ``invariants golden --sweep 5`` shows all five.
"""
from __future__ import annotations

from dataclasses import replace

from reference_models.evolving_context import collapse
from reference_models.golden_common import collapse_pair

BROKEN_SIGNATURES = (("divergence", "loss"),)
GOLDEN_SEED = 1

RUNS = tuple(replace(run, seed=GOLDEN_SEED)
             for run in collapse_pair("evolving_context", collapse,
                                      broken_signatures=BROKEN_SIGNATURES))
