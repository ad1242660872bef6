"""L1, L2, L6, L7 on real PEFT adapters over real transformers models (tiny, from configs, CPU).

Nothing is downloaded: GPT-2 is built from a GPT2Config, the single-layer model is an
nn.Linear, PEFT's LoraConfig chooses the init. Each correct PEFT behaviour must hold and each
injected fault must be caught with a hint that names its cause.
"""
import copy
import os
import warnings

import pytest
import torch
from torch import nn

from invariants import (InvalidArgumentError, InvariantViolation, assert_adapter_gradients_flow_at_init,
                        assert_adapter_identity_at_init, assert_adapter_kl_zero,
                        assert_merge_roundtrip, seeded)

try:
    import peft
    import transformers
except ImportError:  # the `real` extra; CI installs it through `test`
    if os.environ.get("CI"):
        raise
    pytest.skip("peft/transformers are not installed: pip install -e '.[real]'",
                allow_module_level=True)

transformers.logging.set_verbosity_error()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCAB = 97


class OneLayer(nn.Module):
    def __init__(self, d_in=64, d_out=48):
        super().__init__()
        self.q = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.q(x)


def _peft_layer(dtype, seed, init=False, r=8, alpha=16, d_in=64, d_out=48):
    """(base copy, PEFT LoRA layer) on one nn.Linear; init=False gives a random lora_B."""
    with seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = OneLayer(d_in, d_out).to(dtype)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            target_modules=["q"], r=r, lora_alpha=alpha, init_lora_weights=init))
    return base, model.base_model.model.q


def _gpt2(dtype=torch.float32, seed=0, dropout=0.1):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                     n_positions=32, resid_pdrop=dropout, embd_pdrop=dropout,
                                     attn_pdrop=dropout)
    with seeded(seed):
        return transformers.GPT2LMHeadModel(config).to(dtype)


