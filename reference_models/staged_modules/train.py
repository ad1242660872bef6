"""Seed 001 training: the background-heavy grid task and the epoch loop (single process or DDP).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from invariants import one_thread, seeded
from invariants.validation import require
from reference_models import data_parallel
from reference_models.staged_modules.config import StagedModulesConfig
from reference_models.staged_modules.model import StagedSolver, make_ema


# ------------------------------------------------------------------ data + training
def make_batch(cfg: StagedModulesConfig, batch: int, generator: torch.Generator, *,
               fg_rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Background-heavy recolouring tasks: (grid, support, target).

    Each sample has a random permutation of the FG colours; its support pairs
    show it on other grids, and the target is the grid recoloured by it (BG
    stays BG). About ``1 - fg_rate`` of the target cells are background.
    """
    g, c, s = cfg.grid_size, cfg.num_colors, cfg.num_support

    def grids(*lead: int) -> torch.Tensor:
        fg = torch.rand(*lead, g, g, generator=generator) < fg_rate
        colour = torch.randint(1, c, (*lead, g, g), generator=generator)
        return torch.where(fg, colour, torch.zeros_like(colour))

    perm = torch.argsort(torch.rand(batch, c - 1, generator=generator), dim=-1) + 1  # (B, C-1)
    table = torch.cat([torch.zeros(batch, 1, dtype=torch.long), perm], dim=1)      # (B, C)
    grid = grids(batch)                                                             # (B, G, G)
    sup_in = grids(batch, s)                                                        # (B, S, G, G)
    recolour = lambda x: torch.gather(table, 1, x.flatten(1)).view_as(x)  # noqa: E731
    sup_out = recolour(sup_in.view(batch, -1)).view_as(sup_in)
    support = torch.stack([sup_in, sup_out], dim=2)                                 # (B, S, 2, G, G)
    return grid, support, recolour(grid)


def train_epochs(cfg: StagedModulesConfig, epochs: int, seed: int, *,
                 batches_per_epoch: int = 8, batch_size: int = 16,
                 lr: float = 1e-2) -> dict[str, list[float]]:
    """A short deterministic training run; per-epoch metric lists.

    Keys: ``loss`` (mean train CE), ``accuracy``, ``bg_fraction`` (share of
    predicted BG cells), ``target_bg_fraction``, ``fg_accuracy`` (on target FG
    cells), ``lora_norm`` (mean ‖ΔW‖F of the applied deltas, 0 while gated),
    and with ``use_ema`` also ``ema_accuracy``/``ema_bg_fraction`` — all measured
    on a fixed held-out set at the end of each epoch. Seeds its own generators
    and runs on one intra-op thread (so the curves do not depend on the
    machine's core count); restores the global RNG state and thread count.
    About 0.03 s of CPU per epoch after torch's one-off warm-up in a process.
    """
    require(isinstance(epochs, int) and epochs >= 1, "epochs", epochs, "must be an integer >= 1")
    require(isinstance(seed, int), "seed", seed, "must be an integer")
    with seeded(seed), one_thread():
        model = StagedSolver(cfg)
        ema = make_ema(model, cfg)
        ema_model = copy.deepcopy(model) if ema is not None else None
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        data_gen = torch.Generator().manual_seed(seed + 1)
        eval_gen = torch.Generator().manual_seed(seed + 2)
        eval_grid, eval_support, eval_target = make_batch(cfg, 64, eval_gen)
        metrics: dict[str, list[float]] = {k: [] for k in (
            "loss", "accuracy", "bg_fraction", "target_bg_fraction", "fg_accuracy", "lora_norm")}
        if ema is not None:
            metrics["ema_accuracy"], metrics["ema_bg_fraction"] = [], []

        def evaluate(net: StagedSolver, epoch: int) -> tuple[float, float, float]:
            net.eval()
            with torch.no_grad():
                pred = net(eval_grid, eval_support, epoch=epoch).argmax(-1)   # (B, N)
            net.train()
            target = eval_target.flatten(1)
            fg = target != 0
            return (float((pred == target).double().mean()), float((pred == 0).double().mean()),
                    float((pred == target)[fg].double().mean()) if bool(fg.any()) else 1.0)

        distributed = data_parallel.active()   # DDP over the batch; else single-process code
        # the modules before their start epoch and the FiLM fallback after it are unused
        net = data_parallel.wrap(model, find_unused_parameters=True) if distributed else model
        for epoch in range(epochs):
            model.train()
            model.set_epoch(epoch)
            losses = []
            for _ in range(batches_per_epoch):
                grid, support, target = make_batch(cfg, batch_size, data_gen)
                if distributed:              # every rank drew the full batch: keep its rows
                    grid, support, target = data_parallel.shard(grid, support, target)
                logits = net(grid, support)
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update(model)
                if distributed:              # the FULL batch's loss, same formula
                    with torch.no_grad():
                        logits, target = data_parallel.gather_rows(logits, target,
                                                                   full=batch_size)
                        loss = nn.functional.cross_entropy(logits.flatten(0, 1),
                                                           target.flatten())
                losses.append(float(loss.detach()))
            acc, bg, fg_acc = evaluate(model, epoch)
            metrics["loss"].append(sum(losses) / len(losses))
            metrics["accuracy"].append(acc)
            metrics["bg_fraction"].append(bg)
            metrics["target_bg_fraction"].append(float((eval_target == 0).double().mean()))
            metrics["fg_accuracy"].append(fg_acc)
            with torch.no_grad():
                if model.hyperlora is not None and model.flags["hyperlora"]:
                    ctx = model.encode_support(eval_support).mean(1)
                    norms = [dw.flatten(1).norm(dim=1).mean() for dw in model.hyperlora(ctx).values()]
                    metrics["lora_norm"].append(float(torch.stack(norms).mean()))
                else:
                    metrics["lora_norm"].append(0.0)
            if ema is not None and ema_model is not None:
                ema.copy_to(ema_model)
                ema_acc, ema_bg, _ = evaluate(ema_model, epoch)
                metrics["ema_accuracy"].append(ema_acc)
                metrics["ema_bg_fraction"].append(ema_bg)
        return metrics
