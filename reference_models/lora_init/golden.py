"""Seed 003 golden pair: a random LoRA init garbles a 1024-wide LM at attach (``collapse.py``).

The broken run must show BROKEN_SIGNATURES as critical findings, the fixed run none.
"""
from __future__ import annotations

from invariants import GoldenTolerance
from reference_models.golden_common import EXACT, collapse_pair, rel
from reference_models.lora_init import collapse

# The garbled model at the attach step, as a critical finding: the probe entropy's spike (a
# level rule: 0.4-0.6 -> 3.3-3.5, above the seed-000 collapse level 2.0). The probe loss's
# jump (1.1-1.3 -> 3.4-3.8) is a warning: its 13 logged points hold no statistics, and a
# statistical rule gives no critical verdict before a warm-up of points (issue 15,
# docs/signatures.md). The run's check asserts the KL and the changed tokens.
BROKEN_SIGNATURES = (("entropy_spike", "entropy"),)

# world size 2 (golden_common): measured max relative deviation over both runs in the comments
# (torch 2.13.0+cpu, gloo, 2 ranks). The pretraining (steps 0-29) is replayed on every rank:
# bit-identical, base_val_loss included (it keeps the world-size-1 table); the 9 data-parallel
# fine-tune steps deviate by rounding only, largest at the last probe (step 36). No horizon.
DISTRIBUTED_TOLERANCES: dict[str, GoldenTolerance] = {
    "val_loss": rel(6e-6),        # 1.33e-6 (broken, step 36)
    "entropy": rel(3e-6),         # 7.15e-7
    "train_loss": rel(2e-5),      # 4.11e-6 (broken, step 36)
    "kl_to_base": rel(8e-6),      # 1.78e-6 (broken, step 36)
    "val_accuracy": EXACT, "top1_changed": EXACT, "lr": EXACT}

RUNS = collapse_pair("lora_init", collapse, broken_signatures=BROKEN_SIGNATURES,
                     distributed_tolerances=DISTRIBUTED_TOLERANCES)
