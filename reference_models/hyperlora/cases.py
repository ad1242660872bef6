"""Seed 000 cases: H1-H7 on the fixed config and on each broken variant, for the catalog.
"""
from __future__ import annotations

from functools import partial

from dataclasses import replace
from typing import Callable

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from invariants import (
    Case,
    assert_clamp_identity_below_cap,
    assert_clamp_preserves_direction,
    assert_delta_norms_bounded,
    assert_gradient_reaches_predictor,
    assert_lora_decay_term,
    assert_norm_governor_acts,
    assert_param_group_lrs,
    assert_predictor_deltas_bounded,
    frobenius_norms,
    hyperlora_contexts,
    lora_norm_series,
    one_thread,
    values_around,
    weight_deltas,
)
from reference_models.hyperlora.config import (
    BROKEN,
    FIXED,
    OLD_CAP,
    SEED_CLAMP,
    SYSTEM,
    HyperLoRAConfig,
    governor_for,
)
from reference_models.hyperlora.model import (
    CLAMPS,
    HyperLoRA,
    build_solver,
    lora_decay_term,
    param_groups,
)

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


def _clamp_property(assertion: Callable[..., object]) -> Callable[..., None]:
    """H2/H3: ``assertion(clamp, ΔW, max_norm=1.0)`` over drawn ΔW for the case's clamp."""
    def check(make: Callable[[], HyperLoRAConfig]) -> None:
        clamp = CLAMPS[make().clamp_mode]

        @given(delta=weight_deltas())
        def clamp_property(delta):
            assertion(clamp, delta, max_norm=1.0)
        with one_thread():
            clamp_property()
    return check


_check_h2 = _clamp_property(assert_clamp_identity_below_cap)
_check_h3 = _clamp_property(assert_clamp_preserves_direction)


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


_case = partial(Case, SYSTEM)  # (inv, variant, expected, subject, check, title)


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
