"""Seed 002 config: ``CurriculumLMConfig`` with the fixed pipeline and the seed's Phase-1 pipeline
side by side.
"""
from __future__ import annotations

from dataclasses import dataclass

from invariants.validation import (
    require,
    require_max_norm,
    require_min_delta,
    require_patience,
)

SYSTEM = "curriculum_lm"
SOURCES = ("add", "sub", "cmp", "recall")
BEST_RULES = ("min_delta", "seed", "train_loss")


@dataclass(frozen=True)
class CurriculumLMConfig:
    # data
    n_stages: int = 3                 # seed: FOUNDATION, REASONING, ADVANCED
    samples_per_source: int = 24      # per source and level before balancing (tiny, CPU)
    cap_per_source: int = 20          # seed "Dataset Balancing": cap each source
    val_fraction: float = 0.2         # seed fix 5: "20% of training data"
    # model
    d_model: int = 32                 # tiny GRU; the seed's model was 25M parameters
    # optimisation
    lr: float = 0.02                  # peak; the seed halved 0.01 -> 0.005 for a 25M model, but
                                      # this 20k-parameter GRU learns nothing at 0.005 in 9 epochs
    weight_decay: float = 0.01
    grokfast_alpha: float = 0.98      # Grokfast paper default EMA momentum
    grokfast_lambda: float = 0.02     # seed: grokfast_lambda 0.05 -> 0.02 ("gentler")
    warmup_fraction: float = 0.1      # seed: "first 500 steps: lr = 0 -> target (linear)"
    eta_min: float = 1e-6             # seed: CosineAnnealingLR(..., eta_min=1e-6)
    clip_max_norm: float | None = 1.0  # seed: clip_grad_norm_(..., max_norm=1.0)
    batch_size: int = 8               # seed: batch 4 -> 8 or 16
    epochs_per_stage: int = 3         # seed: 3/3/4 epochs
    patience: int = 3                 # seed fix 4: "not improved for 3 epochs"
    min_delta: float = 0.01           # seed: self.min_delta = 0.01
    # broken variants (seed 002 unless said otherwise)
    stage3_repeats_stage2: bool = False        # P2: "Stage 3 ... Same as Stage 2"
    recreate_optimizer_per_stage: bool = False  # P1: "Optimizer state reset at stage boundaries"
    constant_lr: bool = False                  # P6: "No learning rate decay schedule", lr 0.01
    early_stopping: bool = True                # P3: "No Early Stopping"
    best_rule: str = "min_delta"               # P4: "seed" = trainer.py:280; "train_loss"
    grokfast_alpha_swapped: bool = False       # P7 teeth (not from the seed)
    val_from_train: bool = False               # P8: validation drawn from training data
    balance: bool = True                       # P9: "combined without balancing"

    def __post_init__(self) -> None:
        for name in ("n_stages", "samples_per_source", "cap_per_source", "d_model",
                     "batch_size", "epochs_per_stage"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require(isinstance(self.val_fraction, float) and 0 < self.val_fraction < 1,
                "val_fraction", self.val_fraction, "must be a float in (0, 1)")
        require(0 <= self.grokfast_alpha <= 1, "grokfast_alpha", self.grokfast_alpha,
                "must lie in [0, 1]")
        require(self.grokfast_lambda >= 0, "grokfast_lambda", self.grokfast_lambda, "must be >= 0")
        require(0 <= self.warmup_fraction < 1, "warmup_fraction", self.warmup_fraction,
                "must lie in [0, 1): warmup must be shorter than the schedule")
        if self.clip_max_norm is not None:
            require_max_norm(self.clip_max_norm)
        require_patience(self.patience)
        require_min_delta(self.min_delta)
        require(self.best_rule in BEST_RULES, "best_rule", self.best_rule,
                f"must be one of {BEST_RULES}")


FIXED = CurriculumLMConfig()
BROKEN = CurriculumLMConfig(                 # the seed's Phase-1 pipeline
    stage3_repeats_stage2=True, recreate_optimizer_per_stage=True, constant_lr=True,
    lr=0.01, clip_max_norm=None, early_stopping=False, best_rule="seed",
    val_from_train=True, balance=False)
