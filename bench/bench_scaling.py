"""How the cost of a check grows with model size: a table users read before checking a real model.

One call of the check (no Hypothesis overhead) at increasing hidden size, batch and
sequence length. Reported, no budget.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from bench import Result, best_of, under
from invariants import (LoraConfig, assert_adapter_identity_at_init, assert_adapter_kl_zero,
                        assert_checkpoint_gradient_equivalent, assert_merge_roundtrip)
from reference_models import hyperlora as h
from reference_models import lora_init as m


def run() -> list[Result]:
    torch.set_num_threads(1)
    results = []
    for d in (64, 256, 1024):
        for batch in (1, 64):
            base, adapted = m.make_pair(LoraConfig(d, d, 16, scale=10.0), m.FIXED)
            x = torch.randn(batch, d)
            secs = best_of(lambda: assert_adapter_identity_at_init(base, adapted, x), repeat=3,
                           number=5)
            results.append(under(f"L1 identity check, d={d}, batch={batch}", secs * 1e3, "ms", None))
    for d in (64, 512):
        base, adapted = m.make_pair(LoraConfig(d, d, 16, scale=10.0), m.FIXED)
        x = torch.randn(64, d)
        secs = best_of(lambda: assert_merge_roundtrip(adapted, x), repeat=3, number=5)
        results.append(under(f"L6 merge round-trip, d={d}, batch=64", secs * 1e3, "ms", None))
    for seq in (8, 64, 256):
        cfg = m.TinyLMConfig(d_model=32, seq_len=seq)
        base = m.TinyLM(cfg)
        adapted = m.apply_lora(base, m.FIXED)
        tokens = torch.randint(0, cfg.vocab, (4, seq))
        secs = best_of(lambda: assert_adapter_kl_zero(base, adapted, tokens), repeat=3, number=3)
        results.append(under(f"L2 KL check, tiny LM d=32, seq={seq}, batch=4", secs * 1e3, "ms",
                             None))
    # S4: checkpoint gradient equivalence (two forward+backward passes, graph walk)
    for d in (32, 128, 512):
        layer = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        x = torch.randn(16, d, requires_grad=True)
        deltas = {"w": torch.randn(d, d, requires_grad=True) * 0.01}

        def step(x, h, deltas, layer=layer):
            out = layer(x) + x @ deltas["w"]
            return out if h is None else out + h

        secs = best_of(lambda: assert_checkpoint_gradient_equivalent(
            step, (x, None, deltas), use_reentrant=False), repeat=3, number=3)
        results.append(under(f"S4 checkpoint equivalence, d={d}, batch=16", secs * 1e3, "ms",
                             None))
    # golden-run cost: one training step of the seed-000 solver (what a golden run repeats)
    for hidden, batch in ((12, 16), (32, 16), (64, 32), (128, 32)):
        cfg = replace(h.FIXED, hidden_dim=hidden, predictor_dim=max(16, hidden), batch_size=batch)
        model = h.build_solver(cfg)
        opt = torch.optim.Adam(h.param_groups(model, cfg))
        grid, target, context = h.make_batch(cfg, torch.Generator().manual_seed(0))

        def train_step():
            logits, deltas = model(grid, context)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()

        secs = best_of(train_step, repeat=3, number=5)
        results.append(under(f"golden-run step, HyperLoRA solver hidden={hidden}, batch={batch}",
                             secs * 1e3, "ms", None))
    return results
