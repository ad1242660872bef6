"""Runtime overhead of the fixes and guards inside a reference training step.

* the HyperLoRA Frobenius clamp: a forward+backward+Adam step of the seed-000 solver with
  the clamp vs without, interleaved in one run (budget: <= 5 % — one extra pass over ΔW);
* ``CollapseGuard.update`` with 5 metrics, as a share of the same step (budget <= 2 %);
* ``NormGovernor.update`` + ``clamp`` per step, as a share of the step (budget <= 2 %).

The solver is sized like a small real model (hidden 64, batch 32, 10x10 grids, 3 solver
steps) rather than the catalog's tiny one, so the ratios mean something.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bench import Result, under
from invariants import CollapseGuard
from reference_models import hyperlora as h

CFG = replace(h.FIXED, hidden_dim=64, context_dim=32, predictor_dim=64, rank=4, grid_size=10,
              solver_steps=3, batch_size=32)


def _stepper(cfg):
    model = h.build_solver(cfg, seed=0)
    model.hyperlora.validate_inputs = False
    opt = torch.optim.Adam(h.param_groups(model, cfg))
    gen = torch.Generator().manual_seed(1)
    batch = h.make_batch(cfg, gen)

    def step():
        grid, target, context = batch
        logits, deltas = model(grid, context)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten()) \
            + h.lora_decay_term(deltas, cfg.hyperlora_weight_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return deltas
    return step


def _interleaved(fns, rounds=15, number=10):
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / number)
    return best


def run() -> list[Result]:
    torch.set_num_threads(1)
    with_clamp, without = _stepper(CFG), _stepper(replace(CFG, hyperlora_max_norm=None))
    for fn in (with_clamp, without):  # warm-up
        fn()
    t_clamp, t_plain = _interleaved([with_clamp, without])
    results = [
        under("reference step (hidden 64, batch 32), clamp on", t_clamp * 1e3, "ms", None),
        under("reference step, clamp off", t_plain * 1e3, "ms", None),
        under("HyperLoRA clamp overhead (fwd+bwd+step)", 100 * (t_clamp / t_plain - 1), "%", 5.0),
    ]
    guard = CollapseGuard(mode="stop")
    n = 20000
    metrics = [{"loss": 2.0 * 0.999 ** i, "grad_norm": 1.0 + 0.01 * (i % 7), "lr": 1e-3,
                "lora_norm": 0.5, "accuracy": 0.5 + 1e-5 * i} for i in range(n)]
    start = time.perf_counter()
    for i in range(n):
        guard.update(i, metrics[i])
    per_update = (time.perf_counter() - start) / n
    results.append(under("CollapseGuard.update, 5 metrics", per_update * 1e6, "us", 20.0))
    results.append(under("CollapseGuard.update share of a reference step",
                         100 * per_update / t_clamp, "%", 2.0))
    governor = h.governor_for(CFG)
    deltas = with_clamp().detach()
    norms = torch.linalg.vector_norm(deltas, dim=(-2, -1)).mean()

    def govern():
        governor.update(norms)
        governor.clamp(deltas)
    # best of rounds, as the step it is divided by (a single 2,000-call timing read
    # 1.3-4.0 % on the same code, depending on what else the machine did meanwhile)
    (per_gov,) = _interleaved([govern], rounds=10, number=200)
    results.append(under("NormGovernor update+clamp share of a reference step",
                         100 * per_gov / t_clamp, "%", 2.0))
    return results
