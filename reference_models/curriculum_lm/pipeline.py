"""Seed 002 pipeline parts, each a fix with its broken twin: the Grokfast filter (P7), the LR
schedule and optimiser across stage changes (P1, P6), clipping (P5), early stopping and the
best-checkpoint tracker (P3, P4), and checkpoint files (loaded with weights_only=True).
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Callable

import torch
from torch import nn

from invariants import LRScheduleConfig
from invariants.validation import require, require_min_delta, require_patience
from reference_models.curriculum_lm.config import BEST_RULES, CurriculumLMConfig


# ------------------------------------------------------------- Grokfast (P7)
def grokfast_update(grad: torch.Tensor, ema: torch.Tensor | None, *, alpha: float, lamb: float,
                    alpha_swapped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One Grokfast-EMA step: (g + λ·ema_new, ema_new), ema₁ = g (Lee et al. 2024)."""
    if ema is None:
        ema = grad.detach().clone()
    elif alpha_swapped:  # broken P7: the weights of old EMA and new gradient exchanged
        ema = ema * (1 - alpha) + grad.detach() * alpha
    else:
        ema = ema * alpha + grad.detach() * (1 - alpha)
    return grad + lamb * ema, ema


class GrokfastEMA:
    """Stateful filter over a list of gradients: ``filter(grads) -> filtered``."""

    def __init__(self, alpha: float, lamb: float, *, alpha_swapped: bool = False):
        self.alpha, self.lamb, self.swapped = alpha, lamb, alpha_swapped
        self.emas: list[torch.Tensor | None] | None = None

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.emas is None:
            self.emas = [None] * len(grads)
        out = []
        for i, g in enumerate(grads):
            new, self.emas[i] = grokfast_update(g, self.emas[i], alpha=self.alpha,
                                                lamb=self.lamb, alpha_swapped=self.swapped)
            out.append(new)
        return out


class GrokfastAdamW(torch.optim.AdamW):
    """AdamW whose step first filters each grad with Grokfast-EMA.

    The EMA lives in ``optimizer.state[p]["grokfast_ema"]``, so it is in the
    state dict: checkpoints carry it and P1 checks it survives stage changes.
    Clipping (before ``step``) caps the raw gradient; the filtered one is then
    at most (1 + λ)·max_norm, since the EMA is a convex mix of clipped grads.
    """

    def __init__(self, params, lr: float, *, grokfast_alpha: float, grokfast_lambda: float,
                 alpha_swapped: bool = False, **kwargs: Any):
        super().__init__(params, lr=lr, **kwargs)
        self.grokfast = dict(alpha=grokfast_alpha, lamb=grokfast_lambda,
                             alpha_swapped=alpha_swapped)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        emas = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    new, emas[p] = grokfast_update(p.grad, self.state[p].get("grokfast_ema"),
                                                   **self.grokfast)
                    p.grad.copy_(new)
        loss = super().step(closure)  # AdamW initialises its own state on first use
        for p, ema in emas.items():
            self.state[p]["grokfast_ema"] = ema
        return loss


# ----------------------------------------------------- schedule + optimiser (P1, P6)
def warmup_cosine(sched: LRScheduleConfig) -> Callable[[int], float]:
    """step -> LR factor of peak: linear 0 -> 1 over warmup, cosine to eta_min/peak."""
    t_total, w, peak, low = sched.total_steps, sched.warmup_steps, sched.peak_lr, sched.eta_min

    def factor(step: int) -> float:
        if step < w:
            return step / w
        progress = min(1.0, (step - w) / (t_total - w))
        return (low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))) / peak
    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: CurriculumLMConfig,
                   sched: LRScheduleConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.constant_lr:  # broken P6: the seed's constant lr, no decay
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(sched))


def schedule_for(cfg: CurriculumLMConfig, total_steps: int) -> LRScheduleConfig:
    warmup = min(total_steps - 1, int(cfg.warmup_fraction * total_steps))
    return LRScheduleConfig(total_steps=total_steps, warmup_steps=warmup, peak_lr=cfg.lr,
                            eta_min=min(cfg.eta_min, cfg.lr))


