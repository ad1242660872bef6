"""Seed 004 model: the context encoder (smoothing, residual scale, stop-gradient, normalisation),
the decoder and the model that runs them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from invariants import PCT_UNDEFINED_BELOW
from invariants.validation import require_non_negative, require_positive
from reference_models.evolving_context.config import EvolvingContextConfig


class ContextEncoder(nn.Module):
    """Recurrent encoder: one call refines z_e once (one ACT step)."""

    def __init__(self, cfg: EvolvingContextConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.z_init = nn.Parameter(torch.randn(cfg.n_slots, d))  # (L, D) initial context

    @property
    def alpha(self) -> float:
        return 1.0 if self.cfg.ignore_alpha else self.cfg.alpha

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], eps=self.cfg.rms_eps)

    def attention(self, query: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        # query (B, L, D), demos (B, N, D) -> (B, L, D)
        q, k, v = self.q_proj(query), self.k_proj(demos), self.v_proj(demos)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, L, N)
        return self.o_proj(att.softmax(-1) @ v)

    def query_branch(self, z_prev: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        """The cross-attention output, with z_prev as the query (E3's subject)."""
        query = z_prev.detach() if self.cfg.detach_query else z_prev  # Fix 4 / broken
        return self.attention(query, demos)

    def attn_block(self, z_prev: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        return self.norm(z_prev + self.alpha * self.query_branch(z_prev, demos))

    def mlp_block(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(z + self.alpha * self.mlp(z))

    def raw_step(self, z_prev: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        """The unsmoothed update z_raw (B, L, D)."""
        return self.mlp_block(self.attn_block(z_prev, demos))

    def forward(self, z_prev: torch.Tensor, demos: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(carry z_prev (B, L, D), demos (B, N, D)) -> (new carry, context with graph)."""
        z_raw = self.raw_step(z_prev, demos)
        if self.cfg.ignore_ema:  # broken E1: the configured factor is not applied
            z = z_raw
        else:                    # Fix 2: smoothed with the previous state
            beta = self.cfg.ema_decay
            z = beta * z_prev.detach() + (1.0 - beta) * z_raw
        carry = z if self.cfg.keep_carry_graph else z.detach()
        return carry, z

    def carry_step(self, z_prev: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        """Carry in, carry out: the subject of E1."""
        return self(z_prev, demos)[0]


class ContextDecoder(nn.Module):
    """Recurrent decoder: h ← tanh(W[h, x, pool(context)]); logits = head(h)."""

    def __init__(self, cfg: EvolvingContextConfig):
        super().__init__()
        d = cfg.d_model
        self.cell = nn.Linear(3 * d, d)
        self.head = nn.Linear(d, cfg.n_classes)

    def forward(self, h: torch.Tensor, x: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # h (B, D), x (B, D), context (B, L, D) -> h (B, D), logits (B, C)
        h = torch.tanh(self.cell(torch.cat([h, x, context.mean(dim=1)], dim=-1)))
        return h, self.head(h)


class EvolvingContextModel(nn.Module):
    def __init__(self, cfg: EvolvingContextConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ContextEncoder(cfg)
        self.decoder = ContextDecoder(cfg)

    def normalize_context(self, context: torch.Tensor) -> torch.Tensor:
        if not self.cfg.context_norm:  # broken E4 / pre-fix: raw context to the decoder
            return context
        return F.layer_norm(context, context.shape[-1:], eps=self.cfg.layer_norm_eps)  # Fix 6

    def forward(self, x: torch.Tensor, demos: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """x (B, D), demos (B, N, D) -> per-ACT-step logits (B, C) and (z_prev, z_new) pairs."""
        b = x.shape[0]
        z = self.encoder.z_init.unsqueeze(0).expand(b, -1, -1)  # (B, L, D)
        h = torch.zeros_like(x)
        logits, pairs = [], []
        for _ in range(self.cfg.act_steps):
            z_new, context = self.encoder(z, demos)
            h, out = self.decoder(h, x, self.normalize_context(context))
            logits.append(out)
            pairs.append((z.detach(), z_new.detach()))
            z = z_new
        return logits, pairs

    # ---------------------------------------------------------------- E5
    def param_groups(self, base_lr: float | None = None,
                     encoder_lr_scale: float | None = None) -> list[dict[str, Any]]:
        """[decoder group at base lr, encoder group at scale × base lr] (Fix 1)."""
        base_lr = self.cfg.base_lr if base_lr is None else base_lr
        scale = self.cfg.encoder_lr_scale if encoder_lr_scale is None else encoder_lr_scale
        require_positive("base_lr", base_lr)
        require_non_negative("encoder_lr_scale", scale)
        enc_lr = base_lr if self.cfg.ignore_lr_scale else scale * base_lr  # broken / fixed
        return [{"params": list(self.decoder.parameters()), "lr": base_lr, "name": "decoder"},
                {"params": list(self.encoder.parameters()), "lr": enc_lr, "name": "encoder"}]

    # ---------------------------------------------------------------- E6
    def context_diagnostics(self, z_prev: torch.Tensor, z_new: torch.Tensor
                            ) -> dict[str, torch.Tensor]:
        """The seed's Diagnostic Step 1 (under no_grad, in the context's dtype)."""
        with torch.no_grad():
            delta = (z_new - z_prev).norm(dim=-1).mean()
            out = {"z_e_step_change": delta}
            ref = z_prev if self.cfg.pct_normaliser == "prev" else z_new  # "new" is broken
            z_norm = ref.norm(dim=-1).mean()
            if z_prev.norm(dim=-1).mean() > PCT_UNDEFINED_BELOW:
                out["z_e_step_change_pct"] = delta / z_norm
            return out

    def grad_norms(self) -> dict[str, float]:
        """Global gradient norms and the encoder's share (the seed's Step 2)."""
        def norm(params) -> torch.Tensor:
            sq = [p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None]
            return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64)
        g_enc = norm(self.encoder.parameters())
        g_dec = norm(self.decoder.parameters())
        g_total = (g_enc ** 2 + g_dec ** 2).sqrt()
        denom = g_total if self.cfg.share_denominator == "total" else g_dec  # "decoder" broken
        share = g_enc / denom if float(denom) > 0 else torch.zeros((), dtype=torch.float64)
        return {"grad_norm_encoder": float(g_enc), "grad_norm_decoder": float(g_dec),
                "grad_norm": float(g_total), "encoder_grad_share": float(share)}
