"""Bad input to the public LoRA (L1-L7) and pipeline-schedule (P3, P6, P7) checks: one table.

Each row is a call that used to escape as a raw exception (AttributeError, IndexError,
TypeError), pass silently (``total_steps=True``) or never return (``total_steps=10**9``); each
must now raise one ``InvalidArgumentError`` line that names ``name=value`` and the problem.
A user's own callable that raises keeps its own exception: that traceback is the user's bug.
"""
import pytest
import torch
from torch import nn

from invariants import (InvalidArgumentError, assert_adapter_contribution_negligible,
                        assert_adapter_delta_within_bound, assert_adapter_gradients_flow_at_init,
                        assert_adapter_identity_at_init, assert_adapter_kl_zero,
                        assert_early_stopping_follows_patience, assert_grokfast_filter_exact,
                        assert_lr_schedule_warmup_cosine, assert_merge_roundtrip,
                        assert_scale_schedule_progressive)
from tests.common import refusals


class Adapted(nn.Module):
    """A zero-init adapter on nn.Linear(4, 3) with merge/unmerge (PEFT's names)."""

    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(4, 3)
        self.A = nn.Parameter(torch.randn(4, 2))
        self.B = nn.Parameter(torch.zeros(2, 3))

    def forward(self, x):
        return self.base_layer(x) + x @ self.A @ self.B

    def merge(self):
        pass

    def unmerge(self):
        pass


class TinyLM(nn.Module):
    def __init__(self, vocab=5):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 4), nn.Linear(4, vocab)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def _never_called(step):
    raise AssertionError(f"the check evaluated step {step} before refusing total_steps")


LIN, ADAPTED, LM, X = nn.Linear(4, 3), Adapted(), TinyLM(), torch.ones(2, 4)
OK_STOPPER = type("Stopper", (), {"step": lambda self, v: False})()

