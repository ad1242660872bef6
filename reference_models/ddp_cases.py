"""Factories and workers for the distributed tests (spawned processes import them by name).

A factory ``f(seed) -> StepSpec`` builds, deterministically from ``seed``, one
training step of a seed system's fixed configuration: the model, its optimizer,
a mean-reduced loss, the clipping cap, and extra observables (clamp norms, EMA
weights). ``invariants.ddp_equivalence`` runs it once on the whole batch in this
process and once under DDP on world size 2, then the states are compared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from invariants import CollapseGuard, RankConsistentGuard


@dataclass
class StepSpec:
    model: nn.Module
    make_optimizer: Callable[[list], torch.optim.Optimizer]
    loss_fn: Callable[..., torch.Tensor]
    batch: tuple[torch.Tensor, ...]
    max_norm: float | None = 1.0
    observe: Callable[[nn.Module], dict[str, torch.Tensor]] | None = field(default=None)


def lora_init_step(seed: int) -> StepSpec:
    """Seed 003: a tiny LM with zero-init LoRA on q/v, AdamW on the adapters, clip 1.0."""
    from reference_models import lora_init as m
    torch.manual_seed(seed)
    base = m.TinyLM(m.TinyLMConfig(), seed=seed)
    for p in base.parameters():
        p.requires_grad_(False)
    # dropout off: its masks come from each process's own RNG stream, so a sharded batch
    # cannot draw the same masks as the whole batch; equivalence is about the reduction.
    from dataclasses import replace
    model = m.apply_lora(base, replace(m.FIXED, dropout=0.0), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (8, 9), generator=gen)  # (B, T+1)

    def loss_fn(net, toks):
        logits = net(toks[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten())

    # lr large enough that the step moves the adapters visibly; clip low enough to bind
    return StepSpec(model, lambda ps: torch.optim.SGD(ps, lr=0.5), loss_fn, (tokens,),
                    max_norm=0.05)


# ------------------------------------------------------------------ guard workers
def _rank_losses(rank: int, steps: int) -> list[float]:
    """Smooth decay on every rank; rank 1's shard hits a NaN loss at step 12."""
    losses = [2.0 * 0.97 ** s for s in range(steps)]
    if rank == 1:
        losses[12] = float("nan")
    return losses


def guard_decisions_worker(rank: int, world_size: int, reduced: bool, steps: int = 20
                           ) -> list[list[int]]:
    """Run a CollapseGuard over this rank's losses; record (step, should_stop) each step.

    The loop does not break (so the naive variant cannot hang the test); it records
    what each rank *would* have done.
    """
    guard = CollapseGuard(mode="stop")
    watched = RankConsistentGuard(guard) if reduced else guard
    history = []
    for step, loss in enumerate(_rank_losses(rank, steps)):
        watched.update(step, {"loss": loss})
        history.append([step, int(watched.should_stop)])
    return history
