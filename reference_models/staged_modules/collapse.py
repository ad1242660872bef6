"""Golden pair for seed 001 — background collapse (staged modules + gradient checkpointing).

Seed: /work/shared/seeds/001_a86be66e4dc94afe.txt; SPEC "Seed 001" (S1-S6).

Task (seed: "predictions stay all-background"; issue 14: "on a task where background cannot
simply be copied from input to output"): 8x8 grids with 2-4 rectangles (1-3 x 1-3 cells,
colours 1-9) on background 0.  The output recolours every object by a fixed permutation
(c -> c mod 9 + 1), so copying the input gets every foreground cell wrong and a model that
predicts all background is right on ~83 % of the cells.  One support pair per sample is the
context (the seed's clue pairs, max_clues 6-7 there).

Model (seed "NEW (Current Main)" architecture, tiny): a context encoder over the support pair,
a solver step run 3 times (embed -> injector -> ConvGRU -> SolverCrossAttention), HyperLoRA
(per-sample rank-4 delta on the GRU candidate), and a 1x1 head whose background bias is
``bg_bias``.  The step is called like the seed's solver:
``checkpoint(step, x, h, ctx, use_reentrant=...)`` with ``h = None`` on the first step and the
HyperLoRA deltas, support tokens and context inside the dict ``ctx`` (seed "Gradient
Checkpointing Issues": "None values", "Dict arguments").
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from invariants import clamp_frobenius
from reference_models import data_parallel

__all__ = ["StagedGoldenConfig", "FIXED", "BROKEN", "ABLATIONS", "NOTE", "run",
           "check_fixed", "check_broken", "CANONICAL"]

NUM_COLORS = 10  # colour 0 is background (seed: ARC grids)


@dataclass(frozen=True)
class StagedGoldenConfig:
    # --- what the seed blames (the only fields FIXED and BROKEN differ in) ---
    module_start_epoch: int = 2      # seed "FIX IMPLEMENTED": hyperlora/solver_context/
                                     # cross_attention flags off during epochs 0-2 (ours: 0-1)
    bg_bias: float = 0.0             # seed "OLD (2a50f2d)": bg_bias 0.0 (NEUTRAL)
    use_ema: bool = True             # seed "OLD": use_ema true ("EMA Disabled" is blamed)
    use_reentrant: bool = False      # seed "Option B: Fix Gradient Checkpointing"
    # --- shared by both runs ---
    gradient_checkpointing: bool = True  # seed "NEW": gradient_checkpointing true
    ema_decay: float = 0.9           # ours: a short run needs a short EMA horizon
    grid: int = 8                    # ours: 8x8 grids (seed: ARC grids up to 30x30)
    hidden: int = 16                 # ours (seed: hidden_dim 256)
    solver_steps: int = 3            # ours (seed: num_solver_steps 6)
    lora_rank: int = 4               # ours (seed 000's HyperLoRA, tiny)
    lora_scaling: float = 0.1        # seed 000: ΔW = 0.1·A·B
    lora_max_norm: float = 1.0       # seed 000 §2.2: ‖ΔW‖F <= τ = 1.0 (both runs carry it)
    lr: float = 1e-2                 # ours (Adam)
    batch: int = 16                  # ours (seed: batch 55-75)
    epochs: int = 4                  # ours: ends 2 epochs after staging
    steps_per_epoch: int = 50        # ours
    eval_size: int = 256             # ours
    embed_scale: float = 5.0         # ours
    attn_out_scale: float = 0.3      # ours: attention output projections at 0.3 x default


FIXED = StagedGoldenConfig()
BROKEN = StagedGoldenConfig(module_start_epoch=0, bg_bias=-0.5, use_ema=False,
                            use_reentrant=True)  # seed "NEW (Current Main - BG COLLAPSE)"
ABLATIONS: dict[str, StagedGoldenConfig] = {
    "staging (module_start_epoch=2)": replace(BROKEN, module_start_epoch=2),
    "bg_bias=0.0": replace(BROKEN, bg_bias=0.0),
    "use_ema=True": replace(BROKEN, use_ema=True),
    "use_reentrant=False": replace(BROKEN, use_reentrant=False),
}

NOTE = (
    "Seed 001 blames four things for the all-background collapse: HyperLoRA, solver "
    "cross-attention and the cross-attention injector active from epoch 0 (its root cause), "
    "bg_bias -0.5, EMA off, and gradient checkpointing with None/dict arguments.  On a "
    "recolouring task (background is not a copy of the input) the broken run predicts "
    "background on every cell at every epoch to the end (background_collapse critical) while "
    "the fixed run learns the foreground.  The ablations show what collapses the run at this "
    "scale: restoring use_reentrant=False alone removes the collapse; staging, bg_bias 0 and "
    "EMA alone change nothing.  With torch.utils.checkpoint(use_reentrant=True) and no "
    "positional input that requires grad (x is a constant one-hot grid, h is None on the "
    "first step, the deltas and support tokens travel in a dict), torch only warns and the "
    "step's output does not require grad: every parameter before the head gets no gradient, "
    "and a head on frozen random features learns the class prior (background).  The seed's "
    "main claim (early-active random modules inject noise that collapses the base) is not "
    "what collapses this run: with gradients flowing, the modules active from epoch 0 learn "
    "as well as the staged ones.  The seed did list checkpointing as a suspect ('CRITICAL "
    "BUG ... Dict - NOT supported'); its snippet used use_reentrant=False, where this run "
    "does not collapse.")

CANONICAL = ("loss", "accuracy", "bg_fraction", "target_bg_fraction")


# ------------------------------------------------------------------------------ data
def make_grids(n: int, cfg: StagedGoldenConfig, gen: torch.Generator, device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) (n, G, G) long: 2-4 rectangles on background 0, recoloured."""
    g, k = cfg.grid, 4
    count = torch.randint(2, 5, (n, 1), generator=gen, device=device)         # (n, 1) 2..4
    hw = torch.randint(1, 4, (n, k, 2), generator=gen, device=device)         # (n, k, 2) 1..3
    u = torch.rand((n, k, 2), generator=gen, device=device)
    origin = (u * (g + 1 - hw).to(u.dtype)).long()                            # (n, k, 2)
    colour = torch.randint(1, NUM_COLORS, (n, k), generator=gen, device=device)  # (n, k)
    ar = torch.arange(g, device=device)
    rows = (ar >= origin[..., 0:1]) & (ar < (origin[..., 0] + hw[..., 0])[..., None])  # (n,k,G)
    cols = (ar >= origin[..., 1:2]) & (ar < (origin[..., 1] + hw[..., 1])[..., None])  # (n,k,G)
    mask = rows[..., :, None] & cols[..., None, :]                            # (n, k, G, G)
    mask &= (torch.arange(k, device=device) < count)[..., None, None]
    x = torch.zeros((n, g, g), dtype=torch.long, device=device)
    for i in range(k):  # later rectangles paint over earlier ones
        x = torch.where(mask[:, i], colour[:, i, None, None], x)
    y = torch.where(x > 0, x % (NUM_COLORS - 1) + 1, x)  # fixed derangement of colours 1..9
    return x, y


