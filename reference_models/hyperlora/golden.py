"""Golden runs of seed system ``hyperlora``: one fixed and one broken short training run.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from invariants import GoldenTolerance
from reference_models import hyperlora
from reference_models.golden_common import EXACT, expect, golden_pair, per_step, rel

HYPERLORA_STEPS = 50
HYPERLORA_KEYS = ("loss", "accuracy", "lora_norm", "lora_norm_max", "entropy", "nan_batches",
                  "grad_norm", "lr", "lr_hyperlora", "governor_level", "lora_norm_ema")
HYPERLORA_NOTE = (
    "Seed 000 collapsed at epoch 41 of a long run (norm 1.714, entropy 5.2, accuracy 96%->48%). "
    "In 50 CPU steps the broken config (no clamp, HyperLoRA lr x3, monitor-only governor) "
    "reproduces the mechanism - the mean ‖ΔW‖F runs away past the kill threshold 2.0 within 10 "
    "steps - but not the downstream accuracy collapse: at this scale the broken run even learns "
    "the toy task faster. The fixed run's deltas stay <= 1.0.")


def _hyperlora(cfg) -> Callable:
    return lambda seed, device: per_step(hyperlora.train_steps(cfg, HYPERLORA_STEPS, seed),
                                          HYPERLORA_KEYS)


def _hyperlora_fixed_check(curves) -> None:
    worst = max(curves["lora_norm_max"][1])
    expect(worst <= 1.0, "hyperlora-fixed", "every per-sample ‖ΔW‖F <= τ = 1.0 (the clamp)",
            f"max ‖ΔW‖F = {worst!r}")


def _hyperlora_broken_check(curves) -> None:
    last = curves["lora_norm"][1][-1]
    expect(last > 2.0, "hyperlora-broken",
            "the seed's runaway: mean ‖ΔW‖F beyond the kill threshold 2.0 at the end",
            f"mean ‖ΔW‖F = {last:.4g}")


# world size 2: measured max relative deviation in the comments (golden_common)
DISTRIBUTED_TOLERANCES: dict[str, GoldenTolerance] = {  # measured max relative deviation in the comment
    "loss": rel(9e-7),            # 2.08e-7
    "entropy": rel(9e-7),         # 2.11e-7
    "grad_norm": rel(4e-6),       # 8.14e-7
    "lora_norm": rel(2e-6),       # 4.13e-7
    "lora_norm_ema": rel(2e-6),   # 3.0e-7
    "lora_norm_max": rel(2e-6),   # 4.85e-7
    "accuracy": EXACT, "governor_level": EXACT, "lr": EXACT, "lr_hyperlora": EXACT,
    "nan_batches": EXACT}
# the broken run's dynamics amplify DDP's float32 rounding: compared before this step
DISTRIBUTED_HORIZON: tuple[int, str] | None = (19, (
    "no clamp and HyperLoRA lr x3: the runaway amplifies rounding. Measured relative "
    "deviation of grad_norm: <= 1e-7 to step 15, 7e-6 at step 21, 2e-3 at 27, 2.3 at 45 "
    "(loss: 1e-4 at 33, 9e-2 at 46); lora_norm and lora_norm_kill fire at the same steps "
    "(6, 7, 10), the grad_norm_spike warning moves from step 48 to 45"))


RUNS = golden_pair(
    "hyperlora", _hyperlora, hyperlora.FIXED, hyperlora.BROKEN,
    config=lambda cfg: {"system": "hyperlora", "cfg": asdict(cfg), "steps": HYPERLORA_STEPS},
    checks=(_hyperlora_fixed_check, _hyperlora_broken_check),
    note=HYPERLORA_NOTE,
    broken_signatures=(("lora_norm", "lora_norm"), ("lora_norm_kill", "lora_norm")),
    distributed_tolerances=DISTRIBUTED_TOLERANCES,
    distributed_horizon=DISTRIBUTED_HORIZON)
