"""Seed 002 — curriculum transition divergence and LM mode collapse (SPEC P1-P9).

A tiny character-level language model trained on synthetic Q&A text made in
code (no download), through the whole pipeline the seed describes:

    sources (add, sub, cmp, recall) × difficulty level 1..3 (operand digits)
      -> de-duplicate -> per-source balancing (P9) -> 80/20 split per level (P8)
      -> curriculum: stage k = training samples of levels 1..k (P2)
      -> AdamW + Grokfast-EMA filter (P7), one optimizer for the run (P1)
      -> linear warmup + cosine LR per step (P6), grad clipping 1.0 (P5)
      -> validation every epoch: best checkpoint (P4), early stopping (P3)

Fixed and broken paths sit side by side behind ``CurriculumLMConfig`` flags;
``BROKEN`` is the seed's pipeline (stage 3 = stage 2, optimizer re-created per
stage, constant LR 0.01, no clipping, no early stopping, unbalanced sources).

Why AdamW and not Muon as the base step: Muon only applies to 2-D hidden
matrices and needs an AdamW fallback for embeddings, biases and the head (the
seed's ``fallback_lr``), i.e. two optimizers whose states must both survive a
stage boundary; the seed's failure is about state, schedule and filter, not
the orthogonalised update.  P1's check is optimizer-agnostic and is also run
on ``torch.optim.Muon`` in tests/test_curriculum_lm.py.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from hypothesis import given, strategies as st
from torch import nn

from invariants import (one_thread, Case, LRScheduleConfig, assert_best_checkpoint_tracks_minimum,
                        assert_curriculum_progresses, assert_early_stopping_follows_patience,
                        assert_gradients_clipped, assert_grokfast_filter_exact,
                        assert_lr_schedule_warmup_cosine, assert_sources_balanced,
                        assert_stage_boundary_keeps_optimizer_state,
                        assert_validation_split_sound, gradient_sets, lr_schedule_configs,
                        split_sizes, val_loss_sequences)
from invariants import agree_across_ranks, ddp_token_mean
from invariants.validation import require
from invariants.validation import require_max_norm, require_min_delta, require_patience
from reference_models import data_parallel

SYSTEM = "curriculum_lm"
SOURCES = ("add", "sub", "cmp", "recall")
BEST_RULES = ("min_delta", "seed", "train_loss")


@dataclass(frozen=True)
class CurriculumLMConfig:
    # data
    n_stages: int = 3                 # seed: FOUNDATION, REASONING, ADVANCED
    samples_per_source: int = 24      # per source and level before balancing (tiny, CPU)
    cap_per_source: int = 20          # seed "Dataset Balancing": cap each source
    val_fraction: float = 0.2         # seed fix 5: "20% of training data"
    # model
    d_model: int = 32                 # tiny GRU; the seed's model was 25M parameters
    # optimisation
    lr: float = 0.02                  # peak; the seed halved 0.01 -> 0.005 for a 25M model, but
                                      # this 20k-parameter GRU learns nothing at 0.005 in 9 epochs
    weight_decay: float = 0.01
    grokfast_alpha: float = 0.98      # Grokfast paper default EMA momentum
    grokfast_lambda: float = 0.02     # seed: grokfast_lambda 0.05 -> 0.02 ("gentler")
    warmup_fraction: float = 0.1      # seed: "first 500 steps: lr = 0 -> target (linear)"
    eta_min: float = 1e-6             # seed: CosineAnnealingLR(..., eta_min=1e-6)
    clip_max_norm: float | None = 1.0  # seed: clip_grad_norm_(..., max_norm=1.0)
    batch_size: int = 8               # seed: batch 4 -> 8 or 16
    epochs_per_stage: int = 3         # seed: 3/3/4 epochs
    patience: int = 3                 # seed fix 4: "not improved for 3 epochs"
    min_delta: float = 0.01           # seed: self.min_delta = 0.01
    # broken variants (seed 002 unless said otherwise)
    stage3_repeats_stage2: bool = False        # P2: "Stage 3 ... Same as Stage 2"
    recreate_optimizer_per_stage: bool = False  # P1: "Optimizer state reset at stage boundaries"
    constant_lr: bool = False                  # P6: "No learning rate decay schedule", lr 0.01
    early_stopping: bool = True                # P3: "No Early Stopping"
    best_rule: str = "min_delta"               # P4: "seed" = trainer.py:280; "train_loss"
    grokfast_alpha_swapped: bool = False       # P7 teeth (not from the seed)
    val_from_train: bool = False               # P8: validation drawn from training data
    balance: bool = True                       # P9: "combined without balancing"

    def __post_init__(self) -> None:
        for name in ("n_stages", "samples_per_source", "cap_per_source", "d_model",
                     "batch_size", "epochs_per_stage"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require(isinstance(self.val_fraction, float) and 0 < self.val_fraction < 1,
                "val_fraction", self.val_fraction, "must be a float in (0, 1)")
        require(0 <= self.grokfast_alpha <= 1, "grokfast_alpha", self.grokfast_alpha,
                "must lie in [0, 1]")
        require(self.grokfast_lambda >= 0, "grokfast_lambda", self.grokfast_lambda, "must be >= 0")
        require(0 <= self.warmup_fraction < 1, "warmup_fraction", self.warmup_fraction,
                "must lie in [0, 1): warmup must be shorter than the schedule")
        if self.clip_max_norm is not None:
            require_max_norm(self.clip_max_norm)
        require_patience(self.patience)
        require_min_delta(self.min_delta)
        require(self.best_rule in BEST_RULES, "best_rule", self.best_rule,
                f"must be one of {BEST_RULES}")


FIXED = CurriculumLMConfig()
BROKEN = CurriculumLMConfig(                 # the seed's Phase-1 pipeline
    stage3_repeats_stage2=True, recreate_optimizer_per_stage=True, constant_lr=True,
    lr=0.01, clip_max_norm=None, early_stopping=False, best_rule="seed",
    val_from_train=True, balance=False)


# ------------------------------------------------------------------ data
def _sample(source: str, level: int, gen: torch.Generator) -> str:
    lo, hi = 10 ** (level - 1), 10 ** level - 1  # operands with exactly `level` digits
    a, b = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=gen))
    if source == "add":
        return f"Q: What is {a} + {b}? A: {a + b}"
    if source == "sub":
        a, b = max(a, b), min(a, b)
        return f"Q: A store has {a} apples and sells {b}. How many are left? A: {a - b}"
    if source == "cmp":
        return f"Q: Which is larger, {a} or {b}? A: {max(a, b)}"
    letters = torch.randint(0, 26, (level + 2,), generator=gen)
    name = "".join(chr(97 + int(i)) for i in letters).capitalize()
    return f"The code of {name} is {a}. Q: What is the code of {name}? A: {a}"


def make_sources(level: int, n: int, seed: int) -> dict[str, list[str]]:
    """Per-source de-duplicated samples of one level; sources are unequal on purpose.

    ``recall`` gets 3× the samples and ``cmp`` half (the seed's HellaSwag was 45%).
    """
    gen = torch.Generator().manual_seed(seed * 1000 + level)
    sizes = {"add": n, "sub": n, "cmp": max(1, n // 2), "recall": 3 * n}
    return {s: list(dict.fromkeys(_sample(s, level, gen) for _ in range(sizes[s])))
            for s in SOURCES}


def balance_sources(sources: dict[str, list[str]], caps: dict[str, int], *, seed: int,
                    balance: bool = True) -> list[tuple[str, str]]:
    """(source, sample) pairs: each source down-sampled to its cap (fixed) or concatenated (broken)."""
    out: list[tuple[str, str]] = []
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(sources):
        items = sources[name]
        if balance and len(items) > caps[name]:
            keep = torch.randperm(len(items), generator=gen)[: caps[name]].sort().values
            items = [items[int(i)] for i in keep]
        out += [(name, s) for s in items]
    return out


def split_train_val(samples: Sequence[Any], seed: int, fraction: float = 0.2
                    ) -> tuple[list[int], list[int]]:
    """Fixed P8: one seeded permutation; the first round(fraction·n) indices go to validation."""
    n = len(samples)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = round(fraction * n)
    return sorted(perm[k:]), sorted(perm[:k])


def split_val_from_train(samples: Sequence[Any], seed: int, fraction: float = 0.2
                         ) -> tuple[list[int], list[int]]:
    """Broken P8: validation is a random subset of the (whole) training set."""
    _, val = split_train_val(samples, seed, fraction)
    return list(range(len(samples))), val


@dataclass
class Data:
    stages: list[list[str]]    # training samples of each curriculum stage
    val: list[str]             # validation samples (all levels)
    pool_sources: list[str]    # source label of each balanced sample (P9)


def build_data(cfg: CurriculumLMConfig, seed: int) -> Data:
    caps = {s: cfg.cap_per_source for s in SOURCES}
    split = split_val_from_train if cfg.val_from_train else split_train_val
    train_by_level, val, labels = [], [], []
    for level in range(1, cfg.n_stages + 1):
        pool = balance_sources(make_sources(level, cfg.samples_per_source, seed), caps,
                               seed=seed + level, balance=cfg.balance)
        labels += [src for src, _ in pool]
        tr, va = split(pool, seed + level, cfg.val_fraction)  # stratified by level
        train_by_level.append([pool[i][1] for i in tr])
        val += [pool[i][1] for i in va]
    stages = [sum(train_by_level[: k + 1], []) for k in range(cfg.n_stages)]
    if cfg.stage3_repeats_stage2 and cfg.n_stages >= 3:
        stages[2] = list(stages[1])  # the seed's ADVANCED = REASONING
    return Data(stages, val, labels)


# ------------------------------------------------------------------ model
VOCAB = "\0\n" + "".join(chr(c) for c in range(32, 127))  # pad, end, printable ASCII
STOI = {c: i for i, c in enumerate(VOCAB)}


def encode(texts: Sequence[str]) -> torch.Tensor:
    """(B, T+1) int64: each text + "\\n", right-padded with 0."""
    width = max(len(t) for t in texts) + 1
    out = torch.zeros(len(texts), width, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [STOI[c] for c in t + "\n"]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class CharLM(nn.Module):
    def __init__(self, d_model: int = 32):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), d_model)
        self.rnn = nn.GRU(d_model, d_model, batch_first=True)
        self.head = nn.Linear(d_model, len(VOCAB))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h, _ = self.rnn(self.embed(tokens))  # (B, T, D)
        return self.head(h)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])  # (B, T, V)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       tokens[:, 1:].reshape(-1), ignore_index=0)


@torch.no_grad()
def generate(model: nn.Module, prompt: str, max_new: int = 12) -> str:
    """Greedy decoding up to "\\n" — the seed's ``::::::`` collapse shows up here."""
    ids = [STOI[c] for c in prompt]
    out = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt in (0, 1):
            break
        ids.append(nxt)
        out.append(VOCAB[nxt])
    return "".join(out)


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
    # fork_rng: the run seeds its own stream and leaves the caller's RNG alone
    with one_thread(), torch.random.fork_rng(devices=[]):
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
    logits = data_parallel.gather(net.logits, full=net.full)         # (B, T, V)
    targets = data_parallel.gather(net.targets, full=net.full)       # (B, T)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1), ignore_index=0)


# ------------------------------------------------------------------ the cases
def _check_p1(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)

    @given(steps_before=st.one_of(st.just(1), st.integers(1, 4)),
           total=st.integers(8, 40), seed=st.integers(0, 2**16))
    def p1(steps_before, total, seed):
        params = list(model.parameters())
        sched = schedule_for(cfg, total)
        opt, lr_sched = make_optimizer(params, cfg, sched)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps_before):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            lr_sched.step()
        assert_stage_boundary_keeps_optimizer_state(
            opt, lambda: enter_stage(opt, lr_sched, params, cfg, sched), scheduler=lr_sched)
    p1()