def make_batch(n: int, cfg: StagedGoldenConfig, gen: torch.Generator, device):
    """query input, query target, support (input, output): all (n, G, G) long."""
    x, y = make_grids(n, cfg, gen, device)
    sx, sy = make_grids(n, cfg, gen, device)
    return x, y, sx, sy


def onehot(x: torch.Tensor) -> torch.Tensor:
    return F.one_hot(x, NUM_COLORS).permute(0, 3, 1, 2).float()  # (n, C, G, G)


# ------------------------------------------------------------------------------ model
class Attention(nn.Module):
    """Single-head cross-attention with random Q/K/V/O (seed: 'Random projection')."""

    def __init__(self, d: int, out_scale: float):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        with torch.no_grad():
            self.o.weight.mul_(out_scale)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # x (B, N, D), kv (B, M, D) -> (B, N, D)
        att = self.q(x) @ self.k(kv).transpose(1, 2) / math.sqrt(x.shape[-1])
        return self.o(att.softmax(-1) @ self.v(kv))


class Solver(nn.Module):
    def __init__(self, cfg: StagedGoldenConfig):
        super().__init__()
        d, r, c = cfg.hidden, cfg.lora_rank, NUM_COLORS
        self.cfg = cfg
        self.ctx1 = nn.Conv2d(2 * c, d, 3, padding=1)       # support (input, output) pair
        self.ctx2 = nn.Conv2d(d, d, 3, padding=1)
        self.embed = nn.Conv2d(c, d, 3, padding=1)
        with torch.no_grad():   # ours: unit-scale colour features (an embedding's N(0, 1))
            self.embed.weight.mul_(cfg.embed_scale)
        self.film = nn.Linear(d, 2 * d)                     # FiLM fallback, identity init (S3)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.injector = Attention(d, cfg.attn_out_scale)                        # CrossAttentionInjector
        self.gates = nn.Conv2d(2 * d, 2 * d, 3, padding=1)  # ConvGRU z, r
        self.cand = nn.Conv2d(2 * d, d, 3, padding=1)       # ConvGRU candidate
        self.solver_attn = Attention(d, cfg.attn_out_scale)                     # SolverCrossAttention
        self.hyper = nn.Linear(d, 2 * d * r)                # HyperLoRA: context -> A, B
        self.head = nn.Conv2d(d, c, 1)
        with torch.no_grad():
            self.head.bias[0] = cfg.bg_bias                 # seed: bg_bias on background

    def step(self, x: torch.Tensor, h: torch.Tensor | None, ctx: dict) -> torch.Tensor:
        """One solver step (the function the seed checkpoints); h is None on the first."""
        n, _, g, _ = x.shape
        e = self.embed(x)                                                # (n, D, G, G)
        flat = e.flatten(2).transpose(1, 2)                              # (n, GG, D)
        gm1, beta = self.film(ctx["context"]).chunk(2, -1)               # (n, D) each
        film = (1 + gm1)[:, None] * flat + beta[:, None]                 # FiLM: gamma*x + beta
        if ctx["active"]:        # CrossAttentionInjector: "features + attn @ V" (on FiLM)
            flat = film + self.injector(flat, ctx["tokens"])
        else:                    # the FiLM fallback alone
            flat = film
        e = flat.transpose(1, 2).reshape(n, -1, g, g)
        if h is None:
            h = torch.zeros_like(e)
        z, r = torch.sigmoid(self.gates(torch.cat([e, h], 1))).chunk(2, 1)
        pre = self.cand(torch.cat([e, r * h], 1))                        # (n, D, G, G)
        if ctx["active"]:        # HyperLoRA delta on the candidate: e . A . B per sample
            low = torch.bmm(e.flatten(2).transpose(1, 2), ctx["lora_delta"])  # (n, GG, D)
            pre = pre + low.transpose(1, 2).reshape_as(pre)
        h = (1 - z) * h + z * torch.tanh(pre)
        if ctx["active"]:        # SolverCrossAttention to the support tokens
            hf = h.flatten(2).transpose(1, 2)
            h = (hf + self.solver_attn(hf, ctx["tokens"])).transpose(1, 2).reshape_as(h)
        return h

    def forward(self, x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, active: bool
                ) -> torch.Tensor:
        cfg = self.cfg
        d, r = cfg.hidden, cfg.lora_rank
        s = F.relu(self.ctx1(torch.cat([onehot(sx), onehot(sy)], 1)))
        tokens = self.ctx2(s).flatten(2).transpose(1, 2)                 # (n, GG, D)
        context = tokens.mean(1)                                         # (n, D)
        ctx = {"active": active, "tokens": tokens, "context": context}
        if active:
            ab = self.hyper(context)                                     # (n, 2·D·r)
            delta = cfg.lora_scaling * torch.bmm(ab[:, :d * r].view(-1, d, r),
                                                 ab[:, d * r:].view(-1, r, d))  # (n, D, D)
            ctx["lora_delta"] = clamp_frobenius(delta, cfg.lora_max_norm)  # seed 000 §2.2
        xo = onehot(x)           # a constant: requires_grad False (the seed's first step)
        h = None
        for _ in range(cfg.solver_steps):
            if cfg.gradient_checkpointing:
                h = checkpoint(self.step, xo, h, ctx, use_reentrant=cfg.use_reentrant)
            else:
                h = self.step(xo, h, ctx)
        return self.head(h)                                              # (n, C, G, G)


