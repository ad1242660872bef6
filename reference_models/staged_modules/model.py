"""Seed 001 model: FiLM, the injectors, HPM, HyperLoRA, the staged solver whose step is
checkpointed, the weight EMA, and the generic tree-argument step S4 checks.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from invariants import clamp_frobenius, seeded
from invariants.validation import require
from reference_models.staged_modules.config import (
    FIXED,
    MODULES,
    USE_KEYS,
    StagedModulesConfig,
    staging_flags,
)


# ------------------------------------------------------------------ modules
class FiLM(nn.Module):
    """γ·x + β with (γ − 1, β) predicted from a context vector; identity at init (S3)."""

    def __init__(self, d: int, init: str = "identity"):
        super().__init__()
        self.proj = nn.Linear(d, 2 * d)
        if init == "identity":   # fixed: W = 0, b = 0 -> γ = 1, β = 0 for any context
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        # "random": nn.Linear's default init (broken S3: γ ≈ 1 ± noise, β ≈ noise)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x (B, N, D), context (B, D) -> (B, N, D)
        gamma_minus_1, beta = self.proj(context).chunk(2, dim=-1)  # (B, D) each
        return (1 + gamma_minus_1)[:, None, :] * x + beta[:, None, :]


class _Attention(nn.Module):
    """Single-head attention of queries onto a key/value set; random Q/K/V/O."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # x (B, N, D), kv (B, M, D) -> (B, N, D)
        att = (self.q(x) @ self.k(kv).transpose(-1, -2)) / math.sqrt(x.shape[-1])  # (B, N, M)
        return self.o(att.softmax(-1) @ self.v(kv))


class CrossAttentionInjector(nn.Module):
    """Context injection by cross-attention onto support tokens, FiLM as the fallback.

    ``attention=False`` builds the FiLM-only injector: the model without the
    cross-attention module (same parameter names, so weights load across).
    """

    def __init__(self, d: int, film_init: str, attention: bool = True):
        super().__init__()
        self.film = FiLM(d, film_init)
        self.attn = _Attention(d) if attention else None

    def forward(self, x: torch.Tensor, support: torch.Tensor, context: torch.Tensor, *,
                active: bool) -> torch.Tensor:
        # x (B, N, D), support (B, M, D), context (B, D) -> (B, N, D)
        if self.attn is None or not active:
            return self.film(x, context)            # fallback: γ·x + β
        return x + self.attn(x, support)            # seed: "features + attn @ V"


class SolverCrossAttention(nn.Module):
    """The solver state attends to the support features at each step."""

    def __init__(self, d: int):
        super().__init__()
        self.attn = _Attention(d)

    def forward(self, h: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
        return h if support is None else h + self.attn(h, support)  # (B, N, D)


class HPM(nn.Module):
    """Hierarchical primitive memory, tiny: soft routing to a bank of slots."""

    def __init__(self, d: int, slots: int):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(slots, d) / math.sqrt(d))    # (S, D)
        self.values = nn.Parameter(torch.randn(slots, d) / math.sqrt(d))  # (S, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        route = (h @ self.keys.T / math.sqrt(h.shape[-1])).softmax(-1)   # (B, N, S)
        return h + route @ self.values


class HyperLoRA(nn.Module):
    """Context (B, D) -> {"input": ΔW, "hidden": ΔW}, ΔW = scaling·A·B of shape (B, D, D)."""

    def __init__(self, d: int, rank: int, scaling: float, max_norm: float | None = None):
        super().__init__()
        self.d, self.rank, self.scaling, self.max_norm = d, rank, scaling, max_norm
        self.a = nn.ModuleDict({k: nn.Linear(d, d * rank) for k in ("input", "hidden")})
        self.b = nn.ModuleDict({k: nn.Linear(d, rank * d) for k in ("input", "hidden")})

    def forward(self, context: torch.Tensor) -> dict[str, torch.Tensor]:
        b, d, r = context.shape[0], self.d, self.rank
        deltas = {k: self.scaling * (self.a[k](context).view(b, d, r)
                                     @ self.b[k](context).view(b, r, d))
                  for k in ("input", "hidden")}
        if self.max_norm is not None:  # seed 000 §2.2: ‖ΔW_i‖F <= τ per sample
            deltas = {k: clamp_frobenius(v, self.max_norm) for k, v in deltas.items()}
        return deltas