BAD_INPUT = [
    # L1
    ("l1_module_as_string", lambda: assert_adapter_identity_at_init("q_proj", ADAPTED, X),
     r"base='q_proj': must be an nn.Module or a callable, got str \(a module's name"),
    ("l1_train_not_bool", lambda: assert_adapter_identity_at_init(LIN, ADAPTED, X, train="yes"),
     r"train='yes': must be True or False"),
    ("l1_x_list", lambda: assert_adapter_identity_at_init(LIN, ADAPTED, [[1.0] * 4]),
     r"x=\[\[1.0, 1.0, 1.0, 1.0\]\]: must be a torch.Tensor, got list"),
    ("l1_rtol_with_exact", lambda: assert_adapter_identity_at_init(LIN, ADAPTED, X, rtol=1e-3),
     r"rtol=0.001: applies only with exact=False"),
    ("l1_output_not_tensor", lambda: assert_adapter_identity_at_init(
        LIN, lambda x: x.tolist(), X, train=False), r"adapted\(x\)=\[\[.*must return a tensor"),
    # L2
    ("l2_token_out_of_vocabulary", lambda: assert_adapter_kl_zero(LM, LM, torch.tensor([[1, 7]])),
     r"base_lm: calling it on .* failed \(index out of range in self\); x holds ids in "
     r"\[1, 7\]: is one outside the vocabulary"),
    ("l2_negative_token", lambda: assert_adapter_kl_zero(LM, LM, torch.tensor([[1, -1]])),
     r"tokens.min\(\)=-1: must be >= 0"),
    ("l2_model_as_string", lambda: assert_adapter_kl_zero("gpt2", LM, torch.tensor([[1, 2]])),
     r"base_lm='gpt2': must be an nn.Module"),
    ("l2_tokens_list", lambda: assert_adapter_kl_zero(LM, LM, [[1, 2]]),
     r"tokens=\[\[1, 2\]\]: must be a torch.Tensor"),
    ("l2_bool_tokens", lambda: assert_adapter_kl_zero(LM, LM, torch.ones(1, 2, dtype=torch.bool)),
     r"tokens.dtype=torch.bool: must be an integer dtype"),
    # L3
    ("l3_x_list", lambda: assert_adapter_delta_within_bound(
        LIN, ADAPTED, [1.0], scale=1.0, lora_A=ADAPTED.A, lora_B=ADAPTED.B),
     r"x=\[1.0\]: must be a torch.Tensor"),
    ("l3_factor_list", lambda: assert_adapter_delta_within_bound(
        LIN, ADAPTED, X, scale=1.0, lora_A=[[1.0]], lora_B=ADAPTED.B),
     r"lora_A=\[\[1.0\]\]: must be a torch.Tensor"),
    ("l3_rank_0", lambda: assert_adapter_delta_within_bound(
        LIN, ADAPTED, X, scale=1.0, lora_A=torch.ones(4, 0), lora_B=torch.ones(0, 3)),
     r"lora_A.shape=\(4, 0\): must be non-empty"),
    ("l3_scale_bool", lambda: assert_adapter_delta_within_bound(
        LIN, ADAPTED, X, scale=True, lora_A=ADAPTED.A, lora_B=ADAPTED.B),
     r"scale=True: must be a finite number >= 0"),
    # L4
    ("l4_total_steps_bool", lambda: assert_scale_schedule_progressive(
        _never_called, total_steps=True, target=1.0), r"total_steps=True: must be an integer"),
    ("l4_total_steps_1e9", lambda: assert_scale_schedule_progressive(
        _never_called, total_steps=10**9, target=1.0),
     r"total_steps=1000000000: must be an integer >= 1 and <= 1_000_000 \(every step is "
     r"evaluated"),
    ("l4_value_not_number", lambda: assert_scale_schedule_progressive(
        lambda s: "x", total_steps=2, target=1.0), r"schedule\(0\)='x': must be a number"),
    # L5
    ("l5_x_list", lambda: assert_adapter_contribution_negligible(LIN, ADAPTED, [[1.0] * 4]),
     r"x=\[\[1.0, 1.0, 1.0, 1.0\]\]: must be a torch.Tensor"),
    # L6
    ("l6_plain_linear", lambda: assert_merge_roundtrip(nn.Linear(4, 3), X),
     r"layer=Linear\(.*\): has no merge\(\) method: pass merge=callable\(layer\)"),
    ("l6_layer_as_string", lambda: assert_merge_roundtrip("q_proj", X),
     r"layer='q_proj': must be an nn.Module"),
    ("l6_merge_not_callable", lambda: assert_merge_roundtrip(ADAPTED, X, merge=3),
     r"merge=3: must be callable\(layer\)"),
    ("l6_base_as_string", lambda: assert_merge_roundtrip(ADAPTED, X, base="base_layer"),
     r"base='base_layer': must be an nn.Module"),
    ("l6_x_list", lambda: assert_merge_roundtrip(ADAPTED, [[1.0] * 4]),
     r"x=\[\[1.0, 1.0, 1.0, 1.0\]\]: must be a torch.Tensor"),
    # L7
    ("l7_module_as_string", lambda: assert_adapter_gradients_flow_at_init(
        "adapter", X, lora_A=ADAPTED.A, lora_B=ADAPTED.B), r"adapted='adapter': must be"),
    ("l7_factor_list", lambda: assert_adapter_gradients_flow_at_init(
        ADAPTED, X, lora_A=[1.0], lora_B=ADAPTED.B),
     r"lora_A=\[1.0\]: must be a parameter tensor"),
    # P6
    ("p6_total_steps_bool", lambda: assert_lr_schedule_warmup_cosine(
        _never_called, total_steps=True, warmup_steps=0, peak_lr=1.0),
     r"total_steps=True: must be an integer >= 1"),
    ("p6_warmup_bool", lambda: assert_lr_schedule_warmup_cosine(
        _never_called, total_steps=3, warmup_steps=True, peak_lr=1.0),
     r"warmup_steps=True: must be an integer >= 0"),
    ("p6_total_steps_1e9", lambda: assert_lr_schedule_warmup_cosine(
        _never_called, total_steps=10**9, warmup_steps=0, peak_lr=1.0),
     r"total_steps=1000000000: must be an integer >= 1 and <= 1_000_000"),
    ("p6_list_length", lambda: assert_lr_schedule_warmup_cosine(
        [1.0, 0.5], total_steps=3, warmup_steps=0, peak_lr=1.0),
     r"len\(schedule\)=2: must be total_steps=3: the LRs of steps 0..2"),
    ("p6_string", lambda: assert_lr_schedule_warmup_cosine(
        "cosine", total_steps=3, warmup_steps=0, peak_lr=1.0),
     r"schedule='cosine': must be an LR scheduler, a callable step -> lr, or the total_steps"),
    # P7
    ("p7_alpha_bool", lambda: assert_grokfast_filter_exact(
        lambda g: g, [[torch.ones(1)]], alpha=True, lamb=0.1), r"alpha=True: must lie in"),
    ("p7_filter_returns_none", lambda: assert_grokfast_filter_exact(
        lambda g: None, [[torch.ones(1)]], alpha=0.5, lamb=0.1),
     r"filter_step\(...\)=None: must return a list of 1 tensors \(step 1\)"),
    # P3
    ("p3_stopper_as_string", lambda: assert_early_stopping_follows_patience(
        "EarlyStopping", [1.0], patience=1, min_delta=0.0),
     r"stopper='EarlyStopping': must have a step\(val_loss\) -> bool method"),
    ("p3_losses_tensor", lambda: assert_early_stopping_follows_patience(
        OK_STOPPER, torch.ones(3), patience=1, min_delta=0.0),
     r"val_losses=Tensor\(shape=\(3,\), dtype=torch.float32\): must be a sequence"),
]


@pytest.mark.parametrize("call, match", refusals(BAD_INPUT))
def test_bad_input_is_one_named_line(call, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        call()
    text = str(info.value)
    assert "\n" not in text, text
    assert "=" in text.split(":")[0] or text.startswith("Cannot have") or ": calling it" in text


def test_a_users_own_exception_is_not_rewritten():
    """A schedule that raises is the user's bug: its own exception and traceback come through."""
    def schedule(step):
        raise ZeroDivisionError("user bug")
    with pytest.raises(ZeroDivisionError, match="user bug"):
        assert_scale_schedule_progressive(schedule, total_steps=2, target=1.0)
