"""Seed 002 cases: P1-P9 on the fixed config and on each broken variant, for the catalog.
"""
from __future__ import annotations

from functools import partial

from dataclasses import replace
from typing import Callable

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from invariants import (
    Case,
    assert_best_checkpoint_tracks_minimum,
    assert_curriculum_progresses,
    assert_early_stopping_follows_patience,
    assert_gradients_clipped,
    assert_grokfast_filter_exact,
    assert_lr_schedule_warmup_cosine,
    assert_sources_balanced,
    assert_stage_boundary_keeps_optimizer_state,
    assert_validation_split_sound,
    gradient_sets,
    lr_schedule_configs,
    seeded,
    split_sizes,
    val_loss_sequences,
)
from reference_models.curriculum_lm.config import (
    FIXED,
    SOURCES,
    SYSTEM,
    CurriculumLMConfig,
)
from reference_models.curriculum_lm.data import (
    balance_sources,
    build_data,
    split_train_val,
    split_val_from_train,
)
from reference_models.curriculum_lm.pipeline import (
    GrokfastAdamW,
    enter_stage,
    make_clipper,
    make_optimizer,
    make_scheduler,
    make_stopper,
    make_tracker,
    schedule_for,
)


# ------------------------------------------------------------------ the cases
def _check_p1(make: Callable[[], CurriculumLMConfig]) -> None:
    cfg = make()
    with seeded(0):
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


_case = partial(Case, SYSTEM)  # (inv, variant, expected, subject, check, title)


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
