"""Golden runs of seed system ``evolving_context``: one fixed and one broken short training run.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from invariants import GoldenTolerance
from reference_models import evolving_context
from reference_models.golden_common import EXACT, expect, golden_pair, per_step, rel

CONTEXT_STEPS = 100
CONTEXT_KEYS = ("loss", "accuracy", "z_e_step_change", "z_e_step_change_pct", "grad_norm",
                "grad_norm_encoder", "encoder_grad_share")
CONTEXT_NOTE = (
    "Seed 004: an unsmoothed, un-normalised context refined at every ACT step destabilised "
    "the decoder. The pre-fix run shows the seed's signature from the first step - z_e step "
    "change 1.6-2.0 (> 0.5) and 41-54% (> 20%) - while the fixed run stays below both. The "
    "downstream accuracy instability is not reproduced in 100 steps of this toy task: both "
    "runs reach 100% accuracy.")


def _context(cfg) -> Callable:
    return lambda seed, device: per_step(
        evolving_context.train_steps(cfg, CONTEXT_STEPS, seed), CONTEXT_KEYS)


def _context_fixed_check(curves) -> None:
    worst = max(curves["z_e_step_change"][1])
    expect(worst <= 0.5, "evolving_context-fixed", "z_e step change <= 0.5 at every step",
            f"max {worst:.4g}")


def _context_broken_check(curves) -> None:
    least = min(curves["z_e_step_change"][1])
    expect(least > 0.5, "evolving_context-broken",
            "z_e step change > 0.5 at every step (the seed's bad regime)", f"min {least:.4g}")


# world size 2: measured max relative deviation in the comments (golden_common)
DISTRIBUTED_TOLERANCES: dict[str, GoldenTolerance] = {
    "loss": rel(3e-6),            # 7.23e-7
    "grad_norm": rel(3e-6),       # 6.46e-7
    "grad_norm_encoder": rel(2e-5),   # 4.85e-6
    "encoder_grad_share": rel(2e-5),  # 4.23e-6
    "z_e_step_change": rel(9e-7),     # 2.01e-7
    "z_e_step_change_pct": rel(2e-6),  # 2.58e-7
    "accuracy": EXACT}

# Broken runs whose instability amplifies the float32 rounding of DDP's gradient average


RUNS = golden_pair(
    "evolving_context", _context, evolving_context.FIXED, evolving_context.PRE_FIX,
    config=lambda cfg: {"system": "evolving_context", "cfg": asdict(cfg), "steps": CONTEXT_STEPS},
    checks=(_context_fixed_check, _context_broken_check),
    note=CONTEXT_NOTE,
    broken_signatures=(("z_e_step_change", "z_e_step_change"), ("z_e_step_change", "z_e_step_change_pct")),
    distributed_tolerances=DISTRIBUTED_TOLERANCES)
