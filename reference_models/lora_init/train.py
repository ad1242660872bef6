"""Seed 003 training: pre-train the tiny LM, then fine-tune it with LoRA (the golden run).
"""
from __future__ import annotations

import torch
from torch import nn

from invariants import seeded
from reference_models import data_parallel
from reference_models.lora_init.config import LoraInitConfig
from reference_models.lora_init.model import (
    LoraLinear,
    TinyLM,
    TinyLMConfig,
    apply_lora,
)


# ------------------------------------------------------------ golden run (seed 003)
def _task_batch(gen: torch.Generator, vocab: int, batch: int, length: int, shift: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic next-token task: each token is followed by (token + shift) mod vocab."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    seq = (start + shift * torch.arange(length + 1)) % vocab  # (B, T+1)
    return seq[:, :-1], seq[:, 1:]


def finetune_curves(cfg: LoraInitConfig, *, seed: int = 0, pretrain_steps: int = 150,
                    finetune_steps: int = 40, lr: float = 3e-3) -> dict[str, tuple[list, list]]:
    """Pretrain a tiny LM in code (shift-1 task), attach LoRA per ``cfg``, fine-tune (shift-2).

    Records per fine-tune step: loss, accuracy, kl_from_base (KL of the adapted model's
    next-token distribution from the frozen pretrained base on a fixed probe batch),
    entropy, adapter_delta_norm (Σ‖scale·A·B‖F over adapters; not seed 000's per-sample
    HyperLoRA ``lora_norm``, whose thresholds assume a normalised base). Step 0 is before any update, so a
    fixed run shows kl_from_base == 0 there and a broken run does not.
    """
    with seeded(seed):  # dropout draws from a seeded, private stream
        return _finetune(cfg, seed, pretrain_steps, finetune_steps, lr)


def _finetune(cfg: LoraInitConfig, seed: int, pretrain_steps: int, finetune_steps: int,
              lr: float) -> dict[str, tuple[list, list]]:
    lm_cfg = TinyLMConfig()
    gen = torch.Generator().manual_seed(seed)
    base = TinyLM(lm_cfg, seed=seed)
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    for _ in range(pretrain_steps):
        x, y = _task_batch(gen, lm_cfg.vocab, 16, lm_cfg.seq_len, shift=1)
        loss = nn.functional.cross_entropy(base(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    adapted = apply_lora(base, cfg, seed=seed)
    adapters = [m for m in adapted.modules() if isinstance(m, LoraLinear)]
    params = [p for m in adapters for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.Adam(params, lr=lr)
    probe_x, _ = _task_batch(torch.Generator().manual_seed(seed + 1), lm_cfg.vocab, 8,
                             lm_cfg.seq_len, shift=2)
    with torch.no_grad():
        base_logp = torch.log_softmax(base(probe_x).double(), -1)
    curves: dict[str, list[float]] = {k: [] for k in
                                      ("loss", "accuracy", "kl_from_base", "entropy",
                                       "adapter_delta_norm")}
    # Under a process group (world size W) only the fine-tune is data-parallel: the
    # pretraining above is the fixture, replayed identically on every rank.
    distributed = data_parallel.active()
    net = adapted
    if distributed:
        for m in adapters:   # the full batch's dropout mask, as one process draws it
            m.dropout = data_parallel.ShardedDropout(m.dropout.p, full_batch=16)
        net = data_parallel.wrap(adapted)
    for step in range(finetune_steps + 1):
        adapted.eval()
        with torch.no_grad():   # on the fixed probe batch: replicated, needs no reduction
            logp = torch.log_softmax(adapted(probe_x).double(), -1)
            curves["kl_from_base"].append(float((base_logp.exp() * (base_logp - logp)).sum(-1).mean()))
            curves["entropy"].append(float(-(logp.exp() * logp).sum(-1).mean()))
            curves["adapter_delta_norm"].append(
                float(sum(m.delta_weight().norm() for m in adapters)))
        adapted.train()
        x, y = _task_batch(gen, lm_cfg.vocab, 16, lm_cfg.seq_len, shift=2)
        if distributed:         # every rank drew the full batch: keep its rows
            x, y = data_parallel.shard(x, y)
        logits = net(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if distributed:         # log the FULL batch's loss and accuracy, same formulas
            logits = data_parallel.gather(logits, full=16)
            y = data_parallel.gather(y, full=16)
            with torch.no_grad():
                logged = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            logged = loss
        curves["loss"].append(float(logged.detach()))
        curves["accuracy"].append(float((logits.argmax(-1) == y).double().mean()))
        if step < finetune_steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    steps = list(range(finetune_steps + 1))
    return {k: (steps, v) for k, v in curves.items()}


GOLDEN_NOTE = (
    "Seed 003 says random A,B (~0.01) with scale 10 garbles the model. In this 2-layer LM the "
    "seed's init gives an initial KL from the base of ~1e-6 nats: the mechanism (a non-zero "
    "perturbation at step 0, before any learning) is reproduced; downstream garbled generation "
    "is not, and is not forced. Fixed (zero-init B) starts at KL exactly 0.")
