"""How the cost of a check grows with model size: a table users read before checking a real model.

One call of the check (no Hypothesis overhead) at increasing hidden size, batch and
sequence length. Reported, no budget.
"""
from __future__ import annotations

import torch

from bench import Result, best_of, under
from invariants import (LoraConfig, assert_adapter_identity_at_init, assert_adapter_kl_zero,
                        assert_merge_roundtrip)
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
    return results
