"""Seed 002 data: the synthetic Q&A sources made in code, source balancing and the validation split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from reference_models.curriculum_lm.config import SOURCES, CurriculumLMConfig


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