# ------------------------------------------------------------------------------ run
def run(cfg: StagedGoldenConfig, seed: int, device: torch.device | str = "cpu"
        ) -> dict[str, tuple[list, list]]:
    """Train ``cfg`` for ``cfg.epochs`` epochs; curves per epoch (step = epoch index).

    Model, data and generators live on ``device``; the caller's global RNG is untouched.
    Under a process group (``data_parallel.active()``, world size 2 golden runs) every rank
    draws the same full batch, trains on its rows through DDP and logs the full batch's
    loss (``data_parallel.gather``); the held-out evaluation runs replicated on every rank.
    """
    device = torch.device(device)
    distributed = data_parallel.active()   # DDP over the batch; else the single-process code
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)                  # built on `device` (no CPU detour)
        model = Solver(cfg)
        eval_model = Solver(cfg) if cfg.use_ema else model
    ema = [p.detach().clone() for p in model.parameters()] if cfg.use_ema else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # the staged modules (injector, solver attention, HyperLoRA) are unused before
    # module_start_epoch, and use_reentrant=True leaves every module before the head
    # without a gradient: DDP must look for unused parameters
    train_model = data_parallel.wrap(model, find_unused_parameters=True) if distributed \
        else model
    data_gen = torch.Generator(device=device).manual_seed(10_000 + seed)
    eval_gen = torch.Generator(device=device).manual_seed(20_000 + seed)
    ex, ey, esx, esy = make_batch(cfg.eval_size, cfg, eval_gen, device)
    fg = ey != 0
    rec = {k: [] for k in ("loss", "accuracy", "bg_fraction", "target_bg_fraction",
                           "fg_recall")}
    with warnings.catch_warnings():
        # use_reentrant=True: "None of the inputs have requires_grad=True. Gradients will be
        # None" - the seed's silent failure; pinned by the project's S4 checks, muted here
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
        for epoch in range(cfg.epochs):
            active = epoch >= cfg.module_start_epoch
            model.train()
            losses = []
            for _ in range(cfg.steps_per_epoch):
                x, y, sx, sy = make_batch(cfg.batch, cfg, data_gen, device)
                if distributed:          # every rank drew the full batch: keep its rows
                    x, y, sx, sy = data_parallel.shard(x, y, sx, sy)
                logits = train_model(x, sx, sy, active)                  # (n, C, G, G)
                loss = F.cross_entropy(logits, y)                        # equal shards
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if distributed:          # the FULL batch's loss, same formula
                    with torch.no_grad():
                        loss = F.cross_entropy(*data_parallel.gather_rows(logits, y,
                                                                          full=cfg.batch))
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()],
                                             1.0 - cfg.ema_decay)
                losses.append(loss.detach())
            if ema is not None:      # evaluate on the EMA weights (seed: use_ema)
                with torch.no_grad():
                    for p, q in zip(eval_model.parameters(), ema):
                        p.copy_(q)
            eval_model.eval()
            with torch.no_grad():
                pred = eval_model(ex, esx, esy, active).argmax(1)        # (n, G, G)
            rec["loss"].append(torch.stack(losses).mean())
            rec["accuracy"].append((pred == ey).double().mean())
            rec["bg_fraction"].append((pred == 0).double().mean())
            rec["target_bg_fraction"].append((ey == 0).double().mean())
            rec["fg_recall"].append((pred == ey)[fg].double().mean())
    steps = list(range(cfg.epochs))
    return {k: (steps, [float(v) for v in torch.stack(vals).double().cpu().tolist()])
            for k, vals in rec.items()}


