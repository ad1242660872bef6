"""Golden runs of seed system ``staged_modules``: one fixed and one broken short training run.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from invariants import GoldenTolerance
from reference_models import staged_modules
from reference_models.golden_common import EXACT, expect, golden_pair, per_step, rel

STAGED_EPOCHS = 10
STAGED_KEYS = ("loss", "accuracy", "bg_fraction", "target_bg_fraction", "fg_accuracy",
               "lora_norm")
STAGED_NOTE = (
    "Seed 001: HyperLoRA, solver cross-attention, injector and HPM active from epoch 0 made "
    "the solver predict all background. The broken run (all modules from epoch 0, bg_bias "
    "-0.5) reproduces it at epoch 0 (bg_fraction 1.0 while targets are ~84% background); at "
    "this scale it recovers by epoch 1 and then learns faster than the fixed run, so the "
    "lasting collapse of the seed's long run is not reproduced. Both runs carry seed 000's "
    "clamp.")


def _staged(cfg) -> Callable:
    return lambda seed, device: per_step(staged_modules.train_epochs(cfg, STAGED_EPOCHS, seed),
                                          STAGED_KEYS)


def _staged_fixed_check(curves) -> None:
    before = curves["lora_norm"][1][:staged_modules.FIXED.hyperlora_start_epoch]
    expect(all(v == 0.0 for v in before), "staged_modules-fixed",
            "no HyperLoRA delta applied before hyperlora_start_epoch (identity)",
            f"lora_norm before the start epoch: {before}")


def _staged_broken_check(curves) -> None:
    first = curves["lora_norm"][1][0]
    expect(first > 0.0, "staged_modules-broken", "HyperLoRA deltas applied at epoch 0",
            f"lora_norm at epoch 0 = {first}")


# world size 2: measured max relative deviation in the comments (golden_common)
DISTRIBUTED_TOLERANCES: dict[str, GoldenTolerance] = {
    "loss": rel(2e-6),            # 2.68e-7
    "accuracy": EXACT, "bg_fraction": EXACT, "fg_accuracy": EXACT,
    "target_bg_fraction": EXACT}
# the broken run's dynamics amplify DDP's float32 rounding: compared before this step
DISTRIBUTED_HORIZON: tuple[int, str] | None = (8, (
    "every module from epoch 0 with Adam: the epoch-mean loss deviates by <= 4e-8 "
    "(relative) through epoch 7, 9e-6 at epoch 8, 5e-4 at epoch 9; the evaluation "
    "metrics stay bit-identical to the end"))


RUNS = golden_pair(
    "staged_modules", _staged, staged_modules.FIXED, staged_modules.BROKEN,
    config=lambda cfg: {"system": "staged_modules", "cfg": asdict(cfg), "epochs": STAGED_EPOCHS},
    checks=(_staged_fixed_check, _staged_broken_check),
    note=STAGED_NOTE,
    broken_signatures=(("background_collapse", "bg_fraction"),),
    distributed_tolerances=DISTRIBUTED_TOLERANCES,
    distributed_horizon=DISTRIBUTED_HORIZON)
