"""Seed 002 — curriculum transition divergence and LM mode collapse (SPEC P1-P9).

A tiny character-level language model trained on synthetic Q&A text made in
code (no download), through the whole pipeline the seed describes:

    sources (add, sub, cmp, recall) × difficulty level 1..3 (operand digits)
      -> de-duplicate -> per-source balancing (P9) -> 80/20 split per level (P8)
      -> curriculum: stage k = training samples of levels 1..k (P2)
      -> AdamW + Grokfast-EMA filter (P7), one optimizer for the run (P1)
      -> linear warmup + cosine LR per step (P6), grad clipping 1.0 (P5)
      -> validation every epoch: best checkpoint (P4), early stopping (P3)

Fixed and broken paths sit side by side behind ``CurriculumLMConfig`` flags;
``BROKEN`` is the seed's pipeline (stage 3 = stage 2, optimizer re-created per
stage, constant LR 0.01, no clipping, no early stopping, unbalanced sources).

Why AdamW and not Muon as the base step: Muon only applies to 2-D hidden
matrices and needs an AdamW fallback for embeddings, biases and the head (the
seed's ``fallback_lr``), i.e. two optimizers whose states must both survive a
stage boundary; the seed's failure is about state, schedule and filter, not
the orthogonalised update.  P1's check is optimizer-agnostic and is also run
on ``torch.optim.Muon`` in tests/test_curriculum_lm.py.
"""
from __future__ import annotations

from reference_models.curriculum_lm.cases import *  # noqa: F401,F403
from reference_models.curriculum_lm.config import *  # noqa: F401,F403
from reference_models.curriculum_lm.data import *  # noqa: F401,F403
from reference_models.curriculum_lm.model import *  # noqa: F401,F403
from reference_models.curriculum_lm.pipeline import *  # noqa: F401,F403
from reference_models.curriculum_lm.train import *  # noqa: F401,F403
