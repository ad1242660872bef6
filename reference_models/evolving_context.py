"""Seed 004 — a decoder chasing an evolving encoder context (SPEC E1-E6).

ETRMTRM-style model, tiny: an encoder refines a context z_e (B, L, D) from
(carry, demo encodings) by cross-attention at every ACT step, and a small
recurrent decoder reads the (normalised) context at every step.

One encoder step (the seed's ``recurrent_standard.py``):
    query = z_prev.detach() if detach_query else z_prev       # Fix 4 (E3)
    z1    = rms_norm(z_prev + α·attn(query, demos))           # Fix 3 (E2)
    z_raw = rms_norm(z1 + α·mlp(z1))                          # Fix 3 (E2)
    z     = β·z_prev.detach() + (1 − β)·z_raw                 # Fix 2 (E1), β = 0.9
    carry = z.detach()                                        # E1: no graph across steps
    context = layer_norm(z)                                   # Fix 6 (E4), read by the decoder
The encoder's parameters sit in their own param group with
lr = encoder_lr_scale × base lr (Fix 1 and Fix 5, E5). Diagnostics as the
seed's "Diagnostic Step 1" and "Step 2" (E6).

``FIXED`` has every fix on; ``PRE_FIX`` is the seed's model before the fixes
(no smoothing, α = 1, query not detached, no context norm, scale 1). Each
broken variant of the catalog turns exactly one fix into its bug, behind a flag.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings, strategies as st
from torch import nn

from invariants import (one_thread, Case, assert_context_diagnostics_match, assert_context_rows_normalized,
                        assert_context_update_smoothed, assert_encoder_frozen_by_zero_lr,
                        assert_encoder_grad_share_valid, assert_encoder_lr_scaled,
                        assert_query_gradient_blocked, assert_residual_scaled, context_specs,
                        lr_scales, unit_fractions)
from invariants import PCT_UNDEFINED_BELOW
from invariants.validation import (require, require_in_unit_interval, require_non_negative,
                                  require_positive)
from reference_models import data_parallel

SYSTEM = "evolving_context"
PCT_NORMALISERS = ("prev", "new")           # "new" is a broken E6 variant
SHARE_DENOMINATORS = ("total", "decoder")   # "decoder" is a broken E6 variant


@dataclass(frozen=True)
class EvolvingContextConfig:
    d_model: int = 16          # tiny width; the seed's model is far wider
    n_slots: int = 4           # L: context rows per sample
    n_demos: int = 3           # N: demo encodings per sample
    n_classes: int = 4         # synthetic task: the class the demos share
    act_steps: int = 3         # ACT steps per forward (context refined at each)
    ema_decay: float = 0.9     # Fix 2: z = 0.9·z_prev + 0.1·z_raw
    alpha: float = 0.3         # Fix 3: "alpha = 0.3  # Scaling factor"
    detach_query: bool = True  # Fix 4: query = carry.z_e.detach()
    context_norm: bool = True  # Fix 6: F.layer_norm(context, context.shape[-1:])
    layer_norm_eps: float = 1e-5  # F.layer_norm's default, as the seed calls it
    rms_eps: float = 1e-6      # eps of the encoder's rms_norm
    encoder_lr_scale: float = 0.3  # Fix 1: "Encoder learns at 30% of decoder's rate"
    base_lr: float = 1e-2      # decoder (base) lr of train_steps: FIXED reaches 100 % train
                               # accuracy within 100 steps at this lr (3e-3: ~70 %)
    weight_decay: float = 0.01  # AdamW; with lr 0 it must not move a frozen encoder
    grad_clip: float = 1.0     # seed: "Global gradient clipping (norm=1.0)"
    batch: int = 16
    # broken variants (each the bug of one fix; defaults = fixed)
    ignore_ema: bool = False        # E1: unsmoothed update (β configured, not applied)
    keep_carry_graph: bool = False  # E1: carry returned without .detach()
    ignore_alpha: bool = False      # E2: α = 1 where 0.3 is configured
    ignore_lr_scale: bool = False   # E5: encoder group gets the base lr
    pct_normaliser: str = "prev"    # E6: "new" divides by mean‖z_new‖ (not from the seed)
    share_denominator: str = "total"  # E6: "decoder" divides by ‖g_dec‖ (not from the seed)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_slots", "n_demos", "n_classes", "act_steps", "batch"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require_in_unit_interval("ema_decay", self.ema_decay)
        require_non_negative("alpha", self.alpha)
        require_non_negative("encoder_lr_scale", self.encoder_lr_scale)
        require_positive("base_lr", self.base_lr)
        require_non_negative("weight_decay", self.weight_decay)
        require_positive("layer_norm_eps", self.layer_norm_eps)
        require_positive("rms_eps", self.rms_eps)
        require_positive("grad_clip", self.grad_clip)
        require(self.pct_normaliser in PCT_NORMALISERS, "pct_normaliser", self.pct_normaliser,
                f"must be one of {PCT_NORMALISERS}")
        require(self.share_denominator in SHARE_DENOMINATORS, "share_denominator",
                self.share_denominator, f"must be one of {SHARE_DENOMINATORS}")


FIXED = EvolvingContextConfig()
PRE_FIX = EvolvingContextConfig(ema_decay=0.0, alpha=1.0, detach_query=False,
                                context_norm=False, encoder_lr_scale=1.0)
BROKEN = {
    "unsmoothed_update": replace(FIXED, ignore_ema=True),
    "carry_keeps_graph": replace(FIXED, keep_carry_graph=True),
    "alpha_ignored": replace(FIXED, ignore_alpha=True),
    "query_not_detached": replace(FIXED, detach_query=False),
    "no_normalisation": replace(FIXED, context_norm=False),
    "lr_scale_ignored": replace(FIXED, ignore_lr_scale=True),
    "pct_wrong_normaliser": replace(FIXED, pct_normaliser="new"),
    "share_over_decoder": replace(FIXED, share_denominator="decoder"),
}


class ContextEncoder(nn.Module):
    """Recurrent encoder: one call refines z_e once (one ACT step)."""

    def __init__(self, cfg: EvolvingContextConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.z_init = nn.Parameter(torch.randn(cfg.n_slots, d))  # (L, D) initial context

    @property
    def alpha(self) -> float:
        return 1.0 if self.cfg.ignore_alpha else self.cfg.alpha

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], eps=self.cfg.rms_eps)

    def attention(self, query: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        # query (B, L, D), demos (B, N, D) -> (B, L, D)
        q, k, v = self.q_proj(query), self.k_proj(demos), self.v_proj(demos)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, L, N)
        return self.o_proj(att.softmax(-1) @ v)

    def query_branch(self, z_prev: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        """The cross-attention output, with z_prev as the query (E3's subject)."""
        query = z_prev.detach() if self.cfg.detach_query else z_prev  # Fix 4 / broken
        return self.attention(query, demos)

    def attn_block(self, z_prev: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        return self.norm(z_prev + self.alpha * self.query_branch(z_prev, demos))

    def mlp_block(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(z + self.alpha * self.mlp(z))

    def raw_step(self, z_prev: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        """The unsmoothed update z_raw (B, L, D)."""
        return self.mlp_block(self.attn_block(z_prev, demos))

    def forward(self, z_prev: torch.Tensor, demos: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(carry z_prev (B, L, D), demos (B, N, D)) -> (new carry, context with graph)."""
        z_raw = self.raw_step(z_prev, demos)
        if self.cfg.ignore_ema:  # broken E1: the configured factor is not applied
            z = z_raw
        else:                    # Fix 2: smoothed with the previous state
            beta = self.cfg.ema_decay
            z = beta * z_prev.detach() + (1.0 - beta) * z_raw
        carry = z if self.cfg.keep_carry_graph else z.detach()
        return carry, z

    def carry_step(self, z_prev: torch.Tensor, demos: torch.Tensor) -> torch.Tensor:
        """Carry in, carry out: the subject of E1."""
        return self(z_prev, demos)[0]


class ContextDecoder(nn.Module):
    """Recurrent decoder: h ← tanh(W[h, x, pool(context)]); logits = head(h)."""

    def __init__(self, cfg: EvolvingContextConfig):
        super().__init__()
        d = cfg.d_model
        self.cell = nn.Linear(3 * d, d)
        self.head = nn.Linear(d, cfg.n_classes)

    def forward(self, h: torch.Tensor, x: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # h (B, D), x (B, D), context (B, L, D) -> h (B, D), logits (B, C)
        h = torch.tanh(self.cell(torch.cat([h, x, context.mean(dim=1)], dim=-1)))
        return h, self.head(h)


class EvolvingContextModel(nn.Module):
    def __init__(self, cfg: EvolvingContextConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ContextEncoder(cfg)
        self.decoder = ContextDecoder(cfg)

    def normalize_context(self, context: torch.Tensor) -> torch.Tensor:
        if not self.cfg.context_norm:  # broken E4 / pre-fix: raw context to the decoder
            return context
        return F.layer_norm(context, context.shape[-1:], eps=self.cfg.layer_norm_eps)  # Fix 6

    def forward(self, x: torch.Tensor, demos: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """x (B, D), demos (B, N, D) -> per-ACT-step logits (B, C) and (z_prev, z_new) pairs."""
        b = x.shape[0]
        z = self.encoder.z_init.unsqueeze(0).expand(b, -1, -1)  # (B, L, D)
        h = torch.zeros_like(x)
        logits, pairs = [], []
        for _ in range(self.cfg.act_steps):
            z_new, context = self.encoder(z, demos)
            h, out = self.decoder(h, x, self.normalize_context(context))
            logits.append(out)
            pairs.append((z.detach(), z_new.detach()))
            z = z_new
        return logits, pairs

    # ---------------------------------------------------------------- E5
    def param_groups(self, base_lr: float | None = None,
                     encoder_lr_scale: float | None = None) -> list[dict[str, Any]]:
        """[decoder group at base lr, encoder group at scale × base lr] (Fix 1)."""
        base_lr = self.cfg.base_lr if base_lr is None else base_lr
        scale = self.cfg.encoder_lr_scale if encoder_lr_scale is None else encoder_lr_scale
        require_positive("base_lr", base_lr)
        require_non_negative("encoder_lr_scale", scale)
        enc_lr = base_lr if self.cfg.ignore_lr_scale else scale * base_lr  # broken / fixed
        return [{"params": list(self.decoder.parameters()), "lr": base_lr, "name": "decoder"},
                {"params": list(self.encoder.parameters()), "lr": enc_lr, "name": "encoder"}]

    # ---------------------------------------------------------------- E6
    def context_diagnostics(self, z_prev: torch.Tensor, z_new: torch.Tensor
                            ) -> dict[str, torch.Tensor]:
        """The seed's Diagnostic Step 1 (under no_grad, in the context's dtype)."""
        with torch.no_grad():
            delta = (z_new - z_prev).norm(dim=-1).mean()
            out = {"z_e_step_change": delta}
            ref = z_prev if self.cfg.pct_normaliser == "prev" else z_new  # "new" is broken
            z_norm = ref.norm(dim=-1).mean()
            if z_prev.norm(dim=-1).mean() > PCT_UNDEFINED_BELOW:
                out["z_e_step_change_pct"] = delta / z_norm
            return out

    def grad_norms(self) -> dict[str, float]:
        """Global gradient norms and the encoder's share (the seed's Step 2)."""
        def norm(params) -> torch.Tensor:
            sq = [p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None]
            return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64)
        g_enc = norm(self.encoder.parameters())
        g_dec = norm(self.decoder.parameters())
        g_total = (g_enc ** 2 + g_dec ** 2).sqrt()
        denom = g_total if self.cfg.share_denominator == "total" else g_dec  # "decoder" broken
        share = g_enc / denom if float(denom) > 0 else torch.zeros((), dtype=torch.float64)
        return {"grad_norm_encoder": float(g_enc), "grad_norm_decoder": float(g_dec),
                "grad_norm": float(g_total), "encoder_grad_share": float(share)}


# ------------------------------------------------------------ training (golden runs)
def make_task(cfg: EvolvingContextConfig, seed: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Synthetic few-shot task: the demos are noisy copies of a class prototype, the
    query x is noise plus a weak copy, and the label is the class. The decoder
    only sees the class through the context, so the encoder has to learn."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(cfg.n_classes, cfg.d_model, generator=gen)  # (C, D)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        y = torch.randint(cfg.n_classes, (cfg.batch,), generator=g)  # (B,)
        demos = protos[y].unsqueeze(1) + 0.5 * torch.randn(
            cfg.batch, cfg.n_demos, cfg.d_model, generator=g)         # (B, N, D)
        x = 0.2 * protos[y] + torch.randn(cfg.batch, cfg.d_model, generator=g)  # (B, D)
        return x, demos, y
    return batch


def build(cfg: EvolvingContextConfig, seed: int = 0
          ) -> tuple[EvolvingContextModel, torch.optim.Optimizer]:
    """The model (seeded init, global RNG untouched) and its AdamW with the two groups."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EvolvingContextModel(cfg)
    opt = torch.optim.AdamW(model.param_groups(), lr=cfg.base_lr,
                            weight_decay=cfg.weight_decay, foreach=False)
    return model, opt


def train_step(model: EvolvingContextModel, opt: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """One step: deep-supervised CE over the ACT steps, clip, AdamW. Returns its metrics."""
    x, demos, y = batch
    opt.zero_grad(set_to_none=True)
    logits, pairs = model(x, demos)
    loss = torch.stack([F.cross_entropy(out, y) for out in logits]).mean()
    loss.backward()
    metrics = model.grad_norms()  # before clipping, as logged in the seed
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.cfg.grad_clip)
    opt.step()
    z_prev = torch.stack([p for p, _ in pairs])  # (S, B, L, D)
    z_new = torch.stack([n for _, n in pairs])
    diag = model.context_diagnostics(z_prev, z_new)
    metrics.update(
        loss=float(loss.detach()),
        accuracy=float((logits[-1].argmax(-1) == y).double().mean()),
        z_e_step_change=float(diag["z_e_step_change"]),
        z_e_step_change_pct=float(diag.get("z_e_step_change_pct", math.nan)),
    )
    return metrics


METRICS = ("loss", "accuracy", "z_e_step_change", "z_e_step_change_pct", "grad_norm",
           "grad_norm_encoder", "grad_norm_decoder", "encoder_grad_share")


def train_steps(cfg: EvolvingContextConfig = FIXED, steps: int = 100, seed: int = 0
                ) -> dict[str, list[float]]:
    """A short deterministic training run on synthetic data: per-step metric lists.

    Keys: ``METRICS``. ``z_e_step_change``/``_pct`` are over all rows of all ACT
    steps of the step's forward; gradient norms are taken before clipping.
    Runs with one intra-op thread (restored after), so the numbers do not depend
    on the machine's thread count; the global RNG is not touched. Same
    (cfg, steps, seed) -> the same numbers. About 0.3 s per 50 steps on one core.
    """
    require(isinstance(steps, int) and steps >= 1, "steps", steps, "must be an integer >= 1")
    require(isinstance(seed, int) and seed >= 0, "seed", seed, "must be an integer >= 0")
    with one_thread():
        model, opt = build(cfg, seed)
        task = make_task(cfg, seed)
        out: dict[str, list[float]] = {k: [] for k in METRICS}
        distributed = data_parallel.active()   # DDP over the batch; else single-process code
        net = data_parallel.wrap(model) if distributed else None
        for step in range(steps):
            if distributed:
                metrics = _ddp_train_step(net, model, opt, task(step))
            else:
                metrics = train_step(model, opt, task(step))
            for k in METRICS:
                out[k].append(metrics[k])
    return out


def _ddp_train_step(net: nn.Module, model: EvolvingContextModel, opt: torch.optim.Optimizer,
                    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """``train_step`` on this rank's rows of the full ``batch``, under DDP (``net``).

    The loss is a mean over equal shards (DDP's average is the full-batch gradient);
    the gradient norms are read after DDP's all-reduce (the same on every rank); the
    logged loss, accuracy and z_e diagnostics are computed from the full batch's
    tensors, gathered exactly, with ``train_step``'s formulas.
    """
    full = batch[0].shape[0]
    x, demos, y = data_parallel.shard(*batch)
    opt.zero_grad(set_to_none=True)
    logits, pairs = net(x, demos)
    loss = torch.stack([F.cross_entropy(out, y) for out in logits]).mean()
    loss.backward()
    metrics = model.grad_norms()  # before clipping, as logged in the seed
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.cfg.grad_clip)
    opt.step()
    with torch.no_grad():
        y = data_parallel.gather(y, full=full)
        logits = [data_parallel.gather(out, full=full) for out in logits]  # S x (B, C)
        loss = torch.stack([F.cross_entropy(out, y) for out in logits]).mean()
        z_prev = data_parallel.gather(torch.stack([p for p, _ in pairs]), 1, full=full)
        z_new = data_parallel.gather(torch.stack([n for _, n in pairs]), 1, full=full)
        # z_prev, z_new: (S, B, L, D), the full batch's rows of every ACT step
    diag = model.context_diagnostics(z_prev, z_new)
    metrics.update(
        loss=float(loss),
        accuracy=float((logits[-1].argmax(-1) == y).double().mean()),
        z_e_step_change=float(diag["z_e_step_change"]),
        z_e_step_change_pct=float(diag.get("z_e_step_change_pct", math.nan)),
    )
    return metrics


def config_dict(cfg: EvolvingContextConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (for golden metadata and its hash)."""
    return asdict(cfg)


# ------------------------------------------------------------------ the cases
_PHASES = tuple(p for p in Phase if p is not Phase.explain)


def _profile_settings() -> settings:
    """The loaded profile's settings, minus Hypothesis's ``explain`` phase.

    ``explain`` re-runs a failing example many times to annotate which draws
    matter, which the one-line counterexample does not show; it cost ~2 s per
    caught broken variant here. Generation and shrinking are untouched.
    Called inside each check, so the profile loaded at run time is inherited.
    """
    return settings(phases=_PHASES)

_DEMO_COUNTS = st.one_of(st.just(1), st.just(2), st.integers(1, 4))
_WIDTH = 8  # the catalog's encoders are 8 wide: cheap, and every path is exercised


def _single_thread(check: Callable[[Callable[[], Any]], None]) -> Callable[[Callable[[], Any]], None]:
    """Run a catalog check with one intra-op thread, restoring the count after.

    The tensors here are a few hundred elements: a second thread only adds
    synchronisation, and on a loaded machine it made the checks ~5x slower.
    """
    @functools.wraps(check)
    def run(make: Callable[[], Any]) -> None:
        with one_thread():
            check(make)
    return run


def _encoder(cfg: EvolvingContextConfig, dtype: torch.dtype = torch.float32,
             seed: int = 0) -> ContextEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = ContextEncoder(replace(cfg, d_model=_WIDTH))
    return enc.to(dtype).eval()


_ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Strategies are built once (building them inside a test costs Hypothesis more than
# the test itself). Demos: 0.1..10 scale, 1..4 of them, per batch size.
_Z = {dt: context_specs(width=_WIDTH, dtype=dt) for dt in _ALL_DTYPES}
_DEMOS = {b: context_specs(batch=b, slots=_DEMO_COUNTS, width=_WIDTH, dtype=torch.float64,
                           min_magnitude=0.1, max_magnitude=10.0) for b in range(1, 5)}
_Z_LIKE = {(b, l, dt): context_specs(batch=b, slots=l, width=_WIDTH, dtype=dt)
           for b in range(1, 5) for l in range(1, 5) for dt in _ALL_DTYPES}


def _draw_inputs(data, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    z = data.draw(_Z[dtype], label="z_prev").tensor()
    demos = data.draw(_DEMOS[z.shape[0]], label="demos").tensor().to(dtype)
    return z, demos


@_single_thread
def _check_e1(make: Callable[[], EvolvingContextConfig]) -> None:
    cfg = make()
    encoders = {dt: _encoder(cfg, dt) for dt in (torch.float32, torch.float64, torch.bfloat16)}

    @_profile_settings()
    @given(beta=unit_fractions(), dtype=st.sampled_from(list(encoders)), data=st.data())
    def e1(beta, dtype, data):
        enc = encoders[dtype]
        enc.cfg = replace(cfg, d_model=_WIDTH, ema_decay=beta)
        z, demos = _draw_inputs(data, dtype)
        assert_context_update_smoothed(enc.carry_step, enc.raw_step, z, demos, ema_decay=beta)
    e1()


@_single_thread
def _check_e2(make: Callable[[], EvolvingContextConfig]) -> None:
    cfg = make()
    encoders = {dt: _encoder(cfg, dt) for dt in (torch.float32, torch.float64, torch.bfloat16)}

    @_profile_settings()
    @given(alpha=unit_fractions(), dtype=st.sampled_from(list(encoders)), data=st.data())
    def e2(alpha, dtype, data):
        enc = encoders[dtype]
        enc.cfg = replace(cfg, d_model=_WIDTH, alpha=alpha)
        z, demos = _draw_inputs(data, dtype)
        assert_residual_scaled(lambda t: enc.attn_block(t, demos),
                               lambda t: enc.query_branch(t, demos), z, alpha=alpha,
                               norm=enc.norm, custom_message="sub-block: attention")
        assert_residual_scaled(enc.mlp_block, enc.mlp, z, alpha=alpha, norm=enc.norm,
                               custom_message="sub-block: MLP")
    e2()


@_single_thread
def _check_e3(make: Callable[[], EvolvingContextConfig]) -> None:
    enc = _encoder(make(), torch.float64)

    @_profile_settings()
    @given(data=st.data())
    def e3(data):
        z, demos = _draw_inputs(data, torch.float64)
        assert_query_gradient_blocked(enc.query_branch, z, demos)
    e3()


@_single_thread
def _check_e4(make: Callable[[], EvolvingContextConfig]) -> None:
    cfg = make()
    model = EvolvingContextModel(replace(cfg, d_model=_WIDTH))

    @_profile_settings()
    @given(spec=context_specs(width=st.sampled_from([1, 2, _WIDTH]),
                              dtype=st.sampled_from(_ALL_DTYPES)))
    def e4(spec):
        assert_context_rows_normalized(model.normalize_context, spec.tensor(),
                                       eps=cfg.layer_norm_eps)
    e4()


@_single_thread
def _check_e4_claim(make: Callable[[], EvolvingContextConfig]) -> None:
    model = EvolvingContextModel(replace(make(), d_model=_WIDTH))

    @_profile_settings()
    @given(spec=context_specs(width=_WIDTH))
    def e4_claim(spec):
        # the seed's literal claim: variance 1 whatever the input scale (eps = 0)
        assert_context_rows_normalized(model.normalize_context, spec.tensor(), eps=0.0)
    e4_claim()


@_single_thread
def _check_e5(make: Callable[[], EvolvingContextConfig]) -> None:
    cfg = make()
    small = replace(cfg, d_model=_WIDTH, batch=4, act_steps=2)
    task = make_task(small, seed=1)

    @_profile_settings()
    @given(scale=lr_scales(), base_lr=st.sampled_from([1e-3, 3e-3, 1.0]),
           weight_decay=st.sampled_from([0.0, 0.01, 0.5]))
    def e5(scale, base_lr, weight_decay):
        model, _ = build(small, seed=0)
        opt = torch.optim.AdamW(model.param_groups(base_lr, scale), lr=base_lr,
                                weight_decay=weight_decay, foreach=False)
        assert_encoder_lr_scaled(opt, model.encoder.parameters(), base_lr=base_lr, scale=scale)
        if scale == 0.0:
            counter = iter(range(100))
            assert_encoder_frozen_by_zero_lr(
                lambda: train_step(model, opt, task(next(counter))),
                model.encoder.parameters(), model.decoder.parameters(), steps=3)
    e5()


@_single_thread
def _check_e6(make: Callable[[], EvolvingContextConfig]) -> None:
    cfg = make()
    model = EvolvingContextModel(replace(cfg, d_model=_WIDTH))
    params = list(model.parameters())
    enc = list(model.encoder.parameters())

    @_profile_settings()
    @given(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
           enc_scale=st.sampled_from([0.0, 1e-4, 1.0, 1e4]),
           dec_scale=st.sampled_from([0.0, 1e-4, 1.0, 1e4]), data=st.data())
    def e6(dtype, enc_scale, dec_scale, data):
        z_prev = data.draw(_Z[dtype], label="z_prev").tensor()
        z_new = data.draw(_Z_LIKE[(*z_prev.shape[:2], dtype)], label="z_new").tensor()
        assert_context_diagnostics_match(model.context_diagnostics, z_prev, z_new)
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
        for p in params:  # random gradients, each side at its own scale (0 included)
            s = enc_scale if any(p is q for q in enc) else dec_scale
            p.grad = torch.randn(p.shape, generator=gen) * s
        assert_encoder_grad_share_valid(model.grad_norms()["encoder_grad_share"], enc, params)
    e6()


def _case(inv, variant, expected, subject, check, title):
    return Case(SYSTEM, inv, variant, expected, subject, check, title)


def cases() -> list[Case]:
    b = BROKEN
    return [
        _case("E1", "fixed", "holds", lambda: FIXED, _check_e1,
              "Fix 2: z = β·z_prev + (1-β)·z_raw for β in [0, 1]; carry detached"),
        _case("E1", "broken:unsmoothed_update", "caught", lambda: b["unsmoothed_update"],
              _check_e1, "the raw update returned, configured β not applied"),
        _case("E1", "broken:carry_keeps_graph", "caught", lambda: b["carry_keeps_graph"],
              _check_e1, "smoothed but the carry is not detached (the seed's .detach() dropped)"),
        _case("E2", "fixed", "holds", lambda: FIXED, _check_e2,
              "Fix 3: both sub-blocks are rms_norm(z + α·f(z)) for α in [0, 1]"),
        _case("E2", "broken:alpha_ignored", "caught", lambda: b["alpha_ignored"], _check_e2,
              "α = 1 used where α is configured"),
        _case("E3", "fixed", "holds", lambda: FIXED, _check_e3,
              "Fix 4: no gradient reaches z_prev through the attention query"),
        _case("E3", "broken:query_not_detached", "caught", lambda: b["query_not_detached"],
              _check_e3, "the previous context used as the query without detach"),
        _case("E4", "fixed", "holds", lambda: FIXED, _check_e4,
              "Fix 6: context rows mean 0, variance v/(v+eps), scales 1e-4..1e4"),
        _case("E4", "broken:no_normalisation", "caught", lambda: b["no_normalisation"],
              _check_e4, "the raw context reaches the decoder"),
        _case("E4", "claim:variance_one_any_scale", "refuted", lambda: FIXED, _check_e4_claim,
              "seed: variance 1 whatever the input scale (F.layer_norm eps=1e-5 at 1e-4 scale)"),
        _case("E5", "fixed", "holds", lambda: FIXED, _check_e5,
              "Fix 1/5: encoder lr = scale × base lr; scale 0 + AdamW(wd) keeps it bit-identical"),
        _case("E5", "broken:lr_scale_ignored", "caught", lambda: b["lr_scale_ignored"],
              _check_e5, "the encoder group gets the base lr"),
        _case("E6", "fixed", "holds", lambda: FIXED, _check_e6,
              "diagnostics match their definitions; grad share in [0, 1]"),
        _case("E6", "broken:pct_wrong_normaliser", "caught", lambda: b["pct_wrong_normaliser"],
              _check_e6, "pct divided by mean‖z_new‖ (teeth; not from the seed)"),
        _case("E6", "broken:share_over_decoder", "caught", lambda: b["share_over_decoder"],
              _check_e6, "share = ‖g_enc‖/‖g_dec‖ (teeth; not from the seed)"),
    ]
