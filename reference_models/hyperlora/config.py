"""Seed 000 config: ``HyperLoRAConfig`` with the fixed and the broken path side by side, and the
named variants (``FIXED``, ``BROKEN``, ``OLD_CAP``, ``SEED_CLAMP``) the cases and golden runs use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from invariants import NormGovernor
from invariants.validation import require

SYSTEM = "hyperlora"
TARGETS = ("xz", "hz", "xr", "hr", "xn", "hn")   # gate weights that receive deltas
CLAMP_MODES = ("exact", "seed", "always_rescale", "value_clip", "no_grad")


@dataclass(frozen=True)
class HyperLoRAConfig:
    context_dim: int = 8             # tiny (RLAN's context is larger); keeps properties fast
    hidden_dim: int = 12             # GRU hidden = cell embedding width (all ΔW are H x H)
    predictor_dim: int = 16          # HyperLoRA trunk width
    rank: int = 2                    # LoRA rank of A·B
    n_colors: int = 10               # ARC grid colours 0-9
    scaling: float = 0.1             # seed §1.2: α = 0.1
    hyperlora_max_norm: float | None = 1.0  # seed FIXES: lora_max_norm 3.0 -> 1.0 (None: no clamp)
    clamp_mode: str = "exact"        # "exact" = clamp_frobenius; "seed" = §2.2's float32 code
    hyperlora_lr_multiplier: float = 1.0    # seed FIXES / §2.2 Part 2: 3.0 -> 1.0
    hyperlora_weight_decay: float = 0.001   # seed §2.2 Part 3 / §3.2: λ = 0.001
    governor_warn: float = 1.0       # seed FIXES: lora_norm_warn_threshold 2.0 -> 1.0
    governor_critical: float = 1.5   # seed FIXES: lora_norm_critical_threshold 5.0 -> 1.5
    governor_kill: float = 2.0       # seed FIXES: lora_norm_kill_threshold 10.0 -> 2.0
    governor_early_stop_ema: float | None = 1.5  # seed §3.3: stop if lora_norm_ema > 1.5
    governor_ema_decay: float = 0.5  # not in the seed: half-life one observation (docs)
    governor_monitor_only: bool = False  # seed §1.3: the pre-fix governor only warned
    base_lr: float = 1e-2            # Adam, tiny model: large enough to move norms in 50 steps
    grid_size: int = 3               # 3x3 grids, 9 cells
    solver_steps: int = 2            # GRU refinement steps per forward
    batch_size: int = 16
    context_noise: float = 0.05      # noise on the task code in the context

    def __post_init__(self) -> None:
        for name in ("context_dim", "hidden_dim", "predictor_dim", "rank", "n_colors",
                     "grid_size", "solver_steps", "batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require(self.hyperlora_max_norm is None or (
            isinstance(self.hyperlora_max_norm, (int, float))
            and math.isfinite(self.hyperlora_max_norm) and self.hyperlora_max_norm > 0),
            "hyperlora_max_norm", self.hyperlora_max_norm, "must be None or a finite number > 0")
        require(self.clamp_mode in CLAMP_MODES, "clamp_mode", self.clamp_mode,
                f"must be one of {CLAMP_MODES}")
        for name in ("scaling", "hyperlora_lr_multiplier", "base_lr"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, value, "must be a finite number > 0")
        require(math.isfinite(self.hyperlora_weight_decay) and self.hyperlora_weight_decay >= 0,
                "hyperlora_weight_decay", self.hyperlora_weight_decay, "must be >= 0")
        governor_for(self)  # validates the thresholds


def governor_for(cfg: HyperLoRAConfig) -> NormGovernor:
    """The config's governor: the fixed one, or the seed's monitor-only one."""
    return NormGovernor(warn=cfg.governor_warn, critical=cfg.governor_critical,
                        kill=cfg.governor_kill, early_stop_ema=cfg.governor_early_stop_ema,
                        ema_decay=cfg.governor_ema_decay,
                        max_norm=cfg.hyperlora_max_norm or 1.0,
                        enforce_clamp=not cfg.governor_monitor_only)


FIXED = HyperLoRAConfig()
BROKEN = HyperLoRAConfig(hyperlora_max_norm=None, hyperlora_lr_multiplier=3.0,
                         hyperlora_weight_decay=0.0, governor_warn=2.0, governor_critical=5.0,
                         governor_kill=10.0, governor_early_stop_ema=None,
                         governor_monitor_only=True)          # the seed's pre-fix config
OLD_CAP = replace(FIXED, hyperlora_max_norm=3.0)              # hyper_lora.py's old default
SEED_CLAMP = replace(FIXED, clamp_mode="seed")                # §2.2 code verbatim (float32 ulps)
