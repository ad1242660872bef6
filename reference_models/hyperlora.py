"""Seed 000 — HyperLoRA norm runaway in an RLAN-style GRU solver (SPEC H1-H7).

A HyperLoRA network predicts per-sample deltas for the solver's GRU gate
weights from a context vector (seed §1.2):
    ΔW = scaling · A · B,   scaling α = 0.1,   A: (H, r), B: (r, H) per sample,
    z_t = σ(W_hz h_{t-1} + W_xz x_t + ΔW_hz h_{t-1} + ΔW_xz x_t)   (same for r, n).
Fixed path (seed "FIXES APPLIED" and §2.2): ΔW clamped to ‖ΔW_i‖F <= 1.0,
HyperLoRA lr multiplier 1.0, LoRA decay λ·Σ‖ΔW_i‖F² with λ = 0.001, governor
warn 1.0 / critical 1.5 / kill 2.0 that clamps and stops on EMA > 1.5.
Broken path (the seed's pre-fix run): no clamp, multiplier 3.0, no decay, a
monitor-only governor warn 2.0 / critical 5.0 / kill 10.0. Other broken
variants (one per invariant's teeth) are clamp modes of the same config.

Everything is tiny (hidden 12, context 8, 3x3 grids) so properties run fast.
``train_steps`` is a deterministic short training run on synthetic grid tasks
generated in code: the target grid is the input with every colour shifted by
a per-sample k (mod 10), and the context is a fixed code of k plus noise, so
the solver can only succeed through the HyperLoRA deltas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st
from torch import nn

from invariants import (one_thread, Case, NormGovernor, assert_clamp_identity_below_cap,
                        assert_clamp_preserves_direction, assert_gradient_reaches_predictor,
                        assert_lora_decay_term, assert_norm_governor_acts, assert_param_group_lrs,
                        assert_predictor_deltas_bounded, assert_delta_norms_bounded,
                        clamp_frobenius, frobenius_norms, hyperlora_contexts, lora_norm_series,
                        values_around, weight_deltas)
from invariants import agree_across_ranks, sum_reduction_scale
from invariants import InvalidArgumentError
from invariants.validation import require, require_finite
from reference_models import data_parallel

SYSTEM = "hyperlora"
TARGETS = ("xz", "hz", "xr", "hr", "xn", "hn")   # gate weights that receive deltas
CLAMP_MODES = ("exact", "seed", "always_rescale", "value_clip", "no_grad")


@dataclass(frozen=True)
class HyperLoRAConfig:
    context_dim: int = 8             # tiny (RLAN's context is larger); keeps properties fast
    hidden_dim: int = 12             # GRU hidden = cell embedding width (all ΔW are H x H)
    predictor_dim: int = 16          # HyperLoRA trunk width
    rank: int = 2                    # LoRA rank of A·B
    n_colors: int = 10               # ARC grid colours 0-9
    scaling: float = 0.1             # seed §1.2: α = 0.1
    hyperlora_max_norm: float | None = 1.0  # seed FIXES: lora_max_norm 3.0 -> 1.0 (None: no clamp)
    clamp_mode: str = "exact"        # "exact" = clamp_frobenius; "seed" = §2.2's float32 code
    hyperlora_lr_multiplier: float = 1.0    # seed FIXES / §2.2 Part 2: 3.0 -> 1.0
    hyperlora_weight_decay: float = 0.001   # seed §2.2 Part 3 / §3.2: λ = 0.001
    governor_warn: float = 1.0       # seed FIXES: lora_norm_warn_threshold 2.0 -> 1.0
    governor_critical: float = 1.5   # seed FIXES: lora_norm_critical_threshold 5.0 -> 1.5
    governor_kill: float = 2.0       # seed FIXES: lora_norm_kill_threshold 10.0 -> 2.0
    governor_early_stop_ema: float | None = 1.5  # seed §3.3: stop if lora_norm_ema > 1.5
    governor_ema_decay: float = 0.5  # not in the seed: half-life one observation (docs)
    governor_monitor_only: bool = False  # seed §1.3: the pre-fix governor only warned
    base_lr: float = 1e-2            # Adam, tiny model: large enough to move norms in 50 steps
    grid_size: int = 3               # 3x3 grids, 9 cells
    solver_steps: int = 2            # GRU refinement steps per forward
    batch_size: int = 16
    context_noise: float = 0.05      # noise on the task code in the context

    def __post_init__(self) -> None:
        for name in ("context_dim", "hidden_dim", "predictor_dim", "rank", "n_colors",
                     "grid_size", "solver_steps", "batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require(self.hyperlora_max_norm is None or (
            isinstance(self.hyperlora_max_norm, (int, float))
            and math.isfinite(self.hyperlora_max_norm) and self.hyperlora_max_norm > 0),
            "hyperlora_max_norm", self.hyperlora_max_norm, "must be None or a finite number > 0")
        require(self.clamp_mode in CLAMP_MODES, "clamp_mode", self.clamp_mode,
                f"must be one of {CLAMP_MODES}")
        for name in ("scaling", "hyperlora_lr_multiplier", "base_lr"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, value, "must be a finite number > 0")
        require(math.isfinite(self.hyperlora_weight_decay) and self.hyperlora_weight_decay >= 0,
                "hyperlora_weight_decay", self.hyperlora_weight_decay, "must be >= 0")
        governor_for(self)  # validates the thresholds


def governor_for(cfg: HyperLoRAConfig) -> NormGovernor:
    """The config's governor: the fixed one, or the seed's monitor-only one."""
    return NormGovernor(warn=cfg.governor_warn, critical=cfg.governor_critical,
                        kill=cfg.governor_kill, early_stop_ema=cfg.governor_early_stop_ema,
                        ema_decay=cfg.governor_ema_decay,
                        max_norm=cfg.hyperlora_max_norm or 1.0,
                        enforce_clamp=not cfg.governor_monitor_only)


FIXED = HyperLoRAConfig()
BROKEN = HyperLoRAConfig(hyperlora_max_norm=None, hyperlora_lr_multiplier=3.0,
                         hyperlora_weight_decay=0.0, governor_warn=2.0, governor_critical=5.0,
                         governor_kill=10.0, governor_early_stop_ema=None,
                         governor_monitor_only=True)          # the seed's pre-fix config
OLD_CAP = replace(FIXED, hyperlora_max_norm=3.0)              # hyper_lora.py's old default
SEED_CLAMP = replace(FIXED, clamp_mode="seed")                # §2.2 code verbatim (float32 ulps)


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

    def __init__(self, cfg: HyperLoRAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_colors, cfg.hidden_dim)
        self.hyperlora = HyperLoRA(cfg)
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


def build_solver(cfg: HyperLoRAConfig, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> HyperLoRASolver:
    """A solver initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
    saved_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(cfg, steps, seed, stop_on_governor)
    finally:
        torch.set_num_threads(saved_threads)


