"""The golden runs: one fixed and one broken short training run per seed system.

Each run is one pytest item (``tests/test_golden.py``) so xdist spreads them. A fixed
run must show no collapse signature and match its golden curve; a broken run must
show its seed's documented mechanism (``signatures`` / ``check``) and match its own
golden, so a change in how the breakage manifests is noticed too.
"""
from __future__ import annotations

from dataclasses import asdict

from invariants import GoldenRun, GoldenTolerance, InvariantViolation
from reference_models import lora_init


def _lora_broken_check(curves) -> None:
    kl0 = curves["kl_from_base"][1][0]
    if not kl0 > 0:
        raise InvariantViolation(f"lora_init-broken: expected a non-zero KL from the base at "
                                 f"step 0 (the seed's random init perturbs the model), got {kl0}")


def _lora_fixed_check(curves) -> None:
    kl0 = curves["kl_from_base"][1][0]
    if kl0 != 0.0:
        raise InvariantViolation(f"lora_init-fixed: expected KL from the base exactly 0 at step "
                                 f"0 (zero-init B), got {kl0}")


def _lora_run(name: str, cfg: lora_init.LoraInitConfig, check) -> GoldenRun:
    kwargs = {"pretrain_steps": 100, "finetune_steps": 30}
    return GoldenRun(
        name=name,
        fn=lambda seed, device: lora_init.finetune_curves(cfg, seed=seed, **kwargs),
        config={"system": "lora_init", "lora": asdict(cfg), **kwargs, "lm": asdict(lora_init.TinyLMConfig())},
        tolerances={"kl_from_base": GoldenTolerance(rtol=1e-5, atol=1e-9)},
        check=check, note=lora_init.GOLDEN_NOTE)


RUNS: tuple[GoldenRun, ...] = (
    _lora_run("lora_init-fixed", lora_init.FIXED, _lora_fixed_check),
    _lora_run("lora_init-broken", lora_init.BROKEN, _lora_broken_check),
)