# ------------------------------------------------------------------------------ checks
def check_fixed(curves: dict) -> None:
    """The fixed run learns the foreground: predicted background approaches the target."""
    bg, tgt = curves["bg_fraction"][1], curves["target_bg_fraction"][1]
    recall = curves["fg_recall"][1]
    worst = max(bg)
    assert worst < 0.99, (f"fixed: expected predicted background < 0.99 at every epoch "
                          f"(targets {tgt[-1]:.3f}); observed max {worst:.3f} ({bg})")
    gap = abs(bg[-1] - tgt[-1])
    assert gap <= 0.02, (f"fixed: expected final predicted background within 0.02 of the "
                         f"target {tgt[-1]:.3f}; observed {bg[-1]:.3f}")
    assert recall[-1] >= 0.9, (f"fixed: expected final foreground recall >= 0.9; observed "
                               f"{recall[-1]:.3f}")


def check_broken(curves: dict) -> None:
    """The seed's downstream collapse: all-background predictions that persist to the end."""
    bg, tgt = curves["bg_fraction"][1], curves["target_bg_fraction"][1]
    recall = curves["fg_recall"][1]
    assert min(bg) >= 0.99, (f"broken: expected predicted background >= 0.99 at every epoch "
                             f"to the end while targets are {tgt[-1]:.3f} background; "
                             f"observed {bg}")
    assert max(recall) <= 0.05, (f"broken: expected foreground recall <= 0.05 at every epoch "
                                 f"(all background); observed {recall}")
