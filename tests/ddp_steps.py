"""DDP step factories for the distributed tests (spawned processes import them by name).

Test code, not a reference model: it lives under ``tests/`` and is named
``"tests.ddp_steps:<function>"`` (the repository root is on the spawned ranks' path).
The spawned workers that run them, and the decision loops, are in ``tests/ddp_workers.py``.

A factory ``f(seed) -> StepSpec`` builds, deterministically from ``seed``, one
training step of a seed system's FIXED configuration: the model, its optimizer,
a loss, the clipping cap, and extra observables (clamp norms, EMA weights,
contexts) evaluated on the full batch. ``invariants.ddp_equivalences`` runs each
once on the whole batch in this process and once under DDP on world size 2.

What the factories change from the seed systems' training loops, and why:
  * dropout off (lora_init 0.05 -> 0): a mask comes from each process's own RNG
    stream, so a shard cannot draw the whole batch's mask; the equivalence is
    about the reduction, not the RNG.
  * a clipping cap that BINDS (the pre-clip norm exceeds it; the tests assert so):
    the seeds' 1.0 where it binds (curriculum_lm, evolving_context), otherwise a
    harness cap, not from the seed (hyperlora and staged_modules do not clip).
  * losses that are not a per-sample mean over equal shards are made DDP-correct
    (``sum_reduction_scale``, ``ddp_token_mean``); the seed's verbatim loss is
    kept as a ``*_seed_loss`` factory whose mismatch under DDP the tests pin.
  * the learning rate at its peak (curriculum_lm: the warmup's step 0 has lr 0,
    which would hide every difference in the parameters).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from invariants import StepSpec, ddp_token_mean, frobenius_norms, seeded, sum_reduction_scale

M = "tests.ddp_steps:"


# ------------------------------------------------------------------ seed 003: lora_init
def lora_init_step(seed: int) -> StepSpec:
    """Seed 003: a tiny LM with zero-init LoRA on q/v, SGD on the adapters, clip 0.05."""
    from reference_models import lora_init as m
    base = m.TinyLM(m.TinyLMConfig(), seed=seed)
    for p in base.parameters():
        p.requires_grad_(False)
    model = m.apply_lora(base, replace(m.FIXED, dropout=0.0), seed=seed)  # dropout off (above)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (8, 9), generator=gen)  # (B, T+1)

    def loss_fn(net, toks):
        logits = net(toks[:, :-1])                                        # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten())

    # SGD so the parameters move in proportion to the gradient; the seed has no clip:
    # 0.05 is a harness cap (the pre-clip norm is ~0.3, so it binds)
    return StepSpec(model, lambda ps: torch.optim.SGD(ps, lr=0.5), loss_fn, (tokens,),
                    max_norm=0.05)


# ------------------------------------------------------------------ seed 000: hyperlora
CONTEXT_GAIN = 6.0  # contexts x6: raw ‖ΔW_i‖F in [0.22, 6.1], 62% above τ = 1.0


def _hyperlora(seed: int, decay_scale) -> StepSpec:
    from reference_models import hyperlora as m
    cfg = replace(m.FIXED, batch_size=8)                  # FIXED; 8 samples = 2 shards of 4
    model = m.build_solver(cfg, seed=seed)
    grid, target, context = m.make_batch(cfg, torch.Generator().manual_seed(seed + 1))
    context = context * CONTEXT_GAIN                      # (B, C)

    def loss_fn(net, grid, target, context):
        logits, deltas = net(grid, context)               # (B, N, K), clamped (B, T, H, H)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        return ce + decay_scale() * m.lora_decay_term(deltas, cfg.hyperlora_weight_decay)

    def observe(model):  # float64 norms of float32 deltas: judged at float32's tolerance
        return {"clamped_delta_norms": frobenius_norms(model.hyperlora(context)).float(),
                "raw_delta_norms": frobenius_norms(model.hyperlora.raw_deltas(context)).float()}

    # the seed's loop logs the norm but does not clip: 0.25 is a harness cap (pre-clip
    # norm 0.33, so it binds)
    return StepSpec(model, lambda ps: torch.optim.Adam(m.param_groups(model, cfg)), loss_fn,
                    (grid, target, context), max_norm=0.25, observe=observe)


def hyperlora_step(seed: int) -> StepSpec:
    """Seed 000 FIXED: clamp 1.0, λ = 0.001 decay summed over samples, rescaled for DDP."""
    return _hyperlora(seed, sum_reduction_scale)


def hyperlora_seed_loss_step(seed: int) -> StepSpec:
    """The seed's loss verbatim (ce + λ·Σ_i‖ΔW_i‖F²): DDP halves the decay's gradient."""
    return _hyperlora(seed, lambda: 1)


# ------------------------------------------------------------------ seed 001: staged_modules
STAGED_EPOCH = 5  # FIXED's start epoch: every staged module on, the FiLM fallback unused


def _staged(seed: int, **overrides) -> StepSpec:
    from reference_models import staged_modules as m
    cfg = replace(m.FIXED, **overrides)
    model = m.build_model(cfg, seed=seed)
    model.set_epoch(STAGED_EPOCH)
    grid, support, target = m.make_batch(cfg, 8, torch.Generator().manual_seed(seed + 1),
                                         fg_rate=0.4)
    ema = m.make_ema(model, cfg)                          # FIXED: use_ema, decay 0.999

    def loss_fn(net, grid, support, target):
        logits = net(grid, support)                       # (B, N, C)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def observe(model):
        return {f"ema.{k}": v for k, v in ema.shadow.items()}

    # staged modules leave parameters unused (FiLM from epoch 5, the modules before it):
    # DDP needs find_unused_parameters=True (without it the NEXT forward raises).
    # SGD, not train_epochs' Adam: Adam's first step lr·g/(|g|+eps) turns the rounding
    # noise of a mathematically zero gradient (attention key biases: softmax ignores
    # q·b_k) into a step whose size depends on that noise, so DDP's other summation
    # order moved injector.attn.k.bias by 1.2e-5 with no bug (docs/distributed.md).
    # The seed does not clip: 0.5 is a harness cap (it binds).
    return StepSpec(model, lambda ps: torch.optim.SGD(ps, lr=0.1), loss_fn,
                    (grid, support, target), max_norm=0.5, observe=observe,
                    after_step=ema.update, ddp_kwargs={"find_unused_parameters": True})


def staged_modules_step(seed: int) -> StepSpec:
    """Seed 001 FIXED at epoch 5, no checkpointing (the reference for S4 under DDP)."""
    return _staged(seed)


def staged_modules_ckpt_step(seed: int) -> StepSpec:
    """Seed 001 FIXED with gradient checkpointing on: checkpoint(use_reentrant=False)."""
    return _staged(seed, gradient_checkpointing=True)


def staged_modules_ckpt_reentrant_step(seed: int) -> StepSpec:
    """Broken S4 under DDP: checkpoint(use_reentrant=True) around each solver step."""
    return _staged(seed, gradient_checkpointing=True, checkpoint_reentrant=True)


class FirstSolverStep(nn.Module):
    """S4's first-step case as a model: x and support constant (no grad), h None,
    HyperLoRA deltas in a dict; ``mode`` = plain | nonreentrant | reentrant checkpoint."""

    def __init__(self, solver: nn.Module, mode: str):
        super().__init__()
        self.solver, self.mode = solver, mode

    def forward(self, grid: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        s = self.solver
        with torch.no_grad():                              # upstream frozen: x has no grad
            x = s.embed(grid.flatten(1)) + s.pos           # (B, N, D)
            tokens = s.encode_support(support)             # (B, M, D)
        deltas = s.hyperlora(tokens.mean(1))               # {name: (B, D, D)}, with grad
        if self.mode == "plain":
            h = s.solver_step(x, None, deltas, tokens)
        else:
            h = checkpoint(s.solver_step, x, None, deltas, tokens,
                           use_reentrant=self.mode == "reentrant")
        return s.head(h)                                   # (B, N, C)


def _first_step(seed: int, mode: str) -> StepSpec:
    spec = _staged(seed)
    model = FirstSolverStep(spec.model, mode)

    def observe(model):
        return {}
    return replace(spec, model=model, observe=observe, after_step=None)


def staged_first_step_plain(seed: int) -> StepSpec:
    return _first_step(seed, "plain")


def staged_first_step_nonreentrant(seed: int) -> StepSpec:
    return _first_step(seed, "nonreentrant")


def staged_first_step_reentrant(seed: int) -> StepSpec:
    return _first_step(seed, "reentrant")


# ------------------------------------------------------------------ seed 002: curriculum_lm
def _curriculum(seed: int, token_mean: bool) -> StepSpec:
    from reference_models import curriculum_lm as m
    cfg = m.FIXED
    with seeded(seed):                     # CharLM draws its init from the global RNG
        model = m.CharLM(cfg.d_model)      # (as m.train does); leave the caller's alone
    texts = sorted(m.build_data(cfg, seed).stages[-1][:8], key=len)  # length-bucketed:
    tokens = m.encode(texts)               # (B, T+1); shard 0 has fewer real tokens than 1

    def loss_fn(net, toks):
        logits = net(toks[:, :-1])                                        # (B, T, V)
        target = toks[:, 1:].reshape(-1)
        if not token_mean:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target,
                                   ignore_index=0)                        # m.lm_loss verbatim
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=0,
                             reduction="sum")
        return ddp_token_mean(ce, (target != 0).sum())

    def make_optimizer(ps):  # GrokfastAdamW at the peak lr (warmup's step 0 has lr 0)
        return m.GrokfastAdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               grokfast_alpha=cfg.grokfast_alpha,
                               grokfast_lambda=cfg.grokfast_lambda)
    # the seed's clip 1.0 does not bind on this batch (pre-clip norm 0.68): 0.5 is a
    # harness cap so that global vs per-rank clipping matters
    return StepSpec(model, make_optimizer, loss_fn, (tokens,), max_norm=0.5)


def curriculum_lm_step(seed: int) -> StepSpec:
    """Seed 002 FIXED: GRU LM, Grokfast-AdamW, clip 1.0, token mean over ALL ranks' tokens."""
    return _curriculum(seed, True)