class StagedSolver(nn.Module):
    """grid (B, G, G) long + support (B, S, 2, G, G) long -> logits (B, G·G, C)."""

    def __init__(self, cfg: StagedModulesConfig):
        super().__init__()
        self.cfg = cfg
        d, c, n = cfg.hidden_dim, cfg.num_colors, cfg.grid_size ** 2
        self.embed = nn.Embedding(c, d)
        self.pos = nn.Parameter(torch.randn(n, d) * 0.1)           # (N, D)
        self.embed_out = nn.Embedding(c, d)                         # support output colours
        self.injector = CrossAttentionInjector(d, cfg.film_init, cfg.use_cross_attention_context)
        self.hyperlora = HyperLoRA(d, cfg.lora_rank, cfg.lora_scaling, cfg.hyperlora_max_norm) \
            if cfg.use_hyperlora else None
        self.solver_context = SolverCrossAttention(d) if cfg.use_solver_context else None
        self.hpm = HPM(d, cfg.hpm_slots) if cfg.use_hpm else None
        self.w_in, self.w_h, self.gate = nn.Linear(d, d), nn.Linear(d, d, bias=False), \
            nn.Linear(2 * d, d)
        self.head = nn.Linear(d, c)
        with torch.no_grad():
            self.head.bias[0] = cfg.bg_bias  # seed: bg_bias on the background logit
        self.flags = staging_flags(cfg, 0)

    def set_epoch(self, epoch: int) -> dict[str, bool]:
        self.flags = staging_flags(self.cfg, epoch)
        return self.flags

    def encode_support(self, support: torch.Tensor) -> torch.Tensor:
        # support (B, S, 2, G, G) -> tokens (B, S·N, D): input colour + output colour + position
        b, s = support.shape[:2]
        tok = self.embed(support[:, :, 0].flatten(2)) + self.embed_out(support[:, :, 1].flatten(2))
        return (tok + self.pos).reshape(b, s * self.pos.shape[0], -1)

    def solver_step(self, x: torch.Tensor, h: torch.Tensor | None,
                    lora_deltas: dict[str, torch.Tensor], support: torch.Tensor | None
                    ) -> torch.Tensor:
        """One GRU-style solver step; the function the seed wraps in checkpoint().

        It reads the staging flags from ``self.flags``: under checkpointing the
        step is recomputed during backward, so the flags must not change between
        a forward and its backward (set_epoch is called between epochs only).
        """
        # x (B, N, D); h (B, N, D) or None on the first step; deltas {} or {name: (B, D, D)}
        if h is None:
            h = torch.zeros_like(x)
        u = self.w_in(x)
        if "input" in lora_deltas:
            u = u + torch.bmm(x, lora_deltas["input"])               # x·ΔW_in
        v = self.w_h(h)
        if "hidden" in lora_deltas:
            v = v + torch.bmm(h, lora_deltas["hidden"])              # h·ΔW_h
        z = torch.sigmoid(self.gate(torch.cat([x, h], dim=-1)))      # (B, N, D)
        h_new = (1 - z) * h + z * torch.tanh(u + v)
        if self.solver_context is not None and self.flags["solver_context"]:
            h_new = self.solver_context(h_new, support)
        if self.hpm is not None and self.flags["hpm"]:
            h_new = self.hpm(h_new)
        return h_new

    def forward(self, grid: torch.Tensor, support: torch.Tensor, *,
                epoch: int | None = None) -> torch.Tensor:
        if epoch is not None:
            self.set_epoch(epoch)
        flags = self.flags
        x = self.embed(grid.flatten(1)) + self.pos                    # (B, N, D)
        support_tokens = self.encode_support(support)                 # (B, M, D)
        context = support_tokens.mean(1)                              # (B, D)
        x = self.injector(x, support_tokens, context, active=flags["cross_attention"])
        deltas: dict[str, torch.Tensor] = {}
        if self.hyperlora is not None and flags["hyperlora"]:
            deltas = self.hyperlora(context)                          # {name: (B, D, D)}
        h = None
        for _ in range(self.cfg.num_solver_steps):
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(self.solver_step, x, h, deltas, support_tokens,
                               use_reentrant=self.cfg.checkpoint_reentrant)
            else:
                h = self.solver_step(x, h, deltas, support_tokens)
        return self.head(h)                                           # (B, N, C)

    def without(self, module: str) -> "StagedSolver":
        """The same model (same weights) built without ``module`` (injector: FiLM only)."""
        require(module in MODULES, "module", module, f"must be one of {MODULES}")
        other = StagedSolver(replace(self.cfg, **{USE_KEYS[module]: False}))
        missing, _ = other.load_state_dict(self.state_dict(), strict=False)
        assert not missing, missing  # every parameter of the smaller model comes from self
        other.train(self.training)
        return other


def build_model(cfg: StagedModulesConfig = FIXED, *, seed: int = 0) -> StagedSolver:
    with seeded(seed):
        return StagedSolver(cfg)


# ------------------------------------------------------------------ EMA
class WeightEMA:
    """ema ← d·ema + (1−d)·w over the model's parameters (seed: use_ema)."""

    def __init__(self, model: nn.Module, decay: float, *, wired: bool = True):
        require(0.0 <= decay <= 1.0, "decay", decay, "must lie in [0, 1]")
        self.decay, self.wired = decay, wired
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if not self.wired:  # broken S5: use_ema=True in the config, but nothing is averaged
            return
        for name, p in model.named_parameters():
            self.shadow[name].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    def copy_to(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.shadow[name])


def make_ema(model: nn.Module, cfg: StagedModulesConfig) -> WeightEMA | None:
    return WeightEMA(model, cfg.ema_decay, wired=cfg.ema_wired) if cfg.use_ema else None


# ------------------------------------------------------------------ generic step for S4
class TreeStep(nn.Module):
    """A step taking any ArgumentLayout: z = tanh(lin(x) + mix(h) + Σ_leaves x·ΔW)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin, self.mix = nn.Linear(d, d), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None, deltas: Any = None
                ) -> torch.Tensor:
        z = self.lin(x)                                              # (B, D)
        if h is not None:
            z = z + self.mix(h)
        stack = [deltas] if deltas is not None else []
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            else:
                z = z + torch.bmm(x[:, None, :], node)[:, 0]         # x·ΔW, ΔW (B, D, D)
        return torch.tanh(z)
