"""Seed 001 config: ``StagedModulesConfig`` (fixed and broken paths behind flags), the named
variants and ``staging_flags`` (which module is active at which epoch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from invariants.validation import require

SYSTEM = "staged_modules"
MODULES = ("hyperlora", "solver_context", "cross_attention", "hpm")
START_KEYS = {"hyperlora": "hyperlora_start_epoch",
              "solver_context": "solver_context_start_epoch",
              "cross_attention": "cross_attention_start_epoch",
              "hpm": "hpm_start_epoch"}
USE_KEYS = {"hyperlora": "use_hyperlora", "solver_context": "use_solver_context",
            "cross_attention": "use_cross_attention_context", "hpm": "use_hpm"}
FILM_INITS = ("identity", "random")


@dataclass(frozen=True)
class StagedModulesConfig:
    grid_size: int = 5                 # tiny grids (seed: ARC grids); 25 cells per grid
    num_colors: int = 4                # colour 0 is background
    hidden_dim: int = 16               # seed: 256; tiny for the catalog's 8 s budget
    num_support: int = 2               # seed: max_clues 6-7
    num_solver_steps: int = 3          # seed: 6
    lora_rank: int = 2
    lora_scaling: float = 0.1          # seed 000: ΔW = 0.1·A·B
    hyperlora_max_norm: float | None = 1.0  # seed 000's Frobenius clamp: the same solver carries
                                            # both fixes (None = no clamp, as before seed 000)
    hpm_slots: int = 4
    use_hyperlora: bool = True         # seed's new architecture: modules present...
    use_solver_context: bool = True
    use_cross_attention_context: bool = True
    use_hpm: bool = True
    hyperlora_start_epoch: int = 5     # ...but staged: seed Option A "(Recommended)" = 5
    solver_context_start_epoch: int = 5
    cross_attention_start_epoch: int = 5  # seed fix: cross_attention_active -> FiLM before
    hpm_start_epoch: int = 5
    meta_learning_start_epoch: int = 3  # seed: LOO/equivariance losses delayed to 3
    gradient_checkpointing: bool = False  # seed Option B: off until fixed; on -> non-reentrant
    use_ema: bool = True               # seed: the stable config had EMA on
    ema_decay: float = 0.999
    bg_bias: float = 0.0               # seed: 0.0 neutral (the -0.5 "anti-collapse" backfired)
    film_init: str = "identity"        # S3: γ = 1, β = 0
    # --- broken variants (each one flag) ---
    active_from_epoch_0: bool = False  # S1: the seed's bug, staging ignored altogether
    stuck_flag: str | None = None      # S2: this module's staging flag never turns on
    checkpoint_reentrant: bool = False  # S4: torch.utils.checkpoint(use_reentrant=True)
    ignored_start_key: str | None = None  # S6: parsed, but meta_learning_start_epoch used
    ema_wired: bool = True             # S5: False = use_ema claimed on, update a no-op

    def __post_init__(self) -> None:
        for name in ("grid_size", "num_colors", "hidden_dim", "num_support",
                     "num_solver_steps", "lora_rank", "hpm_slots"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require(self.num_colors >= 2, "num_colors", self.num_colors, "must be >= 2 (BG + FG)")
        for name in (*START_KEYS.values(), "meta_learning_start_epoch"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    name, value, "must be an integer epoch >= 0")
        require(0.0 <= self.ema_decay <= 1.0, "ema_decay", self.ema_decay, "must lie in [0, 1]")
        require(math.isfinite(self.bg_bias), "bg_bias", self.bg_bias, "must be finite")
        require(self.film_init in FILM_INITS, "film_init", self.film_init,
                f"must be one of {FILM_INITS}")
        require(self.stuck_flag is None or self.stuck_flag in MODULES, "stuck_flag",
                self.stuck_flag, f"must be None or one of {MODULES}")
        require(self.ignored_start_key is None or self.ignored_start_key in START_KEYS.values(),
                "ignored_start_key", self.ignored_start_key,
                f"must be None or one of {tuple(START_KEYS.values())}")


FIXED = StagedModulesConfig()
BROKEN = StagedModulesConfig(active_from_epoch_0=True, use_ema=False, bg_bias=-0.5)  # seed's NEW


def staging_flags(cfg: StagedModulesConfig, epoch: int) -> dict[str, bool]:
    """module -> active at ``epoch`` (the seed's runtime staging flags)."""
    require(isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0, "epoch", epoch,
            "must be an integer epoch >= 0")
    flags = {}
    for module, key in START_KEYS.items():
        if cfg.active_from_epoch_0:          # broken S1: the seed's bug
            active = True
        elif cfg.stuck_flag == module:       # broken S2: never turns on
            active = False
        elif cfg.ignored_start_key == key:   # broken S6: parsed, then ignored
            active = epoch >= cfg.meta_learning_start_epoch
        else:                                # fixed: honour the configured start
            active = epoch >= getattr(cfg, key)
        flags[module] = bool(getattr(cfg, USE_KEYS[module])) and active
    return flags