def curriculum_lm_seed_loss_step(seed: int) -> StepSpec:
    """The seed's lm_loss verbatim: a per-rank mean over that rank's non-pad tokens."""
    return _curriculum(seed, False)


# ------------------------------------------------------------------ seed 004: evolving_context
def evolving_context_step(seed: int) -> StepSpec:
    """Seed 004 FIXED: deep-supervised CE over ACT steps, clip 1.0, AdamW with two groups."""
    from reference_models import evolving_context as m
    cfg = replace(m.FIXED, batch=8)
    model, _ = m.build(cfg, seed)
    x, demos, y = m.make_task(cfg, seed)(0)               # (B, D), (B, N, D), (B,)

    def loss_fn(net, x, demos, y):
        logits, _ = net(x, demos)                          # per ACT step (B, C)
        return torch.stack([F.cross_entropy(out, y) for out in logits]).mean()

    def observe(model):  # the smoothed context z_e (Fix 2's EMA) on the full batch
        _, pairs = model(x, demos)
        return {"context_z_e": torch.stack([z for _, z in pairs]),        # (S, B, L, D)
                "encoder_grad_share": torch.tensor(model.grad_norms()["encoder_grad_share"],
                                                   dtype=torch.float32)}

    def make_optimizer(ps):
        return torch.optim.AdamW(model.param_groups(), lr=cfg.base_lr,
                                 weight_decay=cfg.weight_decay, foreach=False)
    return StepSpec(model, make_optimizer, loss_fn, (x, demos, y), max_norm=cfg.grad_clip,
                    observe=observe)