def _check_p2(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()

    @given(n=st.one_of(st.sampled_from([1, 2, 3]), st.integers(1, 12)),
           cap=st.integers(1, 10), seed=st.integers(0, 2**16))
    def p2(n, cap, seed):
        data = build_data(replace(cfg, samples_per_source=n, cap_per_source=cap), seed)
        assert_curriculum_progresses(data.stages)
    p2()


def _check_p3(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()

    @given(losses=val_loss_sequences(), patience=st.integers(1, 4),
           min_delta=st.sampled_from([0.0, 0.01, 0.1]))
    def p3(losses, patience, min_delta):
        stopper = make_stopper(replace(cfg, patience=patience, min_delta=min_delta))
        assert_early_stopping_follows_patience(stopper, losses, patience=patience,
                                               min_delta=min_delta)
    p3()


SEED_EPOCH1_TRAIN_LOSS = 0.6848  # seed: best_model.pt metadata, epoch 1


def _check_p4(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()

    @given(losses=val_loss_sequences(min_value=1.0, max_size=8),
           min_delta=st.sampled_from([0.0, 0.01]))
    def p4(losses, min_delta):
        tracker = make_tracker(replace(cfg, min_delta=min_delta))
        tracker.last_train_loss = SEED_EPOCH1_TRAIN_LOSS
        assert_best_checkpoint_tracks_minimum(tracker, losses, min_delta=min_delta)
    p4()


def _check_p5(make: Callable[[], CurriculumLMConfig]) -> None:
    clip = make_clipper(make())

    @given(max_norm=st.sampled_from([1.0, 0.25, 5.0]), data=st.data())
    def p5(max_norm, data):
        grads = data.draw(gradient_sets(max_norm=max_norm, dtype=st.sampled_from(
            [torch.float32, torch.float64, torch.bfloat16])), label="grads")
        assert_gradients_clipped(clip, grads, max_norm=max_norm)
    p5()


def _check_p6(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()
    param = nn.Parameter(torch.zeros(1))

    @given(sched=lr_schedule_configs(max_total_steps=100))
    def p6(sched):
        opt = torch.optim.AdamW([param], lr=sched.peak_lr)
        assert_lr_schedule_warmup_cosine(make_scheduler(opt, cfg, sched),
                                         total_steps=sched.total_steps,
                                         warmup_steps=sched.warmup_steps,
                                         peak_lr=sched.peak_lr, eta_min=sched.eta_min)
    p6()


def _check_p7(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()

    @given(alpha=st.one_of(st.sampled_from([0.0, 0.5, 0.98, 1.0]), st.floats(0.0, 1.0)),
           lamb=st.one_of(st.sampled_from([0.0, 0.02, 0.05, 5.0]), st.floats(0.0, 10.0)),
           n_steps=st.integers(1, 3), seed=st.integers(0, 2**16),
           dtype=st.sampled_from([torch.float32, torch.float64]))
    def p7(alpha, lamb, n_steps, seed, dtype):
        gen = torch.Generator().manual_seed(seed)
        params = [nn.Parameter(torch.zeros(3, 2, dtype=dtype)),
                  nn.Parameter(torch.zeros(2, dtype=dtype))]
        opt = GrokfastAdamW(params, lr=0.0, grokfast_alpha=alpha, grokfast_lambda=lamb,
                            alpha_swapped=cfg.grokfast_alpha_swapped)

        def filter_step(grads):  # the optimizer's own filter, read back from p.grad
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            return [p.grad for p in params]
        steps = [[torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
                 for _ in range(n_steps)]
        assert_grokfast_filter_exact(filter_step, steps, alpha=alpha, lamb=lamb)
    p7()


def _check_p8(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()
    split = split_val_from_train if cfg.val_from_train else split_train_val

    @given(n=split_sizes(fraction=cfg.val_fraction), seed=st.integers(0, 2**16))
    def p8(n, seed):
        assert_validation_split_sound(lambda s, sd: split(s, sd, cfg.val_fraction),
                                      list(range(n)), fraction=cfg.val_fraction, seed=seed)
    p8()


def _check_p9(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()

    @given(cap=st.integers(0, 8), data=st.data())
    def p9(cap, data):
        sizes = {s: data.draw(st.one_of(st.sampled_from(sorted({0, max(0, cap - 1), cap,
                                                                  cap + 1, 3 * cap})),
                                        st.integers(0, 30)), label=s) for s in SOURCES}
        sources = {s: [f"{s}{i}" for i in range(k)] for s, k in sizes.items()}
        caps = {s: cap for s in SOURCES}
        pairs = balance_sources(sources, caps, seed=cap, balance=cfg.balance)
        assert_sources_balanced([src for src, _ in pairs], caps=caps, available=sizes)
    p9()


def _case(inv, variant, expected, subject, check, title):
    return Case(SYSTEM, inv, variant, expected, subject, check, title)


def cases() -> list[Case]:
    f = lambda **kw: (lambda: replace(FIXED, **kw))  # noqa: E731
    return [
        _case("P1", "fixed", "holds", f(), _check_p1,
              "one GrokfastAdamW + scheduler for the run: state and LR cross the stage boundary"),
        _case("P1", "broken:optimizer_recreated", "caught", f(recreate_optimizer_per_stage=True),
              _check_p1, "seed: optimizer (and schedule) re-created at each curriculum stage"),
        _case("P2", "fixed", "holds", f(), _check_p2,
              "stage k = levels 1..k: every stage adds longer samples"),
        _case("P2", "broken:stage3_equals_stage2", "caught", f(stage3_repeats_stage2=True),
              _check_p2, "seed: ADVANCED uses the same datasets as REASONING"),
        _case("P3", "fixed", "holds", f(), _check_p3,
              "early stopping after patience checks without improvement > min_delta"),
        _case("P3", "broken:no_early_stopping", "caught", f(early_stopping=False), _check_p3,
              "seed: no early stopping, 10 epochs on a flat val_loss"),
        _case("P4", "fixed", "holds", f(), _check_p4,
              "best.pt written iff val_loss < best - min_delta"),
        _case("P4", "broken:best_from_train_loss", "caught", f(best_rule="train_loss"),
              _check_p4, "a best that can never be beaten: train loss 0.6848 stored as best"),
        _case("P4", "broken:seed_rule_ignores_min_delta", "caught", f(best_rule="seed"),
              _check_p4, "seed trainer.py:280 `val_loss < best` with min_delta=0.01 configured"),
        _case("P5", "fixed", "holds", f(), _check_p5,
              "clip_grad_norm_ at 1.0: norm capped, direction kept, no-op below the cap"),
        _case("P5", "broken:no_clipping", "caught", f(clip_max_norm=None), _check_p5,
              "seed: no gradient clipping"),
        _case("P6", "fixed", "holds", f(), _check_p6,
              "LambdaLR linear warmup + cosine to eta_min"),
        _case("P6", "broken:constant_lr", "caught", f(constant_lr=True, lr=0.01), _check_p6,
              "seed: constant LR 0.01, no decay"),
        _case("P7", "fixed", "holds", f(), _check_p7,
              "GrokfastAdamW filter: g + λ·EMA(g), λ=0 identity"),
        _case("P7", "broken:alpha_swapped", "caught", f(grokfast_alpha_swapped=True), _check_p7,
              "EMA with α and 1-α exchanged (teeth; not from the seed)"),
        _case("P8", "fixed", "holds", f(), _check_p8,
              "seeded 80/20 permutation split: disjoint, complete, deterministic"),
        _case("P8", "broken:val_from_train", "caught", f(val_from_train=True), _check_p8,
              "validation drawn from the training data"),
        _case("P9", "fixed", "holds", f(), _check_p9, "each source down-sampled to its cap"),
        _case("P9", "broken:unbalanced_concat", "caught", f(balance=False), _check_p9,
              "seed: sources concatenated without balancing"),
    ]
