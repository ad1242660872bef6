"""Seed 002 golden pair: curriculum-transition divergence and `::::` mode collapse.

A char-level post-LayerNorm GPT trained on synthetic key:value text with a
3-stage curriculum (stage 3 = stage 2, the seed's "ADVANCED uses the same
datasets as REASONING").  FIXED and BROKEN differ only in the settings
the seed blames (002 "Solutions"): LR schedule (constant 0.01 vs 5 % warm-up +
cosine from 0.005), gradient clipping (none vs 1.0), Grokfast lambda, early
stopping (none vs patience 3, min_delta 0.01) and the abrupt stage switch (vs a
60-step ramp of the new data, "Curriculum Redesign").
The `sample` metric is the greedy next character after each of 32 held-out prompts
(v2; v1 used 16-character greedy answers to 12 prompts, which never met mode_collapse).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from invariants.distributed import agree_across_ranks
from reference_models import data_parallel


# ------------------------------------------------------------------------ config
@dataclass(frozen=True)
class CurriculumGoldenConfig:
    # curriculum (seed 002 "Curriculum Plan": stages at epochs 1-3, 4-6, 7-10; stage 2 adds
    # sources, +103 % data; stage 3 = stage 2)
    epochs: int = 10
    stage_epochs: tuple[int, ...] = (1, 4, 7)   # first epoch of each stage (1-based)
    steps_per_epoch: int = 30          # ours: CPU budget (<= 15 s a run)
    stage1_lines: int = 3000
    stage2_lines: int = 6000                    # seed: 10,798 -> 21,917 samples (x2)
    val_fraction: float = 0.2                   # seed fix 5: "20% of training data"
    # model: tiny char GPT (the seed's model was a 25M-parameter LM; CPU budget here)
    d_model: int = 48
    n_layers: int = 2
    n_heads: int = 4
    context: int = 32
    batch_size: int = 16                        # seed "Batch Size Optimization": 4 -> 8/16+
    weight_decay: float = 0.01
    # decoding for the `sample` metric (seed 002 "Test Results": greedy, deterministic)
    sample_every: int = 10                      # steps between samples (ours)
    sample_from_epoch: int = 3                  # ours: the epoch 1-2 model still answers near-unigram
    # ---- what the seed blames (002 "Solutions"; FIXED values by default) ----
    lr: float = 0.005               # seed: muon_lr 0.01 -> 0.005
    lr_schedule: str = "warmup_cosine"  # seed: "Add Learning Rate Decay" + "Warmup Schedule"
    warmup_fraction: float = 0.05   # seed: "First 500 steps: lr = 0 -> target_lr (linear)"
    eta_min: float = 1e-6           # seed: CosineAnnealingLR(..., eta_min=1e-6)
    clip_max_norm: float | None = 1.0   # seed: clip_grad_norm_(..., max_norm=1.0)
    grokfast_alpha: float = 0.98    # Grokfast-EMA default momentum (Lee et al. 2024)
    grokfast_lambda: float = 0.02   # seed: grokfast_lambda 0.05 -> 0.02 ("gentler")
    early_stopping: bool = True     # seed fix 4: "not improved for 3 epochs"
    patience: int = 3               # seed: self.patience = 3
    min_delta: float = 0.01         # seed: self.min_delta = 0.01
    # seed 002 "Long-Term Fix 2, Curriculum Redesign": "No abrupt dataset additions". Over the
    # first `stage_ramp_steps` steps of a stage that brings new data, each batch row is drawn
    # from the new stage's text with probability (k + 1) / stage_ramp_steps at its k-th step,
    # else from the previous stage's; 0 = the seed's abrupt switch (+103 % data at once)
    stage_ramp_steps: int = 60


FIXED = CurriculumGoldenConfig()
BROKEN = CurriculumGoldenConfig(
    lr=0.01, lr_schedule="constant",   # seed: "Muon lr=0.01", "No learning rate decay schedule"
    clip_max_norm=None,                # seed: no gradient clipping
    grokfast_lambda=10.0,              # seed: 0.05 ("TOO AGGRESSIVE"); stressed x200, see NOTE
    early_stopping=False,              # seed: "No Early Stopping"
    stage_ramp_steps=0)                # seed: the new datasets arrive at once ("+103 %")

ABLATIONS: dict[str, CurriculumGoldenConfig] = {
    "lr_schedule": replace(BROKEN, lr=FIXED.lr, lr_schedule=FIXED.lr_schedule),
    "clipping": replace(BROKEN, clip_max_norm=FIXED.clip_max_norm),
    "grokfast_lambda": replace(BROKEN, grokfast_lambda=FIXED.grokfast_lambda),
    "early_stopping": replace(BROKEN, early_stopping=FIXED.early_stopping),
    "stage_ramp": replace(BROKEN, stage_ramp_steps=FIXED.stage_ramp_steps),
}

NOTE = (
    "Seed 002: the LM's loss rose after the curriculum stage change and its outputs collapsed "
    "to '::::' regardless of input (seed 002 'Executive Summary', 'Epoch 7', 'Test Results'). "
    "Here a 2-layer post-LN char GPT (d 48) learns key:value text; stage 2 (epoch 4) doubles "
    "the data with longer lines of the same formats (3-term sums, records with a pal field; "
    "seed 'Curriculum Redesign'), stage 3 repeats stage 2 (the seed's bug, kept in both runs). "
    "BROKEN uses the seed's constant LR 0.01, no clipping, no early stopping and a Grokfast "
    "lambda of 10: the seed's own 0.05 (and 5, which the probes used) does not break this "
    "model; the stress is a lambda 200x the seed's. The loss then rises within the first "
    "stage-2 epoch (at the stage 1->2 change, not 2->3 as in the seed, because stage 3 brings "
    "no new data) and never recovers (epoch loss 3.3-3.8, above the unigram entropy 3.2). The "
    "`sample` is the greedy next character after each of 32 held-out prompts (one unit per "
    "prompt, every 10 steps from epoch 3): the fixed model gives 10-16 distinct answers, the "
    "broken one after the change gives the same 1-3 characters to every prompt (':', '|', 'm' "
    "or a digit depending on seed and step: the over-amplified Grokfast EMA makes the model "
    "hop between single-character modes rather than settle on ':'), which the default "
    "mode_collapse rule (distinct-1 <= 0.1) flags on seeds 0-4. FIXED also brings the "
    "stage-2 data in over 60 steps (seed 'Curriculum Redesign': 'No abrupt dataset "
    "additions'): with the abrupt switch the fixed settings' loss still jumps 0.92 -> 1.6 at "
    "step 91 and recovers within ~25 steps, a recovered divergence warning; a 30-step ramp "
    "still leaves that warning on seed 0 (step 106, recovered at 121), 60 steps none on seeds "
    "0-4. Ablation (seeds 0-4; collapse = critical divergence and mode_collapse): lambda "
    "0.02 alone removes the collapse (0/5); warm-up + cosine alone removes the mode collapse "
    "but leaves a critical loss divergence (5/5); clipping alone changes nothing (5/5); "
    "early stopping alone ends the run at epoch 4-6, after the divergence is already "
    "critical and before the answers collapse; the stage ramp alone changes nothing (5/5): "
    "the abrupt data addition is where the broken run's rise shows, not what breaks it.")


# -------------------------------------------------------------------------- data
NAMES = ("ann", "bob", "max", "eve", "joe", "sam", "tim", "zoe", "kim", "lee", "ray", "amy")


PALS = {n: NAMES[(i + 5) % len(NAMES)] for i, n in enumerate(NAMES)}  # fixed pairing


def _line(kind: str, rng: np.random.Generator) -> str:
    name = NAMES[rng.integers(len(NAMES))]
    if kind == "sum":                       # stage 1: arithmetic Q&A (gsm8k / svamp)
        a, b = rng.integers(0, 10, 2)
        return f"Q:{a}+{b}?A:{a + b}"
    if kind == "record":                    # stage 1: structured record (mbpp / arc_easy)
        return f"name:{name};age:{rng.integers(10, 100)};id:{rng.integers(100, 1000)}"
    if kind == "sum3":                      # stage 2: longer arithmetic (arc_challenge)
        a, b, c = rng.integers(0, 10, 3)
        return f"Q:{a}+{b}+{c}?A:{a + b + c}"
    if kind == "record+":                   # stage 2: longer record (hellaswag)
        return (f"name:{name};age:{rng.integers(10, 100)};id:{rng.integers(100, 1000)}"
                f";pal:{PALS[name]}")
    raise ValueError(kind)


STAGE_KINDS = (("sum", "record"), ("sum", "record", "sum3", "record+"))
VOCAB = "\n" + "".join(sorted(set("0123456789:;?+=*_" + "QA" + "nameagidpl"
                                  + "".join(NAMES))))
STOI = {c: i for i, c in enumerate(VOCAB)}


def _stage_texts(cfg: CurriculumGoldenConfig, rng: np.random.Generator):
    """Per stage (train text, val text); stage 3 = stage 2 (the seed's curriculum)."""
    out = []
    for kinds, n in zip(STAGE_KINDS, (cfg.stage1_lines, cfg.stage2_lines)):
        lines = [_line(kinds[i % len(kinds)], rng) for i in range(n)]
        order = rng.permutation(n)
        lines = [lines[i] for i in order]
        k = round(cfg.val_fraction * n)
        out.append(("\n".join(lines[k:]) + "\n", "\n".join(lines[:k]) + "\n"))
    out.append(out[-1])
    return out


# Held-out probe prompts for the `sample` metric.  Each stops where the next character is
# fixed by the format (or a digit / name the model must pick), and consecutive prompts
# expect different characters, so a healthy model answers them with many distinct
# characters and never the same one three times in a row.
PROMPTS = (
    "Q:3+4?A", "name:bob;ag", "Q:8+1?A:", "nam", "Q:1+2+6?", "name:joe;age:2", "Q:3",
    "name:kim;age:52;i", "Q:5+0+2?A:", "name:bob;age:41;id", "Q:2+2?A:4",
    "name:ann;age:40;id:1", "Q:3+4", "name:zo", "Q:6+", "name:max;age:71;id:350;pal:",
    "Q:4+4+4?", "name:sam;age:", "na", "Q:1+1?A:2", "Q:9+9+", "name:bob;a", "Q:0",
    "Q:7+2?A:", "name:ki", "Q:6+3?A", "Q:2+8+3?A:", "name:ma", "name:eve;age:18;id:233;p",
    "Q:5+5?A:", "name:ray;age:33;id:417;pa", "name:am")


def _encode(text: str, device) -> torch.Tensor:
    return torch.tensor([STOI[c] for c in text], dtype=torch.long, device=device)


# ------------------------------------------------------------------------- model
class Block(nn.Module):
    """Post-LN transformer block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = self.ln1(x + self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.mlp(x))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, cfg: CurriculumGoldenConfig):
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


# --------------------------------------------------------------------- training
def lr_at(cfg: CurriculumGoldenConfig, step: int, total: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = max(1, int(cfg.warmup_fraction * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - 1 - warm))
    return cfg.eta_min + (cfg.lr - cfg.eta_min) * 0.5 * (1.0 + math.cos(math.pi * p))


def _batch(data: torch.Tensor, cfg, gen) -> torch.Tensor:
    start = torch.randint(0, data.numel() - cfg.context - 1, (cfg.batch_size,),
                          generator=gen, device=data.device)
    return data[start[:, None] + torch.arange(cfg.context + 1, device=data.device)]


def _ramped_batch(new: torch.Tensor, old: torch.Tensor, k: int, cfg, gen) -> torch.Tensor:
    """Step ``k`` of a stage ramp: each row from ``new`` with probability (k+1)/ramp, else
    from ``old`` (seed 002 "Curriculum Redesign": no abrupt dataset additions)."""
    a, b = _batch(new, cfg, gen), _batch(old, cfg, gen)
    take = torch.rand((cfg.batch_size, 1), generator=gen, device=new.device)
    return torch.where(take < (k + 1) / cfg.stage_ramp_steps, a, b)


@torch.no_grad()
def _val_loss(model, data: torch.Tensor, cfg) -> torch.Tensor:
    n = (data.numel() - 1) // cfg.context
    x = data[: n * cfg.context].view(n, cfg.context)
    y = data[1: n * cfg.context + 1].view(n, cfg.context)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def greedy_next(model, prompts: torch.Tensor, cfg) -> torch.Tensor:
    """Greedy next character (vocabulary index, on the device) after each prompt row."""
    return model(prompts[:, -cfg.context:])[:, -1].argmax(-1)


def sample_text(indices: list[int]) -> str:
    """The `sample` metric: the greedy answers to the held-out prompts, joined by spaces,
    one whitespace unit per prompt (end of line shown as "|").  A model that gives the same
    answer regardless of input (the seed's "only colons") has distinct-1 = 1/32; the
    detector's mode_collapse (distinct-1 <= 0.1) means at most 3 distinct answers to 32
    different prompts."""
    return " ".join(VOCAB[i].replace("\n", "|") for i in indices)


def run(cfg: CurriculumGoldenConfig, seed: int, device: torch.device | str = "cpu",
        _hook=None) -> dict[str, tuple[list, list]]:
    """Train the curriculum; ``loss``/``grad_norm``/``lr`` per step, ``val_loss`` per epoch,
    ``sample`` every ``sample_every`` steps from ``sample_from_epoch``.

    Under a process group (``data_parallel.active()``, world size 2 golden runs) every rank
    draws the same full batch, trains on its rows through DDP and logs the full batch's loss
    (``data_parallel.gather``); the gradient norm is read after DDP's all-reduce, and the
    val loss and the samples run replicated on every rank.
    """
    device = torch.device(device)
    distributed = data_parallel.active()   # DDP over the batch; else the single-process code
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)   # model init only; the caller's RNG is restored on exit
        rng = np.random.default_rng(seed)
        texts = _stage_texts(cfg, rng)
        data = [(_encode(tr, device), _encode(va, device)) for tr, va in texts]
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.device(device):          # parameters are created on the device given
            model = CharGPT(len(VOCAB), cfg)
        train_model = data_parallel.wrap(model) if distributed else model
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        emas = [torch.zeros_like(p) for p in params]
        total = cfg.epochs * cfg.steps_per_epoch
        losses, norms, lrs, ev_steps, vals, samples, sample_steps = [], [], [], [], [], [], []
        best, bad, step = math.inf, 0, 0
        stage_step, new_data = 0, False       # steps into the current stage; new data?
        width = max(len(p) for p in PROMPTS)
        prompts = torch.stack([_encode("\n" * (width - len(p)) + p, device) for p in PROMPTS])
        for epoch in range(1, cfg.epochs + 1):
            stage = sum(epoch >= s for s in cfg.stage_epochs) - 1
            train, val = data[stage]
            if epoch in cfg.stage_epochs and stage > 0:   # a stage begins here
                stage_step, new_data = 0, texts[stage] is not texts[stage - 1]
            model.train()
            for _ in range(cfg.steps_per_epoch):
                if stage > 0 and new_data and stage_step < cfg.stage_ramp_steps:
                    xy = _ramped_batch(train, data[stage - 1][0], stage_step, cfg, gen)
                else:
                    xy = _batch(train, cfg, gen)
                stage_step += 1
                if _hook is not None:
                    _hook(model, xy)
                if distributed:          # every rank drew the full batch: keep its rows
                    xy, = data_parallel.shard(xy)
                logits = train_model(xy[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten())  # equal shards
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grads = [p.grad for p in params]                 # after DDP's all-reduce
                norm = torch.nn.utils.get_total_norm(grads)
                if cfg.clip_max_norm is not None:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_max_norm, norm)
                # Grokfast-EMA: ema <- a*ema + (1-a)*g ; g <- g + lambda*ema (ema_1 = g)
                if step == 0:
                    torch._foreach_copy_(emas, grads)
                else:
                    torch._foreach_lerp_(emas, grads, 1.0 - cfg.grokfast_alpha)
                torch._foreach_add_(grads, emas, alpha=cfg.grokfast_lambda)
                lr = lr_at(cfg, step, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()
                if distributed:          # the FULL batch's loss, same formula
                    with torch.no_grad():
                        full, logits = data_parallel.gather_rows(xy, logits,
                                                                 full=cfg.batch_size)
                        loss = F.cross_entropy(logits.flatten(0, 1), full[:, 1:].flatten())
                losses.append(loss.detach())
                norms.append(norm.detach())
                lrs.append(lr)
                step += 1
                # the first two epochs' model is still learning the format (near-unigram
                # answers, e.g. 'e e e' on fixed seed 4 at step 40): sample from epoch 3 on
                if epoch >= cfg.sample_from_epoch and step % cfg.sample_every == 0:
                    sample_steps.append(step)
                    samples.append(greedy_next(model, prompts, cfg))
            model.eval()
            v = float(_val_loss(model, val, cfg))
            ev_steps.append(step)
            vals.append(v)
            diverged = not math.isfinite(v) or not math.isfinite(float(losses[-1]))
            if distributed:              # stop on every rank or on none (else: a hang)
                diverged = agree_across_ranks(diverged)
            if diverged:
                break
            if v < best - cfg.min_delta:
                best, bad = v, 0
            else:
                bad += 1
                if cfg.early_stopping and bad >= cfg.patience:
                    break
    steps = list(range(1, step + 1))
    return {"loss": (steps, torch.stack(losses).tolist()),
            "grad_norm": (steps, torch.stack(norms).tolist()),
            "lr": (steps, lrs),
            "val_loss": (ev_steps, vals),
            "sample": (sample_steps, [sample_text(r) for r in torch.stack(samples).tolist()])}


# ------------------------------------------------------------------------ checks
def _epoch_means(curves, n: int) -> list[float]:
    x = curves["loss"][1]
    return [sum(x[i:i + n]) / len(x[i:i + n]) for i in range(0, len(x), n)]


def _stage2_first_step(cfg: CurriculumGoldenConfig = FIXED) -> int:
    return (cfg.stage_epochs[1] - 1) * cfg.steps_per_epoch


def check_broken(curves, cfg: CurriculumGoldenConfig = BROKEN) -> None:
    """Seed 002 downstream: the loss rises after the stage change and stays up, and the
    greedy answers collapse to (almost) one character regardless of the prompt."""
    ep = _epoch_means(curves, cfg.steps_per_epoch)
    k = cfg.stage_epochs[1] - 1                 # index of the first stage-2 epoch
    before, after = min(ep[:k]), ep[k:]
    assert max(after) > 1.2 * before and ep[-1] > 1.2 * before, (
        f"expected the epoch-mean training loss to rise > 20% above its stage-1 best "
        f"{before:.3f} after the stage change and stay there; observed epochs after: "
        f"{[round(v, 3) for v in after]}")
    vals = curves["val_loss"][1]
    assert vals[-1] > 1.2 * min(vals), (
        f"expected the final val_loss > 1.2 x its best {min(vals):.3f}; observed {vals[-1]:.3f}")
    s2 = _stage2_first_step(cfg)
    distinct = [(st, len(set(tx.split()))) for st, tx in zip(*curves["sample"]) if st > s2]
    assert any(d <= 3 for _, d in distinct), (
        f"expected some greedy sample after the stage change (step > {s2}) with <= 3 distinct "
        f"answers to the {len(PROMPTS)} prompts; observed distinct counts {distinct}")


def check_fixed(curves, cfg: CurriculumGoldenConfig = FIXED) -> None:
    """Clean: loss keeps falling across the stage change; answers stay prompt-dependent."""
    ep = _epoch_means(curves, cfg.steps_per_epoch)
    k = cfg.stage_epochs[1] - 1
    assert max(ep[k:]) < 1.2 * min(ep[:k]) and ep[-1] < min(ep[:k]), (
        f"expected every epoch after the stage change below 1.2 x the stage-1 best "
        f"{min(ep[:k]):.3f} and the last one below it; observed {[round(v, 3) for v in ep[k:]]}")
    vals = curves["val_loss"][1]
    assert vals[-1] <= min(vals) + 0.05, (
        f"expected the final val_loss within 0.05 of its best {min(vals):.3f}; observed {vals[-1]:.3f}")
    for step, text in zip(*curves["sample"]):
        units = text.split()
        assert len(set(units)) >= len(units) // 4, (
            f"expected at least a quarter of the {len(units)} greedy answers distinct at step "
            f"{step}; observed {len(set(units))}: {text!r}")
