"""The golden runs: one fixed and one broken short training run per seed system.

Each run is one pytest item (``tests/test_golden.py``) so xdist spreads them. Every run
is compared with ``golden/<run>/<device-key>.json`` (curves within the per-metric
tolerance table, and the collapse findings of the detectors exactly). On top:

* a **fixed** run must show no collapse signature: the detectors report nothing
  (``signatures=()``, checked in the test with the same ``SignatureConfig``);
* a **broken** run must show its seed's documented mechanism: the listed
  ``(signature, metric)`` findings and the run's own ``check``.

A system's fixed and broken runs share one ``SignatureConfig`` (a stress setting or a
detector setting applies to both or to neither). Where a short CPU run cannot reproduce
the seed's downstream collapse, the run's ``note`` (stored in the golden file) says so.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

from invariants import GoldenRun, GoldenTolerance, InvariantViolation, SignatureConfig
from reference_models import (curriculum_lm, evolving_context, hyperlora, lora_init,
                              staged_modules)


def _per_step(out: dict[str, list], keys: tuple[str, ...], steps=None) -> dict[str, tuple]:
    first = out[keys[0]]
    xs = list(range(len(first))) if steps is None else list(steps)
    return {k: (xs, list(out[k])) for k in keys}


def _expect(cond: bool, run: str, expected: str, observed: str) -> None:
    if not cond:
        raise InvariantViolation(f"{run}: expected {expected}\n  observed: {observed}")


# ---------------------------------------------------------------- seed 000: HyperLoRA
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
    return lambda seed, device: _per_step(hyperlora.train_steps(cfg, HYPERLORA_STEPS, seed),
                                          HYPERLORA_KEYS)


def _hyperlora_fixed_check(curves) -> None:
    worst = max(curves["lora_norm_max"][1])
    _expect(worst <= 1.0, "hyperlora-fixed", "every per-sample ‖ΔW‖F <= τ = 1.0 (the clamp)",
            f"max ‖ΔW‖F = {worst!r}")


def _hyperlora_broken_check(curves) -> None:
    last = curves["lora_norm"][1][-1]
    _expect(last > 2.0, "hyperlora-broken",
            "the seed's runaway: mean ‖ΔW‖F beyond the kill threshold 2.0 at the end",
            f"mean ‖ΔW‖F = {last:.4g}")


# ------------------------------------------------------------ seed 001: staged modules
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
    return lambda seed, device: _per_step(staged_modules.train_epochs(cfg, STAGED_EPOCHS, seed),
                                          STAGED_KEYS)


def _staged_fixed_check(curves) -> None:
    before = curves["lora_norm"][1][:staged_modules.FIXED.hyperlora_start_epoch]
    _expect(all(v == 0.0 for v in before), "staged_modules-fixed",
            "no HyperLoRA delta applied before hyperlora_start_epoch (identity)",
            f"lora_norm before the start epoch: {before}")


def _staged_broken_check(curves) -> None:
    first = curves["lora_norm"][1][0]
    _expect(first > 0.0, "staged_modules-broken", "HyperLoRA deltas applied at epoch 0",
            f"lora_norm at epoch 0 = {first}")


# ---------------------------------------------------------- seed 002: curriculum LM
CURRICULUM_NOTE = (
    "Seed 002's LM collapsed to '::::::' after the curriculum transition. This 32-wide char "
    "LM trained for 9 epochs does not reproduce the mode collapse with either config; the "
    "broken run shows the documented mechanisms that are visible in curves - a constant "
    "LR of 0.01 with no warmup and no decay, and no early stopping - and its validation "
    "loss is optimistic because its validation samples are training samples.")


def _curriculum(cfg) -> Callable:
    def fn(seed, device):
        out = curriculum_lm.train(cfg, seed)
        curves = _per_step(out, ("loss", "lr", "grad_norm"), out["step"])
        curves.update(_per_step(out, ("val_loss", "stage", "sample"), out["epoch_step"]))
        return curves
    return fn


def _curriculum_fixed_check(curves) -> None:
    lr = curves["lr"][1]
    peak = max(lr)
    _expect(lr[0] < peak and lr[-1] < 0.01 * peak, "curriculum_lm-fixed",
            "warmup from below the peak and cosine decay to near eta_min",
            f"lr[0] = {lr[0]:.3g}, peak {peak:.3g}, lr[-1] = {lr[-1]:.3g}")


def _curriculum_broken_check(curves) -> None:
    lr = curves["lr"][1]
    _expect(min(lr) == max(lr) == 0.01, "curriculum_lm-broken",
            "the seed's constant LR 0.01 (no warmup, no schedule)",
            f"lr in [{min(lr):.3g}, {max(lr):.3g}]")


# ------------------------------------------------------------------ seed 003: LoRA init
LORA_KWARGS = {"pretrain_steps": 100, "finetune_steps": 30}


def _lora(cfg) -> Callable:
    return lambda seed, device: lora_init.finetune_curves(cfg, seed=seed, **LORA_KWARGS)


def _lora_fixed_check(curves) -> None:
    kl0 = curves["kl_from_base"][1][0]
    _expect(kl0 == 0.0, "lora_init-fixed", "KL from the base exactly 0 at step 0 (zero-init B)",
            f"KL = {kl0!r}")


def _lora_broken_check(curves) -> None:
    kl0 = curves["kl_from_base"][1][0]
    _expect(kl0 > 0.0, "lora_init-broken",
            "a non-zero KL from the base at step 0 (the seed's random init perturbs the model)",
            f"KL = {kl0!r}")


# ------------------------------------------------------------ seed 004: evolving context
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
    return lambda seed, device: _per_step(
        evolving_context.train_steps(cfg, CONTEXT_STEPS, seed), CONTEXT_KEYS)


def _context_fixed_check(curves) -> None:
    worst = max(curves["z_e_step_change"][1])
    _expect(worst <= 0.5, "evolving_context-fixed", "z_e step change <= 0.5 at every step",
            f"max {worst:.4g}")


def _context_broken_check(curves) -> None:
    least = min(curves["z_e_step_change"][1])
    _expect(least > 0.5, "evolving_context-broken",
            "z_e step change > 0.5 at every step (the seed's bad regime)", f"min {least:.4g}")


# ------------------------------------------------------------------------ the table
def _run(name: str, fn: Callable, config: dict[str, Any], check: Callable, note: str,
         signatures: tuple = (), signature_config: SignatureConfig | None = None,
         tolerances: dict | None = None) -> GoldenRun:
    system = name.rsplit("-", 1)[0]
    return GoldenRun(name=name, fn=fn, config=config, check=check, note=note,
                     kind=name.rsplit("-", 1)[1],
                     signatures=signatures, signature_config=signature_config,
                     tolerances=tolerances or {},
                     distributed_tolerances=DISTRIBUTED_TOLERANCES[system],
                     distributed_horizon=DISTRIBUTED_HORIZONS.get(name))


# ----------------------------------------------------- world size 2 (docs/golden.md)
# Rank 0 of a world-size-2 run (gloo, CPU, DDP over the batch) against the world-size-1
# golden. Measured with `invariants golden --world-size 2 --deviations` (torch 2.13.0+cpu):
# rtol = 4 x the largest relative deviation over the system's fixed and broken run
# (before the horizon), rounded up to one significant digit; atol 0 (no golden value of
# 0 ever deviated). Discrete and schedule metrics (accuracy, levels, lr, stage) were
# bit-identical in every run and must stay so: exact. Continuous metrics that were
# bit-identical (staged_modules' lora_norm) keep the world-size-1 table.
_EXACT = GoldenTolerance(rtol=0.0, atol=0.0)


def _rel(rtol: float) -> GoldenTolerance:
    return GoldenTolerance(rtol=rtol, atol=0.0)


DISTRIBUTED_TOLERANCES: dict[str, dict[str, GoldenTolerance]] = {
    "hyperlora": {   # measured max relative deviation in the comment
        "loss": _rel(9e-7),            # 2.08e-7
        "entropy": _rel(9e-7),         # 2.11e-7
        "grad_norm": _rel(4e-6),       # 8.14e-7
        "lora_norm": _rel(2e-6),       # 4.13e-7
        "lora_norm_ema": _rel(2e-6),   # 3.0e-7
        "lora_norm_max": _rel(2e-6),   # 4.85e-7
        "accuracy": _EXACT, "governor_level": _EXACT, "lr": _EXACT, "lr_hyperlora": _EXACT,
        "nan_batches": _EXACT},
    "staged_modules": {
        "loss": _rel(2e-6),            # 2.68e-7
        "accuracy": _EXACT, "bg_fraction": _EXACT, "fg_accuracy": _EXACT,
        "target_bg_fraction": _EXACT},
    "curriculum_lm": {
        "loss": _rel(2e-6),            # 2.96e-7
        "grad_norm": _rel(8e-6),       # 1.86e-6
        "val_loss": _rel(9e-7),        # 2.1e-7
        "lr": _EXACT, "stage": _EXACT},  # "sample" is text: always compared exactly
    "lora_init": {
        "loss": _rel(1e-5),            # 2.32e-6
        "entropy": _rel(8e-6),         # 1.79e-6
        "kl_from_base": _rel(2e-5),    # 2.92e-6
        "adapter_delta_norm": _rel(9e-7),  # 2.08e-7
        "accuracy": _EXACT},
    "evolving_context": {
        "loss": _rel(3e-6),            # 7.23e-7
        "grad_norm": _rel(3e-6),       # 6.46e-7
        "grad_norm_encoder": _rel(2e-5),   # 4.85e-6
        "encoder_grad_share": _rel(2e-5),  # 4.23e-6
        "z_e_step_change": _rel(9e-7),     # 2.01e-7
        "z_e_step_change_pct": _rel(2e-6),  # 2.58e-7
        "accuracy": _EXACT},
}

# Broken runs whose instability amplifies the float32 rounding of DDP's gradient average
# exponentially: compared before the step where any metric's deviation first exceeds a
# tenth of its world-size-1 tolerance (measured); after it, their check and signatures.
DISTRIBUTED_HORIZONS: dict[str, tuple[int, str]] = {
    "hyperlora-broken": (19, (
        "no clamp and HyperLoRA lr x3: the runaway amplifies rounding. Measured relative "
        "deviation of grad_norm: <= 1e-7 to step 15, 7e-6 at step 21, 2e-3 at 27, 2.3 at 45 "
        "(loss: 1e-4 at 33, 9e-2 at 46); lora_norm and lora_norm_kill fire at the same steps "
        "(6, 7, 10), the grad_norm_spike warning moves from step 48 to 45")),
    "staged_modules-broken": (8, (
        "every module from epoch 0 with Adam: the epoch-mean loss deviates by <= 4e-8 "
        "(relative) through epoch 7, 9e-6 at epoch 8, 5e-4 at epoch 9; the evaluation "
        "metrics stay bit-identical to the end")),
    "curriculum_lm-broken": (145, (
        "constant LR 0.01, no warmup or decay: grad_norm deviates by <= 9e-7 (relative) to "
        "step 137, 6e-5 at 154, 2e-3 at 239 (loss 2e-4, val_loss 1e-4 at the end); the "
        "greedy samples stay identical")),
}


# One SignatureConfig per system, shared by its fixed and broken run.
SIGNATURES_HYPERLORA = SignatureConfig()
SIGNATURES_STAGED = SignatureConfig()
SIGNATURES_CURRICULUM = SignatureConfig()
SIGNATURES_LORA = SignatureConfig()
SIGNATURES_CONTEXT = SignatureConfig()

RUNS: tuple[GoldenRun, ...] = (
    _run("hyperlora-fixed", _hyperlora(hyperlora.FIXED),
         {"system": "hyperlora", "cfg": asdict(hyperlora.FIXED), "steps": HYPERLORA_STEPS},
         _hyperlora_fixed_check, HYPERLORA_NOTE, signature_config=SIGNATURES_HYPERLORA),
    _run("hyperlora-broken", _hyperlora(hyperlora.BROKEN),
         {"system": "hyperlora", "cfg": asdict(hyperlora.BROKEN), "steps": HYPERLORA_STEPS},
         _hyperlora_broken_check, HYPERLORA_NOTE,
         signatures=(("lora_norm", "lora_norm"), ("lora_norm_kill", "lora_norm")),
         signature_config=SIGNATURES_HYPERLORA),
    _run("staged_modules-fixed", _staged(staged_modules.FIXED),
         {"system": "staged_modules", "cfg": asdict(staged_modules.FIXED),
          "epochs": STAGED_EPOCHS}, _staged_fixed_check, STAGED_NOTE,
         signature_config=SIGNATURES_STAGED),
    _run("staged_modules-broken", _staged(staged_modules.BROKEN),
         {"system": "staged_modules", "cfg": asdict(staged_modules.BROKEN),
          "epochs": STAGED_EPOCHS}, _staged_broken_check, STAGED_NOTE,
         signatures=(("background_collapse", "bg_fraction"),),
         signature_config=SIGNATURES_STAGED),
    _run("curriculum_lm-fixed", _curriculum(curriculum_lm.FIXED),
         {"system": "curriculum_lm", "cfg": asdict(curriculum_lm.FIXED)},
         _curriculum_fixed_check, CURRICULUM_NOTE, signature_config=SIGNATURES_CURRICULUM),
    _run("curriculum_lm-broken", _curriculum(curriculum_lm.BROKEN),
         {"system": "curriculum_lm", "cfg": asdict(curriculum_lm.BROKEN)},
         _curriculum_broken_check, CURRICULUM_NOTE, signature_config=SIGNATURES_CURRICULUM),
    _run("lora_init-fixed", _lora(lora_init.FIXED),
         {"system": "lora_init", "lora": asdict(lora_init.FIXED), **LORA_KWARGS,
          "lm": asdict(lora_init.TinyLMConfig())}, _lora_fixed_check, lora_init.GOLDEN_NOTE,
         signature_config=SIGNATURES_LORA,
         tolerances={"kl_from_base": GoldenTolerance(rtol=1e-5, atol=1e-9)}),
    _run("lora_init-broken", _lora(lora_init.BROKEN),
         {"system": "lora_init", "lora": asdict(lora_init.BROKEN), **LORA_KWARGS,
          "lm": asdict(lora_init.TinyLMConfig())}, _lora_broken_check, lora_init.GOLDEN_NOTE,
         signature_config=SIGNATURES_LORA,
         tolerances={"kl_from_base": GoldenTolerance(rtol=1e-5, atol=1e-9)}),
    _run("evolving_context-fixed", _context(evolving_context.FIXED),
         {"system": "evolving_context", "cfg": asdict(evolving_context.FIXED),
          "steps": CONTEXT_STEPS}, _context_fixed_check, CONTEXT_NOTE,
         signature_config=SIGNATURES_CONTEXT),
    _run("evolving_context-broken", _context(evolving_context.PRE_FIX),
         {"system": "evolving_context", "cfg": asdict(evolving_context.PRE_FIX),
          "steps": CONTEXT_STEPS}, _context_broken_check, CONTEXT_NOTE,
         signatures=(("z_e_step_change", "z_e_step_change"),
                     ("z_e_step_change", "z_e_step_change_pct")),
         signature_config=SIGNATURES_CONTEXT),
)
