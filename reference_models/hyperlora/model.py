"""Seed 000 model: the broken clamp variants, the HyperLoRA predictor, the LoRA-GRU cell and
solver, and the optimiser param groups and LoRA decay term (H5, H6).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from invariants import InvalidArgumentError, clamp_frobenius, seeded
from invariants.validation import require_finite
from reference_models.hyperlora.config import TARGETS, HyperLoRAConfig


# ------------------------------------------------------------------ clamps
def seed_clamp(delta: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Seed §2.2 ``compute_delta_w`` verbatim: norm and scale in the delta's dtype."""
    with torch.no_grad():
        norm = delta.norm(dim=(-2, -1), keepdim=True)
        scale = (max_norm / (norm + 1e-8)).clamp(max=1.0)
    return delta * scale


def always_rescale_clamp(delta: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Broken H2: divides by the norm every time (also scales small deltas *up* to τ)."""
    with torch.no_grad():
        norm = delta.norm(dim=(-2, -1), keepdim=True)
        scale = max_norm / (norm + 1e-8)
    return delta * scale


def value_clip_clamp(delta: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Broken H3 (not from the seed): clip each element to ±τ/√(mn), like clip_grad_value_.

    Keeps ‖ΔW‖F <= τ but changes the direction of any matrix it touches.
    """
    bound = max_norm / math.sqrt(delta.shape[-1] * delta.shape[-2])
    return delta.clamp(-bound, bound)


def no_grad_clamp(delta: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Broken H4: the whole delta multiplied under no_grad (the clamped ΔW is cut from the graph)."""
    with torch.no_grad():
        return clamp_frobenius(delta, max_norm)


CLAMPS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "exact": clamp_frobenius, "seed": seed_clamp, "always_rescale": always_rescale_clamp,
    "value_clip": value_clip_clamp, "no_grad": no_grad_clamp,
}


# ------------------------------------------------------------------ modules
class HyperLoRA(nn.Module):
    """Context (B, C) -> per-sample gate deltas (B, 6, H, H), one per name in ``TARGETS``."""

    def __init__(self, cfg: HyperLoRAConfig):
        super().__init__()
        self.cfg = cfg
        self.context_dim = cfg.context_dim
        t, h, r, p = len(TARGETS), cfg.hidden_dim, cfg.rank, cfg.predictor_dim
        self.trunk = nn.Linear(cfg.context_dim, p)
        self.head_a = nn.Linear(p, t * h * r)   # A: (B, T, H, r)
        self.head_b = nn.Linear(p, t * r * h)   # B: (B, T, r, H)
        self.clamp_fn = CLAMPS[cfg.clamp_mode]
        self.validate_inputs = True

    def raw_deltas(self, context: torch.Tensor) -> torch.Tensor:
        """ΔW = scaling · A · B before any clamp: (B, C) -> (B, T, H, H)."""
        cfg = self.cfg
        if context.dim() != 2 or context.shape[-1] != cfg.context_dim:
            raise InvalidArgumentError(
                f"context.shape={tuple(context.shape)}: must be (B, context_dim="
                f"{cfg.context_dim})")
        if self.validate_inputs:
            require_finite("context", context)
        b, t, h, r = context.shape[0], len(TARGETS), cfg.hidden_dim, cfg.rank
        z = F.relu(self.trunk(context))                  # (B, P); ReLU: no saturation, so
        a = self.head_a(z).view(b, t, h, r)              # huge contexts give huge deltas
        bb = self.head_b(z).view(b, t, r, h)
        return cfg.scaling * (a @ bb)                    # (B, T, H, H)

    def forward(self, context: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, T, H, H)
        delta = self.raw_deltas(context)
        if self.cfg.hyperlora_max_norm is None:        # broken: no clamp (seed pre-fix)
            return delta
        return self.clamp_fn(delta, self.cfg.hyperlora_max_norm)


class LoRAGRUCell(nn.Module):
    """GRU cell whose six gate weights take per-sample deltas (seed §1.2's z_t)."""

    def __init__(self, hidden: int):
        super().__init__()
        bound = 1.0 / math.sqrt(hidden)
        self.weight = nn.Parameter(torch.empty(len(TARGETS), hidden, hidden).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(3, hidden))

    def forward(self, x: torch.Tensor, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        # x, h: (B, N, H); deltas: (B, 6, H, H) ordered as TARGETS
        wx, wh = self.weight[0::2], self.weight[1::2]   # (3, H, H): xz, xr, xn / hz, hr, hn
        dx, dh = deltas[:, 0::2], deltas[:, 1::2]       # (B, 3, H, H)
        gx = torch.einsum("koi,bni->bkno", wx, x) + torch.einsum("bkoi,bni->bkno", dx, x)
        gh = torch.einsum("koi,bni->bkno", wh, h) + torch.einsum("bkoi,bni->bkno", dh, h)
        # gx, gh: (B, 3, N, H), gate k = z, r, n: W_xk x + ΔW_xk x and W_hk h + ΔW_hk h
        z = torch.sigmoid(gx[:, 0] + gh[:, 0] + self.bias[0])  # seed §1.2's z_t
        r = torch.sigmoid(gx[:, 1] + gh[:, 1] + self.bias[1])
        n = torch.tanh(gx[:, 2] + r * gh[:, 2] + self.bias[2])
        return (1 - z) * n + z * h                       # (B, N, H)


class HyperLoRASolver(nn.Module):
    """Grid (B, N) colours + context (B, C) -> logits (B, N, n_colors)."""

    def __init__(self, cfg: HyperLoRAConfig, hyperlora: Callable[..., nn.Module] = HyperLoRA):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_colors, cfg.hidden_dim)
        self.hyperlora = hyperlora(cfg)                  # built second: parameter order = RNG order
        self.cell = LoRAGRUCell(cfg.hidden_dim)
        self.head = nn.Linear(cfg.hidden_dim, cfg.n_colors)

    def solve(self, grid: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        x = self.embed(grid)                             # (B, N, H)
        h = torch.zeros_like(x)
        for _ in range(self.cfg.solver_steps):
            h = self.cell(x, h, deltas)
        return self.head(h)                              # (B, N, K)

    def forward(self, grid: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        deltas = self.hyperlora(context)                 # (B, T, H, H)
        return self.solve(grid, deltas), deltas


class GovernedStep(nn.Module):
    """The training forward as one module (DDP hooks need one ``forward``): clamp, solve."""

    def __init__(self, model: HyperLoRASolver, governor):
        super().__init__()
        self.model, self.governor = model, governor

    def forward(self, grid: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        deltas = self.governor.clamp(self.model.hyperlora(context))   # (B, T, H, H)
        return self.model.solve(grid, deltas), deltas                  # (B, N, K)


def build_solver(cfg: HyperLoRAConfig, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> HyperLoRASolver:
    """A solver initialised from ``seed`` without touching the global RNG."""
    with seeded(seed):
        return HyperLoRASolver(cfg).to(dtype)


# --------------------------------------------------- optimiser and decay (H5, H6)
def param_groups(model: HyperLoRASolver, cfg: HyperLoRAConfig) -> list[dict]:
    """Seed §2.2 Part 2: HyperLoRA params at ``multiplier × base_lr``, the rest at base_lr."""
    hyper = list(model.hyperlora.parameters())
    ids = {id(p) for p in hyper}
    base = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": base, "lr": cfg.base_lr, "name": "base"},
            {"params": hyper, "lr": cfg.base_lr * cfg.hyperlora_lr_multiplier,
             "name": "hyperlora"}]


def lora_decay_term(deltas: torch.Tensor, weight: float) -> torch.Tensor:
    """Seed §2.2 Part 3: λ · Σ_i ‖ΔW_i‖F² over every sample and gate (0 when λ = 0: broken)."""
    return weight * deltas.pow(2).sum()
