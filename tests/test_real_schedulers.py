"""P6 and P3 against the real schedulers and stopper of torch and transformers.

P6's contract: the steps that exist are the optimizer steps 0..T-1, and the decay is a cosine
between the one reaching eta_min at T (transformers) and at T-1 (OneCycleLR). Each row builds a
fresh scheduler; `holds` rows must pass, `caught` rows must fail naming the cause. P3 runs
transformers' own EarlyStoppingCallback the way Trainer drives it (the callback reads
`state.best_metric`, which Trainer moves on *any* gain after the callback ran), and Lightning's
own EarlyStopping decision on drawn validation curves.
"""
import math
import os
import warnings

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from invariants import (InvalidArgumentError, InvariantViolation, val_loss_sequences,
                        assert_early_stopping_follows_patience, assert_lr_schedule_warmup_cosine,
                        expected_early_stop)

try:
    import transformers
except ImportError:  # the `real` extra; CI installs it through `test`
    if os.environ.get("CI"):
        raise
    pytest.skip("transformers is not installed: pip install -e '.[real]'", allow_module_level=True)

LR = torch.optim.lr_scheduler
T, W, PEAK = 100, 10, 0.01
ONE_CYCLE_W = 29                    # OneCycleLR(total_steps=100, pct_start=0.3) peaks at 0.3·100 - 1
ONE_CYCLE_MIN = PEAK / 25 / 1e4     # max_lr / div_factor / final_div_factor (torch's defaults)


def _opt(lr=PEAK):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _sequential(total, warmup, peak, eta_min=0.0):
    opt = _opt(peak)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return LR.SequentialLR(opt, [LR.LinearLR(opt, 1e-8, 1.0, total_iters=warmup),
                                     LR.CosineAnnealingLR(opt, T_max=total - warmup,
                                                          eta_min=eta_min)],
                               milestones=[warmup])


# (id, make scheduler, warmup_steps, eta_min, expected, regex the violation must match)
SCHEDULES = [
    ("hf_cosine_with_warmup", lambda: transformers.get_cosine_schedule_with_warmup(_opt(), W, T),
     W, 0.0, "holds", None),
    ("hf_cosine_no_warmup", lambda: transformers.get_cosine_schedule_with_warmup(_opt(), 0, T),
     0, 0.0, "holds", None),
    ("torch_one_cycle_cos", lambda: LR.OneCycleLR(_opt(), max_lr=PEAK, total_steps=T,
                                                  pct_start=0.3),
     ONE_CYCLE_W, ONE_CYCLE_MIN, "holds", None),
    ("torch_cosine_annealing_T", lambda: LR.CosineAnnealingLR(_opt(), T_max=T), 0, 0.0,
     "holds", None),
    ("torch_cosine_annealing_T-1", lambda: LR.CosineAnnealingLR(_opt(), T_max=T - 1), 0, 0.0,
     "holds", None),
    ("torch_linear_then_cosine", lambda: _sequential(T, W, PEAK, 1e-6), W, 1e-6, "holds", None),
    ("hf_linear_with_warmup", lambda: transformers.get_linear_schedule_with_warmup(_opt(), W, T),
     W, 0.0, "caught", r"cosine decay.*\n.*\n.*hint: a linear decay"),
    ("hf_constant_with_warmup", lambda: transformers.get_constant_schedule_with_warmup(_opt(), W),
     W, 0.0, "caught", r"hint: a constant LR after warmup"),
    ("torch_one_cycle_linear", lambda: LR.OneCycleLR(_opt(), max_lr=PEAK, total_steps=T,
                                                     pct_start=0.3, anneal_strategy="linear"),
     ONE_CYCLE_W, ONE_CYCLE_MIN, "caught", r"hint: a linear decay"),
    ("torch_cosine_annealing_too_short", lambda: LR.CosineAnnealingLR(_opt(), T_max=T - 2), 0,
     0.0, "caught", r"non-increasing LR after warmup"),
    ("torch_step_lr", lambda: LR.StepLR(_opt(), step_size=30, gamma=0.1), 0, 0.0, "caught",
     r"jump of"),
    ("torch_constant", lambda: LR.LambdaLR(_opt(), lambda step: 1.0), 0, 0.0, "caught",
     r"hint: a constant LR"),
]


@pytest.mark.parametrize("make, warmup, eta_min, expected, match",
                         [row[1:] for row in SCHEDULES], ids=[row[0] for row in SCHEDULES])
def test_real_schedulers(make, warmup, eta_min, expected, match):
    def check():
        assert_lr_schedule_warmup_cosine(make(), total_steps=T, warmup_steps=warmup,
                                         peak_lr=PEAK, eta_min=eta_min)
    if expected == "holds":
        check()
    else:
        with pytest.raises(InvariantViolation, match=match):
            check()


