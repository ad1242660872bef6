"""Seed 004 config: ``EvolvingContextConfig`` (every fix behind a flag), ``FIXED``, ``PRE_FIX``
and the one-fix-broken variants.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from invariants.validation import (
    require,
    require_in_unit_interval,
    require_non_negative,
    require_positive,
)

SYSTEM = "evolving_context"
PCT_NORMALISERS = ("prev", "new")           # "new" is a broken E6 variant
SHARE_DENOMINATORS = ("total", "decoder")   # "decoder" is a broken E6 variant


@dataclass(frozen=True)
class EvolvingContextConfig:
    d_model: int = 16          # tiny width; the seed's model is far wider
    n_slots: int = 4           # L: context rows per sample
    n_demos: int = 3           # N: demo encodings per sample
    n_classes: int = 4         # synthetic task: the class the demos share
    act_steps: int = 3         # ACT steps per forward (context refined at each)
    ema_decay: float = 0.9     # Fix 2: z = 0.9·z_prev + 0.1·z_raw
    alpha: float = 0.3         # Fix 3: "alpha = 0.3  # Scaling factor"
    detach_query: bool = True  # Fix 4: query = carry.z_e.detach()
    context_norm: bool = True  # Fix 6: F.layer_norm(context, context.shape[-1:])
    layer_norm_eps: float = 1e-5  # F.layer_norm's default, as the seed calls it
    rms_eps: float = 1e-6      # eps of the encoder's rms_norm
    encoder_lr_scale: float = 0.3  # Fix 1: "Encoder learns at 30% of decoder's rate"
    base_lr: float = 1e-2      # decoder (base) lr of train_steps: FIXED reaches 100 % train
                               # accuracy within 100 steps at this lr (3e-3: ~70 %)
    weight_decay: float = 0.01  # AdamW; with lr 0 it must not move a frozen encoder
    grad_clip: float = 1.0     # seed: "Global gradient clipping (norm=1.0)"
    batch: int = 16
    # broken variants (each the bug of one fix; defaults = fixed)
    ignore_ema: bool = False        # E1: unsmoothed update (β configured, not applied)
    keep_carry_graph: bool = False  # E1: carry returned without .detach()
    ignore_alpha: bool = False      # E2: α = 1 where 0.3 is configured
    ignore_lr_scale: bool = False   # E5: encoder group gets the base lr
    pct_normaliser: str = "prev"    # E6: "new" divides by mean‖z_new‖ (not from the seed)
    share_denominator: str = "total"  # E6: "decoder" divides by ‖g_dec‖ (not from the seed)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_slots", "n_demos", "n_classes", "act_steps", "batch"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require_in_unit_interval("ema_decay", self.ema_decay)
        require_non_negative("alpha", self.alpha)
        require_non_negative("encoder_lr_scale", self.encoder_lr_scale)
        require_positive("base_lr", self.base_lr)
        require_non_negative("weight_decay", self.weight_decay)
        require_positive("layer_norm_eps", self.layer_norm_eps)
        require_positive("rms_eps", self.rms_eps)
        require_positive("grad_clip", self.grad_clip)
        require(self.pct_normaliser in PCT_NORMALISERS, "pct_normaliser", self.pct_normaliser,
                f"must be one of {PCT_NORMALISERS}")
        require(self.share_denominator in SHARE_DENOMINATORS, "share_denominator",
                self.share_denominator, f"must be one of {SHARE_DENOMINATORS}")


FIXED = EvolvingContextConfig()
PRE_FIX = EvolvingContextConfig(ema_decay=0.0, alpha=1.0, detach_query=False,
                                context_norm=False, encoder_lr_scale=1.0)
BROKEN = {
    "unsmoothed_update": replace(FIXED, ignore_ema=True),
    "carry_keeps_graph": replace(FIXED, keep_carry_graph=True),
    "alpha_ignored": replace(FIXED, ignore_alpha=True),
    "query_not_detached": replace(FIXED, detach_query=False),
    "no_normalisation": replace(FIXED, context_norm=False),
    "lr_scale_ignored": replace(FIXED, ignore_lr_scale=True),
    "pct_wrong_normaliser": replace(FIXED, pct_normaliser="new"),
    "share_over_decoder": replace(FIXED, share_denominator="decoder"),
}
