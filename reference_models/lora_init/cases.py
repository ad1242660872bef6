"""Seed 003 cases: L1-L7 on the fixed config and on each broken option, for the catalog.
"""
from __future__ import annotations

from functools import partial

from dataclasses import replace
from typing import Callable

import torch
from hypothesis import given
from hypothesis import strategies as st

from invariants import Case, LoraConfig, dtypes, float_tensors, lora_configs
from invariants import (  # the LoRA family (SPEC L1-L7)
    assert_adapter_contribution_negligible, assert_adapter_delta_within_bound,
    assert_adapter_gradients_flow_at_init, assert_adapter_identity_at_init,
    assert_adapter_kl_zero, assert_merge_roundtrip, assert_scale_schedule_progressive)
from reference_models.lora_init.config import (
    BROKEN,
    FIXED,
    ORTHOGONAL_4C,
    SYSTEM,
    TINY_SCALE,
    LoraInitConfig,
)
from reference_models.lora_init.model import (
    TinyLM,
    TinyLMConfig,
    apply_lora,
    constant_scale_schedule,
    linear_scale_schedule,
    make_pair,
)


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


_case = partial(Case, SYSTEM)  # (inv, variant, expected, subject, check, title)


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