def make_optimizer(params, cfg: CurriculumLMConfig, sched: LRScheduleConfig):
    opt = GrokfastAdamW(list(params), lr=sched.peak_lr, weight_decay=cfg.weight_decay,
                        grokfast_alpha=cfg.grokfast_alpha, grokfast_lambda=cfg.grokfast_lambda,
                        alpha_swapped=cfg.grokfast_alpha_swapped)
    return opt, make_scheduler(opt, cfg, sched)


def enter_stage(optimizer, scheduler, params, cfg: CurriculumLMConfig, sched: LRScheduleConfig):
    """The stage change: fixed keeps (optimizer, scheduler); broken re-creates both."""
    if cfg.recreate_optimizer_per_stage:
        return make_optimizer(params, cfg, sched)
    return optimizer, scheduler


# ------------------------------------------------------------- clipping (P5)
def make_clipper(cfg: CurriculumLMConfig) -> Callable[..., torch.Tensor]:
    def clip(parameters, max_norm: float) -> torch.Tensor:
        parameters = list(parameters)
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if cfg.clip_max_norm is not None:  # broken P5: the seed had no clipping
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return norm
    return clip


# -------------------------------------------- early stopping + best checkpoint (P3, P4)
class EarlyStopping:
    """``step(val_loss) -> bool``: True on the check where ``patience`` consecutive
    checks have not improved on the best by more than ``min_delta``; ``reason`` says why."""

    def __init__(self, patience: int = 3, min_delta: float = 0.01):
        require_patience(patience)
        require_min_delta(min_delta)
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_check, self.checks, self.bad = math.inf, 0, 0, 0
        self.reason: str | None = None

    def step(self, val_loss: float) -> bool:
        self.checks += 1
        if val_loss < self.best - self.min_delta:
            self.best, self.best_check, self.bad = val_loss, self.checks, 0
            return False
        self.bad += 1
        if self.bad >= self.patience:
            self.reason = (f"early stop at check {self.checks}: val_loss {val_loss:.4g} has not "
                           f"improved on the best {self.best:.4g} (check {self.best_check}) by "
                           f"more than min_delta={self.min_delta:g} for {self.bad} consecutive "
                           f"checks (patience={self.patience})")
            return True
        return False


class NoEarlyStopping:
    """Broken P3: the seed trained all 10 epochs whatever val_loss did."""

    reason = None

    def step(self, val_loss: float) -> bool:
        return False


class BestCheckpoint:
    """``update(val_loss, model=None) -> bool``: writes ``best.pt`` iff val_loss < best - min_delta.

    ``rule="seed"`` is trainer.py:280 (``val_loss < best``, min_delta ignored);
    ``rule="train_loss"`` records the *training* loss as best, so the
    validation loss can never beat it again (epoch 1 forever, unreported).
    """

    def __init__(self, min_delta: float = 0.01, *, rule: str = "min_delta",
                 directory: str | None = None):
        require_min_delta(min_delta)
        require(rule in BEST_RULES, "rule", rule, f"must be one of {BEST_RULES}")
        self.min_delta, self.rule, self.directory = min_delta, rule, directory
        self.best, self.best_check, self.checks = math.inf, None, 0
        self.last_train_loss: float | None = None  # set by the trainer each epoch

    def update(self, val_loss: float, model: nn.Module | None = None) -> bool:
        self.checks += 1
        delta = 0.0 if self.rule == "seed" else self.min_delta
        if not val_loss < self.best - delta:
            return False
        self.best = val_loss
        if self.rule == "train_loss" and self.last_train_loss is not None:
            self.best = self.last_train_loss  # the bug: val is compared with a train loss
        self.best_check = self.checks
        if self.directory is not None and model is not None:
            save_checkpoint(os.path.join(self.directory, "best.pt"), model,
                            epoch=self.checks, val_loss=val_loss)
        return True


def make_stopper(cfg: CurriculumLMConfig):
    return EarlyStopping(cfg.patience, cfg.min_delta) if cfg.early_stopping else NoEarlyStopping()


def make_tracker(cfg: CurriculumLMConfig, directory: str | None = None) -> BestCheckpoint:
    return BestCheckpoint(cfg.min_delta, rule=cfg.best_rule, directory=directory)


# ------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, model: nn.Module, *, epoch: int, val_loss: float) -> None:
    """A plain state dict + numbers, written atomically (temp file + rename)."""
    payload = {"model": model.state_dict(), "epoch": int(epoch), "val_loss": float(val_loss)}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, never code."""
    return torch.load(path, map_location="cpu", weights_only=True)
