"""Seed 000 training: the toy colour-shift task and the training loop (single process or DDP).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from invariants import (
    agree_across_ranks,
    frobenius_norms,
    seeded,
    sum_reduction_scale,
)
from invariants import num_threads as threads
from invariants.validation import require
from reference_models import data_parallel
from reference_models.hyperlora.config import FIXED, HyperLoRAConfig, governor_for
from reference_models.hyperlora.model import (
    GovernedStep,
    HyperLoRASolver,
    lora_decay_term,
    param_groups,
)


# -------------------------------------------------------------- training run
def make_batch(cfg: HyperLoRAConfig, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic tasks: target = (grid + k) mod K; context = code[k] + noise.

    Returns grid (B, N) long, target (B, N) long, context (B, C) float32.
    """
    n = cfg.grid_size * cfg.grid_size
    code = torch.randn(cfg.n_colors, cfg.context_dim,
                       generator=torch.Generator().manual_seed(12345))  # fixed task codes
    k = torch.randint(0, cfg.n_colors, (cfg.batch_size,), generator=generator)
    grid = torch.randint(0, cfg.n_colors, (cfg.batch_size, n), generator=generator)
    target = (grid + k[:, None]) % cfg.n_colors
    context = code[k] + cfg.context_noise * torch.randn(cfg.batch_size, cfg.context_dim,
                                                        generator=generator)
    return grid, target, context


def train_steps(cfg: HyperLoRAConfig = FIXED, steps: int = 50, seed: int = 0, *,
                stop_on_governor: bool = False, num_threads: int | None = 1
                ) -> dict[str, list[float]]:
    """A short deterministic training run; per-step metric lists (DESIGN metric names).

    Keys: ``loss`` (cross-entropy, without the decay), ``accuracy`` (cells right),
    ``lora_norm`` (mean ‖ΔW_i‖F over samples and gates, after the clamp and the
    governor), ``lora_norm_max``, ``entropy`` (mean prediction entropy, nats),
    ``nan_batches`` (1 if this step's loss was non-finite and the step was skipped, else 0),
    ``grad_norm``, ``lr`` (base), ``lr_hyperlora``, ``governor_level`` (0-3),
    ``lora_norm_ema``, ``early_stop`` (0/1). Global RNG state is left untouched.
    With ``stop_on_governor`` the run ends at the governor's first "stop".
    ``num_threads`` (default 1: fastest for these tiny tensors, and a fixed
    count for golden runs) is set for the run and restored; ``None`` keeps torch's.
    """
    require(isinstance(steps, int) and steps >= 1, "steps", steps, "must be an integer >= 1")
    require(num_threads is None or (isinstance(num_threads, int) and num_threads >= 1),
            "num_threads", num_threads, "must be None or an integer >= 1")
    with contextlib.nullcontext() if num_threads is None else threads(num_threads):
        return _train(cfg, steps, seed, stop_on_governor)


def _train(cfg: HyperLoRAConfig, steps: int, seed: int, stop_on_governor: bool
           ) -> dict[str, list[float]]:
    keys = ("loss", "accuracy", "lora_norm", "lora_norm_max", "entropy", "nan_batches",
            "grad_norm", "lr", "lr_hyperlora", "governor_level", "lora_norm_ema", "early_stop")
    out: dict[str, list[float]] = {k: [] for k in keys}
    distributed = data_parallel.active()   # DDP over the batch; else the single-process code
    with seeded(seed):
        model = HyperLoRASolver(cfg)
        model.hyperlora.validate_inputs = False          # data is generated finite
        opt = torch.optim.Adam(param_groups(model, cfg))
        governor = governor_for(cfg)
        gen = torch.Generator().manual_seed(seed + 1)
        step_fn = data_parallel.wrap(GovernedStep(model, governor)) if distributed else None
        for _ in range(steps):
            grid, target, context = make_batch(cfg, gen)
            if distributed:                  # every rank drew the full batch: keep its rows
                grid, target, context = data_parallel.shard(grid, target, context)
                logits, deltas = step_fn(grid, context)
                ce = F.cross_entropy(logits.flatten(0, 1), target.flatten())  # equal shards
                # the decay is a SUM over samples: DDP's average would halve it
                loss = ce + lora_decay_term(deltas, cfg.hyperlora_weight_decay) \
                    * sum_reduction_scale()
            else:
                deltas = governor.clamp(model.hyperlora(context))       # (B, T, H, H)
                logits = model.solve(grid, deltas)                       # (B, N, K)
                ce = F.cross_entropy(logits.flatten(0, 1), target.flatten())
                loss = ce + lora_decay_term(deltas, cfg.hyperlora_weight_decay)
            opt.zero_grad(set_to_none=True)
            nan_batches = 0
            finite = bool(torch.isfinite(loss))
            if distributed:                  # skip on every rank, or on none (else: a hang)
                finite = not agree_across_ranks(not finite, op="any")
            if finite:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                opt.step()
            else:
                nan_batches = 1
                grad_norm = torch.tensor(float("nan"))
            with torch.no_grad():
                if distributed:              # the metrics of the FULL batch, same formulas
                    full = cfg.batch_size
                    logits, target, deltas = data_parallel.gather_rows(logits, target, deltas,
                                                                       full=full)
                    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten())
                norms = frobenius_norms(deltas)                      # (B, T) float64
                logp = logits.float().log_softmax(-1)
                entropy = -(logp.exp() * logp).sum(-1).mean()
                accuracy = (logits.argmax(-1) == target).double().mean()
            decision = governor.update(norms.mean())
            row = (float(ce.detach()), float(accuracy), float(norms.mean()), float(norms.max()),
                   float(entropy), float(nan_batches), float(grad_norm),
                   opt.param_groups[0]["lr"], opt.param_groups[1]["lr"],
                   float(("ok", "warn", "critical", "kill").index(decision.level)),
                   decision.ema, float(decision.early_stop))
            for key, value in zip(keys, row):
                out[key].append(value)
            if stop_on_governor and decision.action == "stop":
                break
    return out
