"""Seed 002 training: the curriculum loop over stages (single process or DDP).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from invariants import agree_across_ranks, ddp_token_mean, one_thread, seeded
from invariants.validation import require
from reference_models import data_parallel
from reference_models.curriculum_lm.config import FIXED, CurriculumLMConfig
from reference_models.curriculum_lm.data import build_data
from reference_models.curriculum_lm.model import CharLM, encode, generate, lm_loss
from reference_models.curriculum_lm.pipeline import (
    enter_stage,
    make_clipper,
    make_optimizer,
    make_stopper,
    make_tracker,
    schedule_for,
)

# ------------------------------------------------------------------ training
PROMPT = "Q: What is 2 + 3? A:"


def train(cfg: CurriculumLMConfig = FIXED, seed: int = 0, max_epochs: int | None = None,
          checkpoint_dir: str | None = None) -> dict[str, Any]:
    """A short deterministic run; returns metric lists (CPU, < 5 s).

    Per step: ``step``, ``loss``, ``lr``, ``grad_norm`` (before clipping).
    Per epoch: ``epoch``, ``epoch_step`` (global step at its end), ``stage``,
    ``val_loss``, ``sample`` (greedy completion of PROMPT).  Also
    ``best_epoch``, ``stop_reason`` (None if not stopped early).
    """
    require(max_epochs is None or (isinstance(max_epochs, int) and max_epochs >= 1),
            "max_epochs", max_epochs, "must be None or an integer >= 1")
    # one thread: determinism, and 8x faster than 2 threads on a busy 2-core box;
    # seeded: the run seeds its own stream and leaves the caller's RNG alone
    with one_thread(), seeded(seed):
        return _train(cfg, seed, max_epochs, checkpoint_dir)


def _train(cfg: CurriculumLMConfig, seed: int, max_epochs: int | None,
           checkpoint_dir: str | None) -> dict[str, Any]:
    torch.manual_seed(seed)
    data = build_data(cfg, seed)
    model = CharLM(cfg.d_model)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    epochs = cfg.n_stages * cfg.epochs_per_stage
    if max_epochs is not None:
        epochs = min(epochs, max_epochs)
    steps = [math.ceil(len(data.stages[e // cfg.epochs_per_stage]) / cfg.batch_size)
             for e in range(epochs)]
    sched = schedule_for(cfg, max(2, sum(steps)))
    opt, lr_sched = make_optimizer(params, cfg, sched)
    clip = make_clipper(cfg)
    stopper, tracker = make_stopper(cfg), make_tracker(cfg, checkpoint_dir)
    val_tokens = encode(data.val)
    out: dict[str, Any] = {k: [] for k in ("step", "loss", "lr", "grad_norm", "epoch",
                                           "epoch_step", "stage", "val_loss", "sample")}
    out["stop_reason"], step, stage = None, 0, 0
    distributed = data_parallel.active()   # DDP over the batch; else single-process code
    net = _DDPLM(model) if distributed else None
    for epoch in range(1, epochs + 1):
        new_stage = (epoch - 1) // cfg.epochs_per_stage
        if new_stage != stage:
            opt, lr_sched = enter_stage(opt, lr_sched, params, cfg, sched)
            stage = new_stage
        texts = data.stages[stage]
        order = torch.randperm(len(texts), generator=gen).tolist()
        model.train()
        for b in range(0, len(order), cfg.batch_size):
            tokens = encode([texts[i] for i in order[b: b + cfg.batch_size]])
            out["lr"].append(opt.param_groups[0]["lr"])
            if distributed:
                loss = _ddp_lm_step(net, tokens)
            else:
                loss = lm_loss(model, tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = clip(params, cfg.clip_max_norm or 1.0)
            opt.step()
            lr_sched.step()
            step += 1
            out["step"].append(step)
            out["loss"].append(float(loss.detach()) if not distributed
                               else float(_full_batch_lm_loss(net)))
            out["grad_norm"].append(float(norm))
        model.eval()
        with torch.no_grad():
            val_loss = float(lm_loss(model, val_tokens))
        tracker.last_train_loss = out["loss"][-1]
        tracker.update(val_loss, model)
        out["epoch"].append(epoch)
        out["epoch_step"].append(step)
        out["stage"].append(stage + 1)
        out["val_loss"].append(val_loss)
        out["sample"].append(generate(model, PROMPT))
        stop = stopper.step(val_loss)
        if distributed:  # val_loss is the same on every rank; the decision must be too
            stop = agree_across_ranks(stop)
        if stop:
            out["stop_reason"] = stopper.reason
            break
    out["best_epoch"] = tracker.best_check
    return out


class _DDPLM:
    """The LM under DDP; keeps the last shard's logits for the full-batch loss metric."""

    def __init__(self, model: nn.Module):
        self.ddp = data_parallel.wrap(model)
        self.logits: torch.Tensor | None = None      # the last step's shard (b, T, V)
        self.targets: torch.Tensor | None = None     # and its targets (b, T)
        self.full = 0                                # the full batch's number of rows


def _ddp_lm_step(net: _DDPLM, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the full batch ``tokens``; the DDP-correct token-mean CE.

    ``lm_loss`` is a mean over the rank's own non-pad tokens: with length-varying rows
    the shards have different token counts, and DDP's average of two means is not
    the full-batch mean. ``ddp_token_mean`` divides the rank's CE sum by the token
    count summed over ranks (times the world size, which DDP's average removes).
    Every row keeps the full batch's width, so the shards pad like the full batch.
    """
    (rows,) = data_parallel.shard(tokens)
    logits = net.ddp(rows[:, :-1])                                   # (b, T, V)
    targets = rows[:, 1:]
    net.logits, net.targets, net.full = logits.detach(), targets, tokens.shape[0]
    ce_sum = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         targets.reshape(-1), ignore_index=0, reduction="sum")
    return ddp_token_mean(ce_sum, (targets != 0).sum())


def _full_batch_lm_loss(net: _DDPLM) -> torch.Tensor:
    """``lm_loss``'s formula on the full batch, gathered (exactly) from every rank."""
    logits, targets = data_parallel.gather_rows(net.logits, net.targets,
                                                full=net.full)     # (B, T, V), (B, T)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1), ignore_index=0)
