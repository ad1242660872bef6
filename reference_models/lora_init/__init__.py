"""Seed 003 — LoRA initialisation garbles the model (SPEC L1-L7).

Convention of the seed: for a row-vector input x (…, in),
    y = base(x) + scale · dropout(x) · A · B,   A: (in, rank) down,  B: (rank, out) up.
Fixed path: B = 0 ("Option 1: Zero Initialization"). Broken path: A and B both
random with std 0.01 and scale 10 ("Current Configuration"). The other options
of the seed are here too: tiny scale (Option 2), orthogonal A with B = -Aᵀ/scale
(Option 4c, a refuted claim: L5), progressive scale (Option 5).
"""
from __future__ import annotations

from reference_models.lora_init.cases import *  # noqa: F401,F403
from reference_models.lora_init.cases import _check_l1, _check_l7  # noqa: F401  (used by tests)
from reference_models.lora_init.config import *  # noqa: F401,F403
from reference_models.lora_init.model import *  # noqa: F401,F403
