"""Golden runs of seed system ``lora_init``: one fixed and one broken short training run.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from invariants import GoldenTolerance
from reference_models import lora_init
from reference_models.golden_common import EXACT, expect, golden_pair, rel

LORA_KWARGS = {"pretrain_steps": 100, "finetune_steps": 30}


def _lora(cfg) -> Callable:
    return lambda seed, device: lora_init.finetune_curves(cfg, seed=seed, **LORA_KWARGS)


def _lora_fixed_check(curves) -> None:
    kl0 = curves["kl_from_base"][1][0]
    expect(kl0 == 0.0, "lora_init-fixed", "KL from the base exactly 0 at step 0 (zero-init B)",
            f"KL = {kl0!r}")


def _lora_broken_check(curves) -> None:
    kl0 = curves["kl_from_base"][1][0]
    expect(kl0 > 0.0, "lora_init-broken",
            "a non-zero KL from the base at step 0 (the seed's random init perturbs the model)",
            f"KL = {kl0!r}")


# world size 2: measured max relative deviation in the comments (golden_common)
DISTRIBUTED_TOLERANCES: dict[str, GoldenTolerance] = {
    "loss": rel(1e-5),            # 2.32e-6
    "entropy": rel(8e-6),         # 1.79e-6
    "kl_from_base": rel(2e-5),    # 2.92e-6
    "adapter_delta_norm": rel(9e-7),  # 2.08e-7
    "accuracy": EXACT}


RUNS = golden_pair(
    "lora_init", _lora, lora_init.FIXED, lora_init.BROKEN,
    config=lambda cfg: {"system": "lora_init", "lora": asdict(cfg), **LORA_KWARGS,
                    "lm": asdict(lora_init.TinyLMConfig())},
    checks=(_lora_fixed_check, _lora_broken_check),
    note=lora_init.GOLDEN_NOTE,
    tolerances={"kl_from_base": GoldenTolerance(rtol=1e-5, atol=1e-9)},
    distributed_tolerances=DISTRIBUTED_TOLERANCES)
