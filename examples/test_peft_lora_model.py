"""A model team's own tests for a PEFT LoRA model, written with the harness's public checks.

Copy this file next to your model code, replace ``build_base`` and ``LORA`` with yours, and
run it with ``pytest examples/`` (or your own test path).  It needs ``peft`` and
``transformers`` (``pip install peft 'stability-invariants[hf]'``); nothing is downloaded:
the base model is a tiny GPT-2 built from a config.

What it pins down (SPEC seed 003 and 001, docs/lora_init.md, docs/staged_modules.md):

- L1/L2: the freshly wrapped model *is* the base model: every LoRA layer reproduces its
  base layer bit for bit with adapter dropout on, and the next-token distributions are
  identical (KL = 0 at every position);
- L7: at init the gradient reaches lora_B (learning can start) and not lora_A;
- L3/L6, after a few training steps: each layer's change stays within
  scale·‖B‖·‖A‖·‖x‖, and merging the adapter into the weights (per layer and for the whole
  model, PEFT's ``merge_adapter``) changes no output beyond float32 rounding, and
  unmerging restores it;
- S4: gradient checkpointing, switched on the way the HF Trainer does it, gives the
  LoRA parameters the same gradients as a plain run.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from invariants import (
    assert_adapter_delta_within_bound,
    assert_adapter_gradients_flow_at_init,
    assert_adapter_identity_at_init,
    assert_adapter_kl_zero,
    assert_checkpoint_gradient_equivalent,
    assert_merge_roundtrip,
    float_tensors,
)

peft = pytest.importorskip("peft", reason="the example needs peft (pip install peft)")
transformers = pytest.importorskip(
    "transformers", reason="the example needs transformers (pip install 'stability-invariants[hf]')")

# --------------------------------------------------------------------------- your model
WIDTH = 32
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True)  # GPT-2's Conv1D stores weights as (in, out)


def build_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=64,
                                     n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def build(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(an untouched copy of the base model, the PEFT model wrapping the base)."""
    base = build_base(seed)
    reference = copy.deepcopy(base)          # get_peft_model edits the base in place
    adapted = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    return reference, adapted


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


class Logits(nn.Module):
    """The checks compare tensors: expose a causal LM as token ids -> logits."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits      # (B, T, V)


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_a_little(adapted: nn.Module, steps: int = 5) -> None:
    """A few AdamW steps on random tokens, so that lora_B is no longer zero."""
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    for step in range(steps):
        ids = tokens(4, 12, seed=step)
        adapted(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted.eval()


@pytest.fixture(scope="module")
def fresh():
    return build()


@pytest.fixture(scope="module")
def trained():
    reference, adapted = build()
    train_a_little(adapted)
    return reference, adapted


LAYER_NAMES = sorted(lora_layers(build()[1]))
hidden_states = float_tensors(shape=st.tuples(st.integers(1, 3), st.integers(1, 6),
                                              st.just(WIDTH)), max_magnitude=1e2)


# --------------------------------------------------------------------------- at init
@pytest.mark.parametrize("name", LAYER_NAMES)
@settings(max_examples=25)
@given(x=hidden_states)
def test_each_lora_layer_starts_as_its_base_layer(fresh, name, x):
    layer = lora_layers(fresh[1])[name]
    if layer.in_features != WIDTH:   # c_proj of the MLP takes 4·WIDTH features
        x = x.repeat_interleave(layer.in_features // WIDTH, dim=-1)
    assert_adapter_identity_at_init(layer.get_base_layer(), layer, x, train=True)


def test_the_wrapped_model_predicts_what_the_base_model_predicts(fresh):
    reference, adapted = fresh
    assert_adapter_kl_zero(Logits(reference), Logits(adapted), tokens())


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_gradient_reaches_lora_b_and_not_lora_a_at_init(fresh, name):
    layer = lora_layers(fresh[1])[name]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    assert_adapter_gradients_flow_at_init(layer, x, lora_A=layer.lora_A["default"].weight,
                                          lora_B=layer.lora_B["default"].weight)


# --------------------------------------------------------------------------- after training
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_each_layer_change_is_bounded_by_its_scale(trained, name):
    layer = lora_layers(trained[1])[name]
    assert layer.lora_B["default"].weight.abs().max() > 0, "training did not move lora_B"
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    assert_adapter_delta_within_bound(layer.get_base_layer(), layer, x,
                                      scale=layer.scaling["default"],
                                      lora_A=layer.lora_A["default"].weight,
                                      lora_B=layer.lora_B["default"].weight)


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_merging_each_layer_round_trips(trained, name):
    layer = lora_layers(trained[1])[name]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    assert_merge_roundtrip(layer, x)          # PEFT's layer.merge() / layer.unmerge()


def test_merging_the_whole_model_round_trips(trained):
    adapted = trained[1]
    assert_merge_roundtrip(Logits(adapted), tokens(),
                           merge=lambda _: adapted.merge_adapter(),
                           unmerge=lambda _: adapted.unmerge_adapter())


# --------------------------------------------------------------------------- checkpointing
def hf_checkpointing(model: nn.Module, use_reentrant: bool):
    """``checkpoint(fn, *args)`` that runs ``fn`` with the model's own gradient checkpointing
    on, switched on as ``TrainingArguments(gradient_checkpointing=True)`` does."""
    # transformers >= 5 names it activation checkpointing; 4.x gradient checkpointing
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or \
        model.gradient_checkpointing_disable

    def checkpoint(fn, *args, **kwargs):
        enable({"use_reentrant": use_reentrant})   # the kwargs for torch.utils.checkpoint
        try:
            return fn(*args, **kwargs)
        finally:
            disable()
    return checkpoint


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_lora_the_same_gradients(use_reentrant):
    _, adapted = build()
    train_a_little(adapted, steps=2)
    adapted.train()                           # HF checkpoints only in train mode
    assert_checkpoint_gradient_equivalent(
        Logits(adapted), (tokens(),), checkpoint=hf_checkpointing(adapted, use_reentrant))
