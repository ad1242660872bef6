"""Seed 004 — a decoder chasing an evolving encoder context (SPEC E1-E6).

ETRMTRM-style model, tiny: an encoder refines a context z_e (B, L, D) from
(carry, demo encodings) by cross-attention at every ACT step, and a small
recurrent decoder reads the (normalised) context at every step.

One encoder step (the seed's ``recurrent_standard.py``):
    query = z_prev.detach() if detach_query else z_prev       # Fix 4 (E3)
    z1    = rms_norm(z_prev + α·attn(query, demos))           # Fix 3 (E2)
    z_raw = rms_norm(z1 + α·mlp(z1))                          # Fix 3 (E2)
    z     = β·z_prev.detach() + (1 − β)·z_raw                 # Fix 2 (E1), β = 0.9
    carry = z.detach()                                        # E1: no graph across steps
    context = layer_norm(z)                                   # Fix 6 (E4), read by the decoder
The encoder's parameters sit in their own param group with
lr = encoder_lr_scale × base lr (Fix 1 and Fix 5, E5). Diagnostics as the
seed's "Diagnostic Step 1" and "Step 2" (E6).

``FIXED`` has every fix on; ``PRE_FIX`` is the seed's model before the fixes
(no smoothing, α = 1, query not detached, no context norm, scale 1). Each
broken variant of the catalog turns exactly one fix into its bug, behind a flag.
"""
from __future__ import annotations

from reference_models.evolving_context.cases import *  # noqa: F401,F403
from reference_models.evolving_context.cases import (
    _WIDTH,  # noqa: F401  (used by tests)
    _encoder,  # noqa: F401  (used by tests)
)
from reference_models.evolving_context.config import *  # noqa: F401,F403
from reference_models.evolving_context.model import *  # noqa: F401,F403
from reference_models.evolving_context.train import *  # noqa: F401,F403
