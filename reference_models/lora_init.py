"""Seed 003 — LoRA initialisation garbles the model (SPEC L1-L7).

Convention of the seed: for a row-vector input x (…, in),
    y = base(x) + scale · dropout(x) · A · B,   A: (in, rank) down,  B: (rank, out) up.
Fixed path: B = 0 ("Option 1: Zero Initialization"). Broken path: A and B both
random with std 0.01 and scale 10 ("Current Configuration"). The other options
of the seed are here too: tiny scale (Option 2), orthogonal A with B = -Aᵀ/scale
(Option 4c, a refuted claim: L5), progressive scale (Option 5).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from hypothesis import given, strategies as st
from torch import nn

from invariants import (Case, LoraConfig, assert_adapter_contribution_negligible,
                        assert_adapter_delta_within_bound, assert_adapter_gradients_flow_at_init,
                        assert_adapter_identity_at_init, assert_adapter_kl_zero,
                        assert_merge_roundtrip, assert_scale_schedule_progressive,
                        float_tensors, lora_configs, dtypes)
from invariants.validation import require
from reference_models import data_parallel

SYSTEM = "lora_init"
INITS = ("zero_b", "random", "orthogonal_4c", "both_zero")


@dataclass(frozen=True)
class LoraInitConfig:
    rank: int = 16            # seed "Current Configuration": rank 16
    scale: float = 10.0       # seed: scale 10.0 (the value that garbles the model)
    dropout: float = 0.05     # seed: dropout 0.05
    init: str = "zero_b"      # Option 1 (recommended); "random" is the seed's broken init
    random_std: float = 0.01  # seed: "random values ~0.01 magnitude"
    merge_forgets_scale: bool = False  # broken L6 variant: merge W + B·A without the scale
    ignore_scale: bool = False         # broken L3 variant (teeth, not from the seed)

    def __post_init__(self) -> None:
        require(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank,
                "must be an integer >= 1")
        require(math.isfinite(self.scale) and self.scale >= 0, "scale", self.scale,
                "must be a finite number >= 0")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "must lie in [0, 1)")
        require(self.init in INITS, "init", self.init, f"must be one of {INITS}")


FIXED = LoraInitConfig()                                      # Option 1: zero-init B
BROKEN = LoraInitConfig(init="random")                        # the seed's current config
TINY_SCALE = LoraInitConfig(init="random", scale=0.01)        # Option 2
ORTHOGONAL_4C = LoraInitConfig(init="orthogonal_4c")          # Option 4c (claim, refuted)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank adapter; merge/unmerge like PEFT."""

    def __init__(self, base: nn.Linear, cfg: LoraInitConfig, generator: torch.Generator):
        super().__init__()
        require(cfg.rank <= min(base.in_features, base.out_features) or cfg.init != "orthogonal_4c",
                "rank", cfg.rank, "orthogonal_4c needs rank <= min(in, out)")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.scale = cfg.scale
        d_in, d_out, r = base.in_features, base.out_features, cfg.rank
        dt = base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(d_in, r, dtype=dt))   # (in, rank)
        self.lora_B = nn.Parameter(torch.empty(r, d_out, dtype=dt))  # (rank, out)
        self.dropout = nn.Dropout(cfg.dropout)
        self.merged = False
        with torch.no_grad():
            if cfg.init in ("zero_b", "both_zero"):
                bound = 1.0 / math.sqrt(d_in)  # kaiming-uniform-like, as PEFT does for A
                a = torch.rand(d_in, r, generator=generator, dtype=torch.float64) * 2 - 1
                self.lora_A.copy_(a * bound if cfg.init == "zero_b" else torch.zeros_like(a))
                self.lora_B.zero_()
            elif cfg.init == "random":
                self.lora_A.copy_(torch.randn(d_in, r, generator=generator,
                                              dtype=torch.float64) * cfg.random_std)
                self.lora_B.copy_(torch.randn(r, d_out, generator=generator,
                                              dtype=torch.float64) * cfg.random_std)
            else:  # orthogonal_4c: orthonormal columns of A, B = -Aᵀ / scale
                q, _ = torch.linalg.qr(torch.randn(d_in, r, generator=generator,
                                                   dtype=torch.float64))
                self.lora_A.copy_(q)
                self.lora_B.copy_(-q.T[:, :d_out] / cfg.scale)

    def effective_scale(self) -> float:
        return 1.0 if self.cfg.ignore_scale else self.scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear's (out, in) layout."""
        s = 1.0 if self.cfg.merge_forgets_scale else self.effective_scale()
        return s * (self.lora_A @ self.lora_B).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, in) -> (…, out)
        y = self.base(x)
        if self.merged:
            return y
        return y + self.effective_scale() * (self.dropout(x) @ self.lora_A @ self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def make_pair(lcfg: LoraConfig, cfg: LoraInitConfig, *, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> tuple[nn.Linear, LoraLinear]:
    """(base, adapted) with identical base weights; the adapter per ``cfg``.

    Rank, scale and dropout come from ``lcfg`` (drawn by Hypothesis); the init
    scheme and the broken-variant flags from ``cfg``.
    """
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(lcfg.in_features, lcfg.out_features).to(torch.float64)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(lcfg.in_features)
        base.weight.copy_((torch.rand(base.weight.shape, generator=gen, dtype=torch.float64)
                           * 2 - 1) * bound)
        base.bias.copy_((torch.rand(base.bias.shape, generator=gen, dtype=torch.float64)
                         * 2 - 1) * bound)
    base = base.to(dtype)
    cfg = replace(cfg, rank=lcfg.rank, dropout=lcfg.dropout, scale=lcfg.scale)
    adapted = LoraLinear(copy.deepcopy(base), cfg, gen)
    return base, adapted


# ---------------------------------------------------------------- tiny LM (L2)
@dataclass(frozen=True)
class TinyLMConfig:
    vocab: int = 16     # small vocabulary: KL is cheap and exact
    d_model: int = 16
    n_layers: int = 2   # the seed adapts 8 layers; 2 is enough for the cascade
    seq_len: int = 8


class TinyAttention(nn.Module):
    """Causal single-head self-attention with q/k/v/o projections (the seed's q_proj, v_proj)."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(x.shape[-1])  # (B, T, T)
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return x + self.o_proj(att @ v)


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG is left alone
            torch.manual_seed(seed)
            self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
            self.blocks = nn.ModuleList(TinyAttention(cfg.d_model) for _ in range(cfg.n_layers))
            self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def apply_lora(model: nn.Module, cfg: LoraInitConfig, keys=("q_proj", "v_proj"),
               seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose Linear layers named in ``keys`` carry adapters."""
    adapted = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for module in list(adapted.modules()):
        for name, child in list(module.named_children()):
            if name in keys and isinstance(child, nn.Linear):
                setattr(module, name, LoraLinear(child, cfg, gen))
    return adapted


# ------------------------------------------------------- progressive scale (L4)
def linear_scale_schedule(target: float, total_steps: int) -> Callable[[int], float]:
    """Option 5: scale = target · step / total_steps, clipped at the target."""
    return lambda step: target * min(step, total_steps) / total_steps


def constant_scale_schedule(target: float, total_steps: int) -> Callable[[int], float]:
    """Broken L4 variant: the schedule starts (and stays) at the target."""
    return lambda step: target


# ------------------------------------------------------------------ the cases
def _x_for(data, lcfg: LoraConfig, dtype=torch.float32, **kw) -> torch.Tensor:
    batch = data.draw(st.one_of(st.just(1), st.integers(1, 5)), label="batch")
    return data.draw(float_tensors(shape=(batch, lcfg.in_features), dtype=dtype, **kw),
                     label="x")


def _check_l1(make: Callable[[], LoraInitConfig]) -> None:
    cfg = make()

    @given(lcfg=lora_configs(scale=st.one_of(st.just(cfg.scale), st.floats(1e-4, 100.0))),
           dtype=dtypes(), data=st.data())
    def l1(lcfg, dtype, data):
        base, adapted = make_pair(lcfg, cfg, dtype=dtype)
        assert_adapter_identity_at_init(base, adapted, _x_for(data, lcfg, dtype), train=True)
    l1()


def _check_l2(make: Callable[[], LoraInitConfig]) -> None:
    cfg = make()

    lm_cfg = TinyLMConfig()
    base = TinyLM(lm_cfg, seed=0)

    @given(rank=st.integers(1, 16), batch=st.integers(1, 3),
           length=st.integers(1, lm_cfg.seq_len), data=st.data())
    def l2(rank, batch, length, data):
        adapted = apply_lora(base, replace(cfg, rank=rank), seed=rank)
        tokens = data.draw(st.lists(st.integers(0, lm_cfg.vocab - 1), min_size=batch * length,
                                    max_size=batch * length), label="tokens")
        tokens = torch.tensor(tokens).view(batch, length)
        assert_adapter_kl_zero(base, adapted, tokens)
    l2()


def _check_l3(make: Callable[[], LoraInitConfig]) -> None:
    cfg = make()

    @given(lcfg=lora_configs(scale=st.floats(1e-6, 0.1)), data=st.data())
    def l3(lcfg, data):
        base, adapted = make_pair(lcfg, cfg, dtype=torch.float64)
        assert_adapter_delta_within_bound(base, adapted, _x_for(data, lcfg, torch.float64),
                                          scale=lcfg.scale, lora_A=adapted.lora_A,
                                          lora_B=adapted.lora_B)
    l3()


def _check_l4(make: Callable[[], Callable]) -> None:
    factory = make()

    @given(total=st.one_of(st.just(1), st.integers(1, 500)),
           target=st.one_of(st.just(10.0), st.floats(1e-3, 100.0)))
    def l4(total, target):
        assert_scale_schedule_progressive(factory(target, total), total_steps=total,
                                          target=target)
    l4()


def _check_l5(make: Callable[[], LoraInitConfig]) -> None:
    cfg = make()

    @given(d=st.integers(1, 16), data=st.data())
    def l5(d, data):
        rank = data.draw(st.integers(1, d), label="rank")
        lcfg = LoraConfig(in_features=d, out_features=d, rank=rank, scale=cfg.scale)
        base, adapted = make_pair(lcfg, cfg, dtype=torch.float64)
        x = _x_for(data, lcfg, torch.float64, max_magnitude=10.0)
        assert_adapter_contribution_negligible(base, adapted, x)
    l5()


def _check_l6(make: Callable[[], LoraInitConfig]) -> None:
    cfg = make()

    @given(lcfg=lora_configs(scale=st.floats(0.5, 20.0)), data=st.data())
    def l6(lcfg, data):
        base, adapted = make_pair(lcfg, replace(cfg, init="random", random_std=0.3),
                                  dtype=torch.float64)
        assert_merge_roundtrip(adapted, _x_for(data, lcfg, torch.float64, max_magnitude=10.0))
    l6()


def _check_l7(make: Callable[[], LoraInitConfig]) -> None:
    cfg = make()

    @given(lcfg=lora_configs(), data=st.data())
    def l7(lcfg, data):
        base, adapted = make_pair(lcfg, cfg)
        x = _x_for(data, lcfg, min_magnitude=1e-3, allow_zero=False)
        assert_adapter_gradients_flow_at_init(adapted, x, lora_A=adapted.lora_A,
                                              lora_B=adapted.lora_B)
    l7()


def _case(inv, variant, expected, subject, check, title):
    return Case(SYSTEM, inv, variant, expected, subject, check, title)


def cases() -> list[Case]:
    return [
        _case("L1", "fixed", "holds", lambda: FIXED, _check_l1,
              "zero-init B: adapted output == base output, train mode with dropout"),
        _case("L1", "broken:random_ab_scale10", "caught", lambda: BROKEN, _check_l1,
              "seed's config: random A and B (std 0.01), scale 10"),
        _case("L2", "fixed", "holds", lambda: FIXED, _check_l2,
              "tiny LM with zero-init LoRA on q/v: KL(base||adapted) == 0"),
        _case("L2", "broken:random_ab_scale10", "caught", lambda: BROKEN, _check_l2,
              "tiny LM with the seed's random init: KL > 0"),
        _case("L3", "fixed", "holds", lambda: TINY_SCALE, _check_l3,
              "Option 2 tiny scale: ‖Δy‖ <= s·‖B‖₂‖A‖₂‖x‖"),
        _case("L3", "broken:scale_ignored", "caught",
              lambda: replace(TINY_SCALE, ignore_scale=True), _check_l3,
              "adapter that ignores its scale (teeth; not from the seed)"),
        _case("L4", "fixed", "holds", lambda: linear_scale_schedule, _check_l4,
              "Option 5 progressive scale from 0 to the target"),
        _case("L4", "broken:starts_at_target", "caught", lambda: constant_scale_schedule,
              _check_l4, "schedule that starts at the target scale"),
        _case("L5", "claim:orthogonal_4c", "refuted", lambda: ORTHOGONAL_4C, _check_l5,
              "Option 4c claim: orthogonal A, B = -Aᵀ/scale gives near-zero contribution"),
        _case("L6", "fixed", "holds", lambda: FIXED, _check_l6,
              "merge/unmerge with the scale: outputs equal, unmerge restores"),
        _case("L6", "broken:merge_forgets_scale", "caught",
              lambda: replace(FIXED, merge_forgets_scale=True), _check_l6,
              "merge that folds B·A into W without the scale"),
        _case("L7", "fixed", "holds", lambda: FIXED, _check_l7,
              "zero-init: dL/dA == 0, dL/dB != 0"),
        _case("L7", "broken:both_zero", "caught", lambda: replace(FIXED, init="both_zero"),
              _check_l7, "A and B both zero: a dead adapter"),
    ]


# ------------------------------------------------------------ golden run (seed 003)
def _task_batch(gen: torch.Generator, vocab: int, batch: int, length: int, shift: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic next-token task: each token is followed by (token + shift) mod vocab."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    seq = (start + shift * torch.arange(length + 1)) % vocab  # (B, T+1)
    return seq[:, :-1], seq[:, 1:]


def finetune_curves(cfg: LoraInitConfig, *, seed: int = 0, pretrain_steps: int = 150,
                    finetune_steps: int = 40, lr: float = 3e-3) -> dict[str, tuple[list, list]]:
    """Pretrain a tiny LM in code (shift-1 task), attach LoRA per ``cfg``, fine-tune (shift-2).

    Records per fine-tune step: loss, accuracy, kl_from_base (KL of the adapted model's
    next-token distribution from the frozen pretrained base on a fixed probe batch),
    entropy, adapter_delta_norm (Σ‖scale·A·B‖F over adapters; not seed 000's per-sample
    HyperLoRA ``lora_norm``, whose thresholds assume a normalised base). Step 0 is before any update, so a
    fixed run shows kl_from_base == 0 there and a broken run does not.
    """
    with torch.random.fork_rng(devices=[]):  # dropout draws from a seeded, private stream
        torch.manual_seed(seed)
        return _finetune(cfg, seed, pretrain_steps, finetune_steps, lr)


def _finetune(cfg: LoraInitConfig, seed: int, pretrain_steps: int, finetune_steps: int,
              lr: float) -> dict[str, tuple[list, list]]:
    lm_cfg = TinyLMConfig()
    gen = torch.Generator().manual_seed(seed)
    base = TinyLM(lm_cfg, seed=seed)
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    for _ in range(pretrain_steps):
        x, y = _task_batch(gen, lm_cfg.vocab, 16, lm_cfg.seq_len, shift=1)
        loss = nn.functional.cross_entropy(base(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    adapted = apply_lora(base, cfg, seed=seed)
    adapters = [m for m in adapted.modules() if isinstance(m, LoraLinear)]
    params = [p for m in adapters for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.Adam(params, lr=lr)
    probe_x, _ = _task_batch(torch.Generator().manual_seed(seed + 1), lm_cfg.vocab, 8,
                             lm_cfg.seq_len, shift=2)
    with torch.no_grad():
        base_logp = torch.log_softmax(base(probe_x).double(), -1)
    curves: dict[str, list[float]] = {k: [] for k in
                                      ("loss", "accuracy", "kl_from_base", "entropy",
                                       "adapter_delta_norm")}
    # Under a process group (world size W) only the fine-tune is data-parallel: the
    # pretraining above is the fixture, replayed identically on every rank.
    distributed = data_parallel.active()
    net = adapted
    if distributed:
        for m in adapters:   # the full batch's dropout mask, as one process draws it
            m.dropout = data_parallel.ShardedDropout(m.dropout.p, full_batch=16)
        net = data_parallel.wrap(adapted)
    for step in range(finetune_steps + 1):
        adapted.eval()
        with torch.no_grad():   # on the fixed probe batch: replicated, needs no reduction
            logp = torch.log_softmax(adapted(probe_x).double(), -1)
            curves["kl_from_base"].append(float((base_logp.exp() * (base_logp - logp)).sum(-1).mean()))
            curves["entropy"].append(float(-(logp.exp() * logp).sum(-1).mean()))
            curves["adapter_delta_norm"].append(
                float(sum(m.delta_weight().norm() for m in adapters)))
        adapted.train()
        x, y = _task_batch(gen, lm_cfg.vocab, 16, lm_cfg.seq_len, shift=2)
        if distributed:         # every rank drew the full batch: keep its rows
            x, y = data_parallel.shard(x, y)
        logits = net(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if distributed:         # log the FULL batch's loss and accuracy, same formulas
            logits = data_parallel.gather(logits, full=16)
            y = data_parallel.gather(y, full=16)
            with torch.no_grad():
                logged = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            logged = loss
        curves["loss"].append(float(logged.detach()))
        curves["accuracy"].append(float((logits.argmax(-1) == y).double().mean()))
        if step < finetune_steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    steps = list(range(finetune_steps + 1))
    return {k: (steps, v) for k, v in curves.items()}


GOLDEN_NOTE = (
    "Seed 003 says random A,B (~0.01) with scale 10 garbles the model. In this 2-layer LM the "
    "seed's init gives an initial KL from the base of ~1e-6 nats: the mechanism (a non-zero "
    "perturbation at step 0, before any learning) is reproduced; downstream garbled generation "
    "is not, and is not forced. Fixed (zero-init B) starts at KL exactly 0.")