def test_one_cycle_is_read_on_its_own_steps_only():
    """OneCycleLR(total_steps=T) is defined on steps 0..T-1; one more step() raises or
    extrapolates. The check reads exactly T values, so the last is eta_min and nothing beyond."""
    sched = LR.OneCycleLR(_opt(), max_lr=PEAK, total_steps=T, pct_start=0.3)
    seen = [sched.get_last_lr()[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(T - 1):
            sched.step()
            seen.append(sched.get_last_lr()[0])
    assert seen[-1] == pytest.approx(ONE_CYCLE_MIN, rel=1e-6) and len(seen) == T
    assert_lr_schedule_warmup_cosine(seen, total_steps=T, warmup_steps=ONE_CYCLE_W, peak_lr=PEAK,
                                     eta_min=ONE_CYCLE_MIN)


def test_cosine_shaped_warmup_is_not_a_jump():
    """A warm-up that rises along half a cosine is steeper than linear at its middle
    (π/2 times); that is a shape, not a jump."""
    warm = [PEAK * 0.5 * (1 - math.cos(math.pi * t / W)) for t in range(W)]
    decay = [PEAK * 0.5 * (1 + math.cos(math.pi * k / (T - W))) for k in range(T - W)]
    assert_lr_schedule_warmup_cosine(warm + decay, total_steps=T, warmup_steps=W, peak_lr=PEAK)
    jumpy = warm[:5] + [PEAK] * 5 + decay      # reaches the peak in one step from halfway
    with pytest.raises(InvariantViolation, match=r"jump of .* at step 5"):
        assert_lr_schedule_warmup_cosine(jumpy, total_steps=T, warmup_steps=W, peak_lr=PEAK)


@given(total=st.integers(2, 80), frac=st.sampled_from([0.0, 0.1, 0.5]),
       peak=st.sampled_from([1e-4, 0.01, 1.0]))
def test_hf_cosine_holds_and_hf_linear_is_caught_for_any_length(total, frac, peak):
    warmup = min(total - 1, int(frac * total))
    cosine = transformers.get_cosine_schedule_with_warmup(_opt(peak), warmup, total)
    assert_lr_schedule_warmup_cosine(cosine, total_steps=total, warmup_steps=warmup, peak_lr=peak)
    if total - warmup >= 3:  # with two decay steps a line and a cosine coincide
        linear = transformers.get_linear_schedule_with_warmup(_opt(peak), warmup, total)
        with pytest.raises(InvariantViolation, match=r"\[P6\]"):
            assert_lr_schedule_warmup_cosine(linear, total_steps=total, warmup_steps=warmup,
                                             peak_lr=peak)


def test_list_of_the_old_length_is_refused():
    """A list holds the LRs of steps 0..T-1; T+1 values (the old contract) is an error."""
    lrs = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    with pytest.raises(InvalidArgumentError, match=r"len\(schedule\)=5: must be total_steps=4"):
        assert_lr_schedule_warmup_cosine(lrs, total_steps=4, warmup_steps=0, peak_lr=1.0)


# ------------------------------------------------------------------------- P3
class HFStopper:
    """transformers' EarlyStoppingCallback, driven as Trainer drives it: on_evaluate first,
    then Trainer._determine_best_metric moves state.best_metric on any gain."""

    def __init__(self, patience, min_delta):
        self.callback = transformers.EarlyStoppingCallback(patience, min_delta)
        self.args = type("Args", (), {"greater_is_better": False,
                                      "metric_for_best_model": "eval_loss"})()
        self.state = transformers.TrainerState()
        self.control = transformers.TrainerControl()

    def step(self, val_loss):
        self.callback.on_evaluate(self.args, self.state, self.control,
                                  metrics={"eval_loss": val_loss})
        if self.state.best_metric is None or val_loss < self.state.best_metric:
            self.state.best_metric = val_loss
        return self.control.should_training_stop


class FixedBestHFSpelling:
    """HF's comparison (abs(v - best) > d) with a best that moves only on a real improvement."""

    def __init__(self, patience, min_delta):
        self.patience, self.min_delta, self.best, self.bad = patience, min_delta, math.inf, 0

    def step(self, v):
        if v < self.best and abs(v - self.best) > self.min_delta:
            self.best, self.bad = v, 0
            return False
        self.bad += 1
        return self.bad >= self.patience


def test_hf_callback_moving_best_on_sub_threshold_gains_is_caught():
    """1.0 -> 0.995 -> 0.99 -> 0.985 with min_delta 0.01: each gain is below min_delta, but
    together they beat 1.0 by 0.015 at check 4. HF's best follows every gain, so it counts
    three checks without improvement and stops; the contract resets the counter at check 4."""
    losses = [1.0, 0.995, 0.99, 0.985, 0.984]
    assert expected_early_stop(losses, patience=3, min_delta=0.01) is None
    with pytest.raises(InvariantViolation, match=r"(?s)no stop.*stopped at check 4.*"
                                                 r"move the best only on an improvement"):
        assert_early_stopping_follows_patience(HFStopper(3, 0.01), losses, patience=3,
                                               min_delta=0.01)


def test_hf_callback_holds_where_its_best_agrees():
    """No sub-threshold gains: HF's callback stops where the contract says (check 5)."""
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95]
    assert_early_stopping_follows_patience(HFStopper(3, 0.01), losses, patience=3, min_delta=0.01)


@pytest.mark.parametrize("losses, patience", [
    ([0.9, 0.89, 0.89], 2),
    ([0.3, 0.29, 0.29], 2),
    ([1.0, 0.9, 0.89, 0.89], 2),
], ids=["0.9_to_0.89", "0.3_to_0.29", "edge_after_a_real_gain"])
def test_one_rounding_step_edge_accepts_either_spelling(losses, patience):
    """0.9 - 0.89 = 0.010000000000000009 in float64: `best - v > 0.01` (HF's spelling) says
    improvement, `v < best - 0.01` says not; the exact gap is within one ulp of min_delta, so
    both decisions (a stop, or none) are correct. HF's callback on these has no sub-threshold
    gain to mis-handle, so it holds too."""
    for stopper in (FixedBestHFSpelling(patience, 0.01), HFStopper(patience, 0.01)):
        assert_early_stopping_follows_patience(stopper, losses, patience=patience,
                                               min_delta=0.01)


class LooseStopper(FixedBestHFSpelling):
    """Counts a gain as an improvement if it is within 1e-12 of min_delta: too loose."""

    def step(self, v):
        if self.best - v > self.min_delta - 1e-12:
            self.best, self.bad = v, 0
            return False
        self.bad += 1
        return self.bad >= self.patience


def test_edge_tolerance_is_one_rounding_step_not_more():
    """Four ulps short of min_delta is decided exactly: a stopper that calls it an
    improvement (and so never stops) is caught."""
    best, value = 0.9, 0.9 - 0.01
    for _ in range(4):
        value = math.nextafter(value, math.inf)
    assert not value < best - 0.01 and not best - value > 0.01
    losses = [best, value, value]
    assert expected_early_stop(losses, patience=2, min_delta=0.01) == 2
    with pytest.raises(InvariantViolation, match=r"a stop at check 3.*\n.*never stopped"):
        assert_early_stopping_follows_patience(LooseStopper(2, 0.01), losses, patience=2,
                                               min_delta=0.01)


# ------------------------------------------------ P3 on Lightning's own EarlyStopping
class LightningStopper:
    """Lightning's EarlyStopping decision, the method its ``on_validation_end`` calls
    (``_evaluate_stopping_criteria``), fed float64 tensors as a LightningModule logs them."""

    def __init__(self, patience, min_delta):
        from lightning.pytorch.callbacks import EarlyStopping
        self.callback = EarlyStopping(monitor="val_loss", patience=patience,
                                      min_delta=min_delta, mode="min")

    def step(self, v):
        stop, _ = self.callback._evaluate_stopping_criteria(torch.tensor(v, dtype=torch.float64))
        return bool(stop)


@given(losses=val_loss_sequences(min_delta=0.01), patience=st.integers(1, 4))
def test_lightning_early_stopping_follows_patience(losses, patience):
    """Lightning moves its best only on an improvement of more than min_delta
    (`current + min_delta < best`), so it holds where HF's callback does not."""
    assert_early_stopping_follows_patience(LightningStopper(patience, 0.01), losses,
                                           patience=patience, min_delta=0.01)


def test_lightning_holds_on_the_sub_threshold_gains_that_catch_hf():
    losses = [1.0, 0.995, 0.99, 0.985, 0.984]
    assert_early_stopping_follows_patience(LightningStopper(3, 0.01), losses, patience=3,
                                           min_delta=0.01)


def test_lightning_with_the_wrong_patience_is_caught():
    """Teeth: Lightning's callback configured with patience 3 checked against patience 2."""
    losses = [1.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(InvariantViolation, match=r"stop at check 3"):
        assert_early_stopping_follows_patience(LightningStopper(3, 0.01), losses, patience=2,
                                               min_delta=0.01)
