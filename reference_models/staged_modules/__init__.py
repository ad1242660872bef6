"""Seed 001 — background collapse from modules active too early (SPEC S1-S6).

A tiny grid solver (colour 0 = background) with the four modules the seed
blames for running from epoch 0:
  * HyperLoRA: per-sample deltas ΔW = scaling·A·B for the solver, predicted from
    the support context (seed 000's network, tiny);
  * SolverCrossAttention: the solver state attends to support features each step;
  * CrossAttentionInjector: context injection by attention, with FiLM
    (γ·x + β) as the fallback used before its start epoch;
  * HPM: routing to a small memory bank.
Fixed path (the seed's "FIX IMPLEMENTED" / Option A): each module is gated by
``epoch >= <module>_start_epoch`` and is absent from the computation before it
(HyperLoRA deltas not applied, attention and HPM skipped, injector = FiLM with
identity init).  Broken paths, each behind one config flag: modules active from
epoch 0 (the seed's bug), a flag that never turns on, random FiLM init, the
reentrant checkpoint (seed "Gradient Checkpointing Issues"), a start epoch
parsed but ignored (seed: "hpm_start_epoch ... make sure it's read"), EMA
disabled while ``use_ema`` claims it on (seed: "EMA Disabled").

The solver step ``solver_step(x, h, lora_deltas, support)`` is the function the
seed checkpoints: ``h`` is None on the first step, ``lora_deltas`` a dict of
tensors produced upstream by HyperLoRA, ``support`` None when there is none.
"""
from __future__ import annotations

from reference_models.staged_modules.cases import *  # noqa: F401,F403
from reference_models.staged_modules.config import *  # noqa: F401,F403
from reference_models.staged_modules.model import *  # noqa: F401,F403
from reference_models.staged_modules.train import *  # noqa: F401,F403
