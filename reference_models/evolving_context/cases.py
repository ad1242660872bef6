"""Seed 004 cases: E1-E6 on the fixed config and on each broken variant, for the catalog.
"""
from __future__ import annotations

from functools import partial

import functools
from dataclasses import replace
from typing import Any, Callable

import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from invariants import (
    Case,
    assert_context_diagnostics_match,
    assert_context_rows_normalized,
    assert_context_update_smoothed,
    assert_encoder_frozen_by_zero_lr,
    assert_encoder_grad_share_valid,
    assert_encoder_lr_scaled,
    assert_query_gradient_blocked,
    assert_residual_scaled,
    context_specs,
    lr_scales,
    one_thread,
    seeded,
    unit_fractions,
)
from reference_models.evolving_context.config import (
    BROKEN,
    FIXED,
    SYSTEM,
    EvolvingContextConfig,
)
from reference_models.evolving_context.model import ContextEncoder, EvolvingContextModel
from reference_models.evolving_context.train import build, make_task, train_step

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
    with seeded(seed):
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


_case = partial(Case, SYSTEM)  # (inv, variant, expected, subject, check, title)


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