class _GovernedStep(nn.Module):
    """The training forward as one module (DDP hooks need one ``forward``): clamp, solve."""

    def __init__(self, model: HyperLoRASolver, governor: NormGovernor):
        super().__init__()
        self.model, self.governor = model, governor

    def forward(self, grid: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        deltas = self.governor.clamp(self.model.hyperlora(context))   # (B, T, H, H)
        return self.model.solve(grid, deltas), deltas                  # (B, N, K)


def _train(cfg: HyperLoRAConfig, steps: int, seed: int, stop_on_governor: bool
           ) -> dict[str, list[float]]:
    keys = ("loss", "accuracy", "lora_norm", "lora_norm_max", "entropy", "nan_batches",
            "grad_norm", "lr", "lr_hyperlora", "governor_level", "lora_norm_ema", "early_stop")
    out: dict[str, list[float]] = {k: [] for k in keys}
    distributed = data_parallel.active()   # DDP over the batch; else the single-process code
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HyperLoRASolver(cfg)
        model.hyperlora.validate_inputs = False          # data is generated finite
        opt = torch.optim.Adam(param_groups(model, cfg))
        governor = governor_for(cfg)
        gen = torch.Generator().manual_seed(seed + 1)
        step_fn = data_parallel.wrap(_GovernedStep(model, governor)) if distributed else None
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
                    logits = data_parallel.gather(logits, full=full)
                    target = data_parallel.gather(target, full=full)
                    deltas = data_parallel.gather(deltas, full=full)
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


# ------------------------------------------------------------------ the cases
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _predictors(cfg: HyperLoRAConfig) -> dict[torch.dtype, HyperLoRA]:
    return {dt: build_solver(cfg, seed=0, dtype=dt).hyperlora for dt in _DTYPES}


# Uniform first so a failure shrinks to a plain norm (e.g. 2.0), then τ's exact
# neighbours, zero, tiny and huge.
_H1_NORMS = st.one_of(st.floats(0.0, 10.0), values_around(1.0),
                      st.sampled_from([0.0, 1e-6, 1e4, 1e6]))


def _check_h1(make: Callable[[], HyperLoRAConfig]) -> None:
    cfg = make()
    predictors = _predictors(cfg)
    tau = 1.0  # SPEC H1: τ = 1.0, whatever cap the config carries

    delta_draws = {dt: weight_deltas(norms=_H1_NORMS, dtype=dt) for dt in _DTYPES}
    context_draws = {dt: hyperlora_contexts(width=cfg.context_dim, dtype=dt) for dt in _DTYPES}

    @given(dtype=st.sampled_from(_DTYPES), data=st.data())
    def h1_clamp(dtype, data):                # the config's clamp at norms around τ
        delta = data.draw(delta_draws[dtype], label="delta")
        assert_delta_norms_bounded(CLAMPS[cfg.clamp_mode](delta, cfg.hyperlora_max_norm),
                                   max_norm=tau)

    @given(dtype=st.sampled_from(_DTYPES), data=st.data())
    def h1_model(dtype, data):                # the predictor end to end, contexts 0..1e6
        contexts = data.draw(context_draws[dtype], label="contexts")
        assert_predictor_deltas_bounded(predictors[dtype], contexts, max_norm=tau)

    with one_thread():
        if cfg.hyperlora_max_norm is not None:
            h1_clamp()
        h1_model()


def _check_h1_seed_float32(make: Callable[[], HyperLoRAConfig]) -> None:
    cfg = make()

    @given(delta=weight_deltas(max_norm=1.0, dtype=torch.float32))
    def h1_exact(delta):
        assert_delta_norms_bounded(CLAMPS[cfg.clamp_mode](delta, 1.0), max_norm=1.0)
    with one_thread():
        h1_exact()


def _check_h2(make: Callable[[], HyperLoRAConfig]) -> None:
    cfg = make()
    clamp = CLAMPS[cfg.clamp_mode]

    @given(delta=weight_deltas())
    def h2(delta):
        assert_clamp_identity_below_cap(clamp, delta, max_norm=1.0)
    with one_thread():
        h2()


def _check_h3(make: Callable[[], HyperLoRAConfig]) -> None:
    cfg = make()
    clamp = CLAMPS[cfg.clamp_mode]

    @given(delta=weight_deltas())
    def h3(delta):
        assert_clamp_preserves_direction(clamp, delta, max_norm=1.0)
    with one_thread():
        h3()


def _check_h4(make: Callable[[], HyperLoRAConfig]) -> None:
    cfg = make()
    predictors = {dt: build_solver(cfg, seed=0, dtype=dt).hyperlora
                  for dt in (torch.float32, torch.float64)}

    context_draws = {dt: hyperlora_contexts(width=cfg.context_dim, dtype=dt, max_batch=2,
                                            min_magnitude=1e2, max_magnitude=1e5)
                     for dt in predictors}

    @given(dtype=st.sampled_from(list(predictors)), data=st.data())
    def h4(dtype, data):
        contexts = data.draw(context_draws[dtype], label="contexts")
        predictor = predictors[dtype]
        with torch.no_grad():
            assume(bool((frobenius_norms(predictor.raw_deltas(contexts))
                         > cfg.hyperlora_max_norm).any()))   # the clamp must be active
        assert_gradient_reaches_predictor(predictor, predictor.parameters(), contexts,
                                          max_norm=cfg.hyperlora_max_norm)
    with one_thread():
        h4()


def _check_h5(make: Callable[[], HyperLoRAConfig]) -> None:
    cfg = make()

    @given(delta=weight_deltas(max_side=4))
    def h5(delta):
        assert_lora_decay_term(lambda d: lora_decay_term(d, cfg.hyperlora_weight_decay), delta,
                               weight=0.001)   # SPEC H5: λ = 0.001
    with one_thread():
        h5()


def _check_h6(make: Callable[[], HyperLoRAConfig]) -> None:
    cfg = make()
    model = build_solver(cfg)

    @given(base_lr=st.one_of(st.just(cfg.base_lr), st.floats(1e-6, 1.0)))
    def h6(base_lr):
        opt = torch.optim.SGD(param_groups(model, replace(cfg, base_lr=base_lr)))
        assert_param_group_lrs(opt, model.hyperlora.parameters(), base_lr=base_lr,
                               multiplier=1.0)   # SPEC H6: multiplier 1.0
    with one_thread():
        h6()


def _check_h7(make: Callable[[], HyperLoRAConfig]) -> None:
    governor = governor_for(make())

    @given(norms=lora_norm_series())
    def h7(norms):
        assert_norm_governor_acts(governor, norms)
    with one_thread():
        h7()


def _case(inv, variant, expected, subject, check, title):
    return Case(SYSTEM, inv, variant, expected, subject, check, title)


def cases() -> list[Case]:
    return [
        _case("H1", "fixed", "holds", lambda: FIXED, _check_h1,
              "clamp_frobenius: ‖ΔW_i‖F <= 1.0 exactly, f32/f64/bf16, contexts 0..1e6"),
        _case("H1", "broken:clamp_absent", "caught", lambda: BROKEN, _check_h1,
              "seed's pre-fix predictor: no clamp on ΔW"),
        _case("H1", "broken:old_cap_3", "caught", lambda: OLD_CAP, _check_h1,
              "hyper_lora.py's old default lora_max_norm = 3.0"),
        _case("H1", "claim:seed_clamp_float32", "refuted", lambda: SEED_CLAMP,
              _check_h1_seed_float32,
              "seed §2.2 code in float32 claims ‖ΔW‖F <= 1.0; it overshoots by ~1 ulp"),
        _case("H2", "fixed", "holds", lambda: FIXED, _check_h2,
              "clamp is bit-identical for ‖ΔW_i‖F <= τ"),
        _case("H2", "broken:always_rescale", "caught",
              lambda: replace(FIXED, clamp_mode="always_rescale"), _check_h2,
              "clamp that always divides by the norm"),
        _case("H3", "fixed", "holds", lambda: FIXED, _check_h3,
              "clamped ΔW = c·ΔW with 0 < c <= 1"),
        _case("H3", "broken:value_clip", "caught",
              lambda: replace(FIXED, clamp_mode="value_clip"), _check_h3,
              "element-wise clip to ±τ/√(mn) (teeth; not from the seed)"),
        _case("H4", "fixed", "holds", lambda: FIXED, _check_h4,
              "gradient reaches the predictor through clamped deltas"),
        _case("H4", "broken:no_grad_clamp", "caught",
              lambda: replace(FIXED, clamp_mode="no_grad"), _check_h4,
              "clamp multiplies the whole delta under no_grad"),
        _case("H5", "fixed", "holds", lambda: FIXED, _check_h5,
              "decay = 0.001·Σ‖ΔW_i‖F² and its step lowers Σ‖ΔW_i‖F"),
        _case("H5", "broken:decay_missing", "caught", lambda: BROKEN, _check_h5,
              "seed's pre-fix run: no LoRA decay"),
        _case("H6", "fixed", "holds", lambda: FIXED, _check_h6,
              "HyperLoRA param group lr = 1.0 × base lr"),
        _case("H6", "broken:lr_multiplier_3", "caught", lambda: BROKEN, _check_h6,
              "seed's pre-fix hyperlora_lr_multiplier 3.0"),
        _case("H7", "fixed", "holds", lambda: FIXED, _check_h7,
              "governor 1.0/1.5/2.0 acts (clamp) at 1.714, stops on EMA > 1.5"),
        _case("H7", "broken:monitor_only", "caught", lambda: BROKEN, _check_h7,
              "seed's monitor-only governor 2.0/5.0/10.0: no action at 1.714"),
    ]


__all__ = ["BROKEN", "CLAMPS", "FIXED", "OLD_CAP", "SEED_CLAMP", "HyperLoRA", "HyperLoRAConfig",
           "HyperLoRASolver", "LoRAGRUCell", "build_solver", "cases", "governor_for",
           "lora_decay_term", "make_batch", "param_groups", "seed_clamp", "train_steps"]
