"""Seed 004 training: the task and the training loop with the seed's diagnostics (single process
or DDP).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from invariants import one_thread, seeded
from invariants.validation import require
from reference_models import data_parallel
from reference_models.evolving_context.config import FIXED, EvolvingContextConfig
from reference_models.evolving_context.model import EvolvingContextModel


# ------------------------------------------------------------ training (golden runs)
def make_task(cfg: EvolvingContextConfig, seed: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Synthetic few-shot task: the demos are noisy copies of a class prototype, the
    query x is noise plus a weak copy, and the label is the class. The decoder
    only sees the class through the context, so the encoder has to learn."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(cfg.n_classes, cfg.d_model, generator=gen)  # (C, D)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        y = torch.randint(cfg.n_classes, (cfg.batch,), generator=g)  # (B,)
        demos = protos[y].unsqueeze(1) + 0.5 * torch.randn(
            cfg.batch, cfg.n_demos, cfg.d_model, generator=g)         # (B, N, D)
        x = 0.2 * protos[y] + torch.randn(cfg.batch, cfg.d_model, generator=g)  # (B, D)
        return x, demos, y
    return batch


def build(cfg: EvolvingContextConfig, seed: int = 0
          ) -> tuple[EvolvingContextModel, torch.optim.Optimizer]:
    """The model (seeded init, global RNG untouched) and its AdamW with the two groups."""
    with seeded(seed):
        model = EvolvingContextModel(cfg)
    opt = torch.optim.AdamW(model.param_groups(), lr=cfg.base_lr,
                            weight_decay=cfg.weight_decay, foreach=False)
    return model, opt


def _optimise(net: nn.Module, model: EvolvingContextModel, opt: torch.optim.Optimizer,
              x: torch.Tensor, demos: torch.Tensor, y: torch.Tensor):
    """Forward through ``net`` (the model or its DDP wrapper), deep-supervised CE over the ACT
    steps, clip, AdamW. Returns (loss, logits, pairs, gradient norms before clipping)."""
    opt.zero_grad(set_to_none=True)
    logits, pairs = net(x, demos)
    loss = torch.stack([F.cross_entropy(out, y) for out in logits]).mean()
    loss.backward()
    metrics = model.grad_norms()  # before clipping, as logged in the seed
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.cfg.grad_clip)
    opt.step()
    return loss, logits, pairs, metrics


def _with_diagnostics(metrics: dict[str, float], model: EvolvingContextModel,
                      loss: torch.Tensor, logits: list[torch.Tensor], y: torch.Tensor,
                      z_prev: torch.Tensor, z_new: torch.Tensor) -> dict[str, float]:
    """The step's logged metrics: loss, accuracy (last ACT step) and the z_e diagnostics."""
    diag = model.context_diagnostics(z_prev, z_new)
    metrics.update(
        loss=float(loss.detach()),
        accuracy=float((logits[-1].argmax(-1) == y).double().mean()),
        z_e_step_change=float(diag["z_e_step_change"]),
        z_e_step_change_pct=float(diag.get("z_e_step_change_pct", math.nan)),
    )
    return metrics


def train_step(model: EvolvingContextModel, opt: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """One step: deep-supervised CE over the ACT steps, clip, AdamW. Returns its metrics."""
    x, demos, y = batch
    loss, logits, pairs, metrics = _optimise(model, model, opt, x, demos, y)
    z_prev = torch.stack([p for p, _ in pairs])  # (S, B, L, D)
    z_new = torch.stack([n for _, n in pairs])
    return _with_diagnostics(metrics, model, loss, logits, y, z_prev, z_new)


METRICS = ("loss", "accuracy", "z_e_step_change", "z_e_step_change_pct", "grad_norm",
           "grad_norm_encoder", "grad_norm_decoder", "encoder_grad_share")


def train_steps(cfg: EvolvingContextConfig = FIXED, steps: int = 100, seed: int = 0
                ) -> dict[str, list[float]]:
    """A short deterministic training run on synthetic data: per-step metric lists.

    Keys: ``METRICS``. ``z_e_step_change``/``_pct`` are over all rows of all ACT
    steps of the step's forward; gradient norms are taken before clipping.
    Runs with one intra-op thread (restored after), so the numbers do not depend
    on the machine's thread count; the global RNG is not touched. Same
    (cfg, steps, seed) -> the same numbers. About 0.3 s per 50 steps on one core.
    """
    require(isinstance(steps, int) and steps >= 1, "steps", steps, "must be an integer >= 1")
    require(isinstance(seed, int) and seed >= 0, "seed", seed, "must be an integer >= 0")
    with one_thread():
        model, opt = build(cfg, seed)
        task = make_task(cfg, seed)
        out: dict[str, list[float]] = {k: [] for k in METRICS}
        distributed = data_parallel.active()   # DDP over the batch; else single-process code
        net = data_parallel.wrap(model) if distributed else None
        for step in range(steps):
            if distributed:
                metrics = _ddp_train_step(net, model, opt, task(step))
            else:
                metrics = train_step(model, opt, task(step))
            for k in METRICS:
                out[k].append(metrics[k])
    return out


def _ddp_train_step(net: nn.Module, model: EvolvingContextModel, opt: torch.optim.Optimizer,
                    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """``train_step`` on this rank's rows of the full ``batch``, under DDP (``net``).

    The loss is a mean over equal shards (DDP's average is the full-batch gradient);
    the gradient norms are read after DDP's all-reduce (the same on every rank); the
    logged loss, accuracy and z_e diagnostics are computed from the full batch's
    tensors, gathered exactly, with ``train_step``'s formulas.
    """
    full = batch[0].shape[0]
    x, demos, y = data_parallel.shard(*batch)
    loss, logits, pairs, metrics = _optimise(net, model, opt, x, demos, y)
    with torch.no_grad():
        # every ACT step's tensors in one collective; z_prev, z_new: (B, S, L, D) gathered
        y, *logits, z_prev, z_new = data_parallel.gather_rows(
            y, *logits, torch.stack([p for p, _ in pairs], 1),
            torch.stack([n for _, n in pairs], 1), full=full)                # logits: S x (B, C)
        loss = torch.stack([F.cross_entropy(out, y) for out in logits]).mean()
        z_prev, z_new = z_prev.transpose(0, 1).contiguous(), z_new.transpose(0, 1).contiguous()
        # z_prev, z_new: (S, B, L, D), the full batch's rows of every ACT step
    return _with_diagnostics(metrics, model, loss, logits, y, z_prev, z_new)


def config_dict(cfg: EvolvingContextConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (for golden metadata and its hash)."""
    return asdict(cfg)
