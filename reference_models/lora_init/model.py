"""Seed 003 model: the LoRA linear layer, the tiny LM it adapts (L2) and the scale schedules (L4).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from invariants import LoraConfig, seeded
from invariants.validation import require
from reference_models.lora_init.config import LoraInitConfig


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank adapter; merge/unmerge like PEFT."""

    def __init__(self, base: nn.Linear, cfg: LoraInitConfig, generator: torch.Generator):
        super().__init__()
        require(cfg.rank <= min(base.in_features, base.out_features) or cfg.init != "orthogonal_4c",
                "rank", cfg.rank, "orthogonal_4c needs rank <= min(in, out)")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.scale = cfg.scale
        d_in, d_out, r = base.in_features, base.out_features, cfg.rank
        dt = base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(d_in, r, dtype=dt))   # (in, rank)
        self.lora_B = nn.Parameter(torch.empty(r, d_out, dtype=dt))  # (rank, out)
        self.dropout = nn.Dropout(cfg.dropout)
        self.merged = False
        with torch.no_grad():
            if cfg.init in ("zero_b", "both_zero"):
                bound = 1.0 / math.sqrt(d_in)  # kaiming-uniform-like, as PEFT does for A
                a = torch.rand(d_in, r, generator=generator, dtype=torch.float64) * 2 - 1
                self.lora_A.copy_(a * bound if cfg.init == "zero_b" else torch.zeros_like(a))
                self.lora_B.zero_()
            elif cfg.init == "random":
                self.lora_A.copy_(torch.randn(d_in, r, generator=generator,
                                              dtype=torch.float64) * cfg.random_std)
                self.lora_B.copy_(torch.randn(r, d_out, generator=generator,
                                              dtype=torch.float64) * cfg.random_std)
            else:  # orthogonal_4c: orthonormal columns of A, B = -Aᵀ / scale
                q, _ = torch.linalg.qr(torch.randn(d_in, r, generator=generator,
                                                   dtype=torch.float64))
                self.lora_A.copy_(q)
                self.lora_B.copy_(-q.T[:, :d_out] / cfg.scale)

    def effective_scale(self) -> float:
        return 1.0 if self.cfg.ignore_scale else self.scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear's (out, in) layout."""
        s = 1.0 if self.cfg.merge_forgets_scale else self.effective_scale()
        return s * (self.lora_A @ self.lora_B).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, in) -> (…, out)
        y = self.base(x)
        if self.merged:
            return y
        return y + self.effective_scale() * (self.dropout(x) @ self.lora_A @ self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def make_pair(lcfg: LoraConfig, cfg: LoraInitConfig, *, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> tuple[nn.Linear, LoraLinear]:
    """(base, adapted) with identical base weights; the adapter per ``cfg``.

    Rank, scale and dropout come from ``lcfg`` (drawn by Hypothesis); the init
    scheme and the broken-variant flags from ``cfg``.
    """
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(lcfg.in_features, lcfg.out_features).to(torch.float64)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(lcfg.in_features)
        base.weight.copy_((torch.rand(base.weight.shape, generator=gen, dtype=torch.float64)
                           * 2 - 1) * bound)
        base.bias.copy_((torch.rand(base.bias.shape, generator=gen, dtype=torch.float64)
                         * 2 - 1) * bound)
    base = base.to(dtype)
    cfg = replace(cfg, rank=lcfg.rank, dropout=lcfg.dropout, scale=lcfg.scale)
    adapted = LoraLinear(copy.deepcopy(base), cfg, gen)
    return base, adapted


# ---------------------------------------------------------------- tiny LM (L2)
@dataclass(frozen=True)
class TinyLMConfig:
    vocab: int = 16     # small vocabulary: KL is cheap and exact
    d_model: int = 16
    n_layers: int = 2   # the seed adapts 8 layers; 2 is enough for the cascade
    seq_len: int = 8


class TinyAttention(nn.Module):
    """Causal single-head self-attention with q/k/v/o projections (the seed's q_proj, v_proj)."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(x.shape[-1])  # (B, T, T)
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return x + self.o_proj(att @ v)


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig, seed: int = 0):
        super().__init__()
        with seeded(seed):  # seeded init; the caller's RNG is left alone
            self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
            self.blocks = nn.ModuleList(TinyAttention(cfg.d_model) for _ in range(cfg.n_layers))
            self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def apply_lora(model: nn.Module, cfg: LoraInitConfig, keys=("q_proj", "v_proj"),
               seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose Linear layers named in ``keys`` carry adapters."""
    adapted = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for module in list(adapted.modules()):
        for name, child in list(module.named_children()):
            if name in keys and isinstance(child, nn.Linear):
                setattr(module, name, LoraLinear(child, cfg, gen))
    return adapted


# ------------------------------------------------------- progressive scale (L4)
def linear_scale_schedule(target: float, total_steps: int) -> Callable[[int], float]:
    """Option 5: scale = target · step / total_steps, clipped at the target."""
    return lambda step: target * min(step, total_steps) / total_steps


def constant_scale_schedule(target: float, total_steps: int) -> Callable[[int], float]:
    """Broken L4 variant: the schedule starts (and stays) at the target."""
    return lambda step: target
