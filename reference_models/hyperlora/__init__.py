"""Seed 000 — HyperLoRA norm runaway in an RLAN-style GRU solver (SPEC H1-H7).

A HyperLoRA network predicts per-sample deltas for the solver's GRU gate
weights from a context vector (seed §1.2):
    ΔW = scaling · A · B,   scaling α = 0.1,   A: (H, r), B: (r, H) per sample,
    z_t = σ(W_hz h_{t-1} + W_xz x_t + ΔW_hz h_{t-1} + ΔW_xz x_t)   (same for r, n).
Fixed path (seed "FIXES APPLIED" and §2.2): ΔW clamped to ‖ΔW_i‖F <= 1.0,
HyperLoRA lr multiplier 1.0, LoRA decay λ·Σ‖ΔW_i‖F² with λ = 0.001, governor
warn 1.0 / critical 1.5 / kill 2.0 that clamps and stops on EMA > 1.5.
Broken path (the seed's pre-fix run): no clamp, multiplier 3.0, no decay, a
monitor-only governor warn 2.0 / critical 5.0 / kill 10.0. Other broken
variants (one per invariant's teeth) are clamp modes of the same config.

Everything is tiny (hidden 12, context 8, 3x3 grids) so properties run fast.
``train_steps`` is a deterministic short training run on synthetic grid tasks
generated in code: the target grid is the input with every colour shifted by
a per-sample k (mod 10), and the context is a fixed code of k plus noise, so
the solver can only succeed through the HyperLoRA deltas.
"""
from __future__ import annotations

from reference_models.hyperlora.cases import *  # noqa: F401,F403
from reference_models.hyperlora.config import *  # noqa: F401,F403
from reference_models.hyperlora.model import *  # noqa: F401,F403
from reference_models.hyperlora.train import *  # noqa: F401,F403

__all__ = ["BROKEN", "CLAMPS", "FIXED", "OLD_CAP", "SEED_CLAMP", "HyperLoRA", "HyperLoRAConfig",
           "HyperLoRASolver", "LoRAGRUCell", "build_solver", "cases", "governor_for",
           "lora_decay_term", "make_batch", "param_groups", "seed_clamp", "train_steps"]
