"""Seed 003 config: ``LoraInitConfig`` with the seed's options (zero-init B, random A and B,
tiny scale, orthogonal 4c) side by side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from invariants.validation import require

SYSTEM = "lora_init"
INITS = ("zero_b", "random", "orthogonal_4c", "both_zero")


@dataclass(frozen=True)
class LoraInitConfig:
    rank: int = 16            # seed "Current Configuration": rank 16
    scale: float = 10.0       # seed: scale 10.0 (the value that garbles the model)
    dropout: float = 0.05     # seed: dropout 0.05
    init: str = "zero_b"      # Option 1 (recommended); "random" is the seed's broken init
    random_std: float = 0.01  # seed: "random values ~0.01 magnitude"
    merge_forgets_scale: bool = False  # broken L6 variant: merge W + B·A without the scale
    ignore_scale: bool = False         # broken L3 variant (teeth, not from the seed)

    def __post_init__(self) -> None:
        require(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank,
                "must be an integer >= 1")
        require(math.isfinite(self.scale) and self.scale >= 0, "scale", self.scale,
                "must be a finite number >= 0")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "must lie in [0, 1)")
        require(self.init in INITS, "init", self.init, f"must be one of {INITS}")


FIXED = LoraInitConfig()                                      # Option 1: zero-init B
BROKEN = LoraInitConfig(init="random")                        # the seed's current config
TINY_SCALE = LoraInitConfig(init="random", scale=0.01)        # Option 2
ORTHOGONAL_4C = LoraInitConfig(init="orthogonal_4c")          # Option 4c (claim, refuted)