# ------------------------------------------------------------------ the suite
def _job(factory: str, reference: str | None = None) -> dict[str, str]:
    """A job: its DDP step factory in this module, and the single-process step it must equal
    (default: the factory's own single-process step)."""
    return {"factory": M + factory, **({"reference": M + reference} if reference else {})}


EQUIVALENCE_JOBS = {
    **{name: _job(f"{name}_step") for name in
       ("lora_init", "hyperlora", "staged_modules", "curriculum_lm", "evolving_context")},
    # S4 under DDP: checkpointed DDP step vs the NON-checkpointed single-process step
    "staged_modules_ckpt": _job("staged_modules_ckpt_step", "staged_modules_step"),
    "first_step_nonreentrant": _job("staged_first_step_nonreentrant", "staged_first_step_plain"),
}
BROKEN_JOBS = {
    **{f"{name}_per_rank_clip": {**job, "clip": "per_rank"}
       for name, job in EQUIVALENCE_JOBS.items() if not name.startswith("first_step")},
    **{name: _job(f"{name}_step") for name in ("hyperlora_seed_loss", "curriculum_lm_seed_loss")},
    "staged_modules_ckpt_reentrant": _job("staged_modules_ckpt_reentrant_step",
                                          "staged_modules_step"),
    "first_step_reentrant": _job("staged_first_step_reentrant", "staged_first_step_plain"),
}

JOBS = {**EQUIVALENCE_JOBS, **BROKEN_JOBS}


# ------------------------------------------------------------------ bad factories
def bad_batch_step(seed: int) -> StepSpec:
    """A factory whose batch (5) does not split into 2 equal shards."""
    spec = lora_init_step(seed)
    return replace(spec, batch=(spec.batch[0][:5],))


def not_a_spec(seed: int) -> dict:
    return {"model": None}