def _peft_gpt2(init=True, lora_dropout=0.05, dtype=torch.float32, seed=0, dropout=0.1):
    model = _gpt2(dtype, seed, dropout)
    base = copy.deepcopy(model)
    with seeded(seed + 1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(model, peft.LoraConfig(
            target_modules=["c_attn"], r=8, lora_alpha=16, lora_dropout=lora_dropout,
            init_lora_weights=init, fan_in_fan_out=True))
    return base, adapted


def _tokens(seed=0, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _x(dtype, scale, seed, shape=(4, 64)):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


# ------------------------------------------------------------------ L6: PEFT's own merge
@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["x~1", "x~1e3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_peft_merge_holds(dtype, scale):
    """PEFT's merge rounds the weight; the bound from the summands covers it on every seed.
    (The former per-element rule, relative to |y|, failed every bf16/fp16 merge.)"""
    for seed in range(8):
        _, layer = _peft_layer(dtype, seed)
        assert_merge_roundtrip(layer, _x(dtype, scale, seed))


def _merge_twice(layer):  # the scale applied twice: the delta folded in two times
    layer.merge()
    layer.base_layer.weight.data += layer.get_delta_weight("default")


def _unmerge_twice(layer):
    layer.base_layer.weight.data -= layer.get_delta_weight("default")
    layer.unmerge()


def _mark_merged_only(layer):  # flags the adapter merged without folding its delta in
    layer.merged_adapters.append("default")


def _merge_without_scale(layer):
    layer.merge()
    delta = layer.get_delta_weight("default")
    layer.base_layer.weight.data -= delta - delta / layer.scaling["default"]


@pytest.mark.parametrize("merge, match", [
    (_merge_twice, r"base \+ 2(\.0*)?·adapter.*scale is applied 2 times"),
    (_merge_without_scale, r"base \+ 0\.5·adapter"),
    (_mark_merged_only, r"base \+ 0·adapter.*not folded in"),
], ids=["scale_twice", "scale_forgotten", "not_merged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrong_merge_is_caught_and_named(dtype, merge, match):
    _, layer = _peft_layer(dtype, seed=0)  # lora_alpha / r = 2: the scale
    with pytest.raises(InvariantViolation, match=rf"(?s)\[L6\].*merged vs unmerged.*{match}"):
        assert_merge_roundtrip(layer, _x(dtype, 1.0, 0), merge=merge,
                               unmerge=lambda layer: layer.unmerge())


def _unflag_only(layer):  # marks the adapter unmerged but leaves its delta in the weight
    layer.merged_adapters.clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unmerge_that_leaves_the_delta_is_caught(dtype):
    _, layer = _peft_layer(dtype, seed=1)
    with pytest.raises(InvariantViolation, match=r"(?s)merge then unmerge to restore.*"
                                                 r"hint: unmerge must subtract"):
        assert_merge_roundtrip(layer, _x(dtype, 1.0, 1), unmerge=_unflag_only)


# ---------------------------------------------- L1: a whole GPT-2 in train mode, with dropout
@pytest.mark.parametrize("lora_dropout", [0.0, 0.05])
def test_zero_init_on_gpt2_in_train_mode_holds(lora_dropout):
    """GPT-2 has its own dropout (0.1 everywhere); PEFT's default init has lora_B = 0. Both
    passes run from one RNG seed and lora_dropout draws off that stream: the identity holds."""
    base, adapted = _peft_gpt2(lora_dropout=lora_dropout)
    assert_adapter_identity_at_init(base, adapted, _tokens(), train=True)
    assert_adapter_identity_at_init(base, adapted, _tokens(), train=False)


def test_gpt2_train_mode_leaves_the_callers_rng_alone():
    base, adapted = _peft_gpt2()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    assert_adapter_identity_at_init(base, adapted, _tokens(), train=True)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_random_lora_b_on_gpt2_in_train_mode_is_caught_with_the_right_hint():
    base, adapted = _peft_gpt2(init=False)
    with pytest.raises(InvariantViolation) as info:
        assert_adapter_identity_at_init(base, adapted, _tokens(), train=True)
    text = str(info.value)
    assert "initialise lora_B (the up-projection) to zeros" in text
    assert "the base is stochastic and its dropout masks matched" in text
    assert "e+307" not in text and "e+30" not in text  # no relative difference against 0


class DrawsBeforeTheBase(nn.Module):
    """A wrapper that draws random numbers in its own forward, which is on the shared stream
    (the root matches the base's root), so the base's dropout masks shift in the second pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        torch.rand(7)
        return self.model(tokens)


def test_stochastic_base_with_misaligned_draws_is_undecidable_not_a_violation():
    base = _gpt2()
    adapted = DrawsBeforeTheBase(copy.deepcopy(base))
    with pytest.raises(InvalidArgumentError, match=r"train=True: undecidable.*base is "
                                                   r"stochastic.*Pass train=False"):
        assert_adapter_identity_at_init(base, adapted, _tokens(), train=True)
    assert_adapter_identity_at_init(base, adapted, _tokens(), train=False)


# ------------------------------------- L1: inits that are the identity only up to rounding
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_rounding_inits_hold_with_exact_false_and_get_the_rounding_hint(init, dtype):
    for seed in range(4):
        base, layer = _peft_layer(dtype, seed, init=init, alpha=16 if seed % 2 else 64)
        x = _x(dtype, 1.0 if seed < 2 else 1e3, seed)
        assert_adapter_identity_at_init(base, layer, x, train=False, exact=False)
        assert_adapter_identity_at_init(base, layer, x, train=True, exact=False)
    with pytest.raises(InvariantViolation, match=r"(?s)exactly.*hint: the difference is "
                                                 r"rounding-sized.*pass exact=False"):
        assert_adapter_identity_at_init(base, layer, x, train=False)


def test_plain_zero_init_is_exact_in_every_dtype():
    for dtype in DTYPES:
        base, layer = _peft_layer(dtype, 0, init=True)
        assert_adapter_identity_at_init(base, layer, _x(dtype, 1e3, 0), train=True, exact=True)


def test_pissa_on_gpt2_holds_up_to_rounding():
    model = _gpt2(dropout=0.0)
    base = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(model, peft.LoraConfig(
            target_modules=["c_attn", "c_proj"], r=8, lora_alpha=16, init_lora_weights="pissa",
            fan_in_fan_out=True))
    assert_adapter_identity_at_init(base, adapted, _tokens(), train=False, exact=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_b_is_beyond_rounding_even_with_exact_false(dtype):
    base, layer = _peft_layer(dtype, 0, init=False)
    with pytest.raises(InvariantViolation, match=r"(?s)within rounding.*rounding bound.*"
                                                 r"hint: beyond rounding: lora_B is not zero"):
        assert_adapter_identity_at_init(base, layer, _x(dtype, 1.0, 0), exact=False)


# ----------------------------------------------------------------------- L2 and L7
def test_kl_zero_on_gpt2_and_caught_with_random_b():
    base, adapted = _peft_gpt2()
    assert_adapter_kl_zero(base, adapted, _tokens())
    base, adapted = _peft_gpt2(init=False)
    with pytest.raises(InvariantViolation, match=r"(?s)\[L2\].*max KL"):
        assert_adapter_kl_zero(base, adapted, _tokens())


def test_gradients_flow_through_a_peft_layer():
    _, layer = _peft_layer(torch.float32, 0, init=True)
    assert_adapter_gradients_flow_at_init(layer, _x(torch.float32, 1.0, 0),
                                          lora_A=layer.lora_A["default"].weight,
                                          lora_B=layer.lora_B["default"].weight)
    _, layer = _peft_layer(torch.float32, 0, init=False)
    with pytest.raises(InvariantViolation, match=r"dL/dA == 0 exactly"):
        assert_adapter_gradients_flow_at_init(layer, _x(torch.float32, 1.0, 0),
                                              lora_A=layer.lora_A["default"].weight,
                                              lora_B=layer.lora_B["default"].weight)
