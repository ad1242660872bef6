"""Seed 001 (S1-S3, S5, S6): generic checks on modules they have never seen, the
reference model's staging, the training function, the CLI acceptance, bad input."""
import json
import math

import pytest
import torch
from hypothesis import example, find, given, settings, strategies as st
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from invariants import (InvariantViolation, assert_film_identity_at_init,
                        assert_stage_schedule_honoured, assert_staged_module_active_from_start,
                        assert_staged_module_identity_before_start,
                        assert_weight_ema_tracks_weights, start_epochs, weight_histories)
from invariants._cli import main
from reference_models import staged_modules as sm
from tests.common import assert_refused, refusals


# ----------------------------------------------------------- a user's staged module
class UserModel(nn.Module):
    """A model never seen by the harness: y = head(x + gate·adapter(x)), gated by epoch."""

    def __init__(self, start: int, *, adapter: bool = True, leak: bool = False,
                 stuck: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.start, self.leak, self.stuck = start, leak, stuck
        self.body, self.head = nn.Linear(5, 5), nn.Linear(5, 2)
        self.adapter = nn.Linear(5, 5) if adapter else None

    def forward(self, epoch, x):  # x (B, 5) -> (B, 2)
        z = self.body(x)
        on = (epoch >= self.start or self.leak) and not self.stuck
        if self.adapter is not None and on:
            z = z + self.adapter(z)
        return self.head(z)

    def without(self):
        other = UserModel(self.start, adapter=False)
        other.load_state_dict(self.state_dict(), strict=False)
        return other


@given(start=start_epochs(min_epoch=1, max_epoch=6), batch=st.integers(1, 4),
       seed=st.integers(0, 99))
@example(start=1, batch=1, seed=0)
def test_user_module_identity_before_start_and_active_after(start, batch, seed):
    model = UserModel(start)
    x = torch.randn(batch, 5, generator=torch.Generator().manual_seed(seed))
    assert_staged_module_identity_before_start(model, model.without(), (x,), start_epoch=start)
    assert_staged_module_active_from_start(model, model.without(), (x,), start_epoch=start,
                                           epochs=[start, start + 3])


def test_user_module_leaking_before_start_is_caught_with_the_epoch():
    model = UserModel(3, leak=True)
    x = torch.ones(2, 5)
    with pytest.raises(InvariantViolation, match=r"^\[S1\] assert_staged_module_identity_"
                                                 r"before_start: expected .*start_epoch=3\n"
                                                 r"  observed: epoch 0: .* 4 / 4 elements"):
        assert_staged_module_identity_before_start(model, model.without(), x, start_epoch=3)


def test_user_module_stuck_off_is_caught():
    model = UserModel(2, stuck=True)
    with pytest.raises(InvariantViolation, match=r"(?s)\[S2\].*epoch 2: output with the module "
                                                 r"equals the output without it"):
        assert_staged_module_active_from_start(model, model.without(), torch.ones(1, 5),
                                               start_epoch=2, epochs=[2])


def test_user_schedule_honoured_and_ignored():
    def build(starts, ignore=None):
        models = {k: UserModel(3 if k == ignore else v) for k, v in starts.items()}
        return {k: (m, m.without()) for k, m in models.items()}

    starts = {"adapter_start_epoch": 1, "other_start_epoch": 4}
    x = torch.ones(1, 5)
    assert_stage_schedule_honoured(build, starts, x, epochs=6)
    with pytest.raises(InvariantViolation, match=r"(?s)\[S6\].*other_start_epoch=4 to be honoured"
                                                 r".*active at epochs \[3, 4, 5\]"):
        assert_stage_schedule_honoured(lambda s: build(s, ignore="other_start_epoch"),
                                       starts, x, epochs=6)


# ----------------------------------------------------------- FiLM (S3) on a user layer
class UserFiLM(nn.Module):
    def __init__(self, d, random=False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d) if not random else 1 + 0.1 * torch.randn(d))
        self.beta = nn.Parameter(torch.zeros(d) if not random else 0.1 * torch.randn(d))

    def forward(self, x):
        return self.gamma * x + self.beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_film_identity_holds_for_user_film_and_extreme_inputs(dtype):
    x = torch.tensor([[0.0, -0.0, 1e-30, -3e38 if dtype != torch.float64 else -1e300]],
                     dtype=dtype)
    assert_film_identity_at_init(UserFiLM(4).to(dtype), x)
    film = sm.FiLM(4)
    x3 = torch.tensor([[[0.0, -0.0, 1e-30, -3e38]]]).expand(1, 2, 4)  # non-contiguous
    assert_film_identity_at_init(film, x3, torch.randn(1, 4))


def test_film_random_init_is_caught():
    torch.manual_seed(0)
    with pytest.raises(InvariantViolation, match=r"(?s)\[S3\].*γ = 1, β = 0.*film\(x\) vs x: "
                                                 r"4 / 4 elements"):
        assert_film_identity_at_init(UserFiLM(4, random=True), torch.ones(1, 4))


# ----------------------------------------------------------- EMA (S5)
def test_torch_averaged_model_ema_starts_at_first_update_not_construction():
    """Pinned finding: AveragedModel's first update_parameters copies the weights."""
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    history = [{"weight": torch.randn(3, 2), "bias": torch.randn(3)} for _ in range(4)]

    def fresh():
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        read = lambda: {n.removeprefix("module."): p  # noqa: E731
                        for n, p in ema.named_parameters()}
        return (lambda: ema.update_parameters(model)), read

    update, read = fresh()
    with pytest.raises(InvariantViolation, match=r"step 1: ema\['weight'\] after update 1: "
                                                 r"6 / 6 elements"):
        assert_weight_ema_tracks_weights(model, update, read, history, decay=0.9)
    # Without a fixed decay the decay-free properties (hull, constant) hold from the start...
    update, read = fresh()
    assert_weight_ema_tracks_weights(model, update, read, history, decay=None)
    # ...and after one warm-up update the recursion holds too.
    update, read = fresh()
    update()
    assert_weight_ema_tracks_weights(model, update, read, history, decay=0.9)


@given(decay=st.floats(0.0, 1.0), hist=weight_histories(shape=(2, 2), dtype=torch.float64))
def test_reference_ema_holds_and_restores_the_model(decay, hist):
    _, history = hist
    model = nn.Linear(2, 2, bias=False).double()
    before = model.weight.detach().clone()
    ema = sm.WeightEMA(model, decay)
    assert_weight_ema_tracks_weights(model, lambda: ema.update(model), lambda: ema.shadow,
                                     [{"weight": w} for w in history], decay=decay)
    assert torch.equal(model.weight, before)


def test_ema_leaving_the_convex_hull_is_caught():
    model = nn.Linear(1, 1, bias=False)
    state = {"weight": model.weight.detach().clone()}

    def overshoot():  # momentum-like "EMA" that overshoots: not a convex combination
        state["weight"] = 2.0 * model.weight.detach() - state["weight"]

    with torch.no_grad():
        model.weight.fill_(0.5)
    state["weight"] = model.weight.detach().clone()
    history = [{"weight": torch.full((1, 1), 1.0)}]
    with pytest.raises(InvariantViolation, match=r"(?s)\[S5\].*convex hull.*step 1: "
                                                 r"ema\['weight'\]\[0, 0\] = 1.5 outside "
                                                 r"\[0.5, 1\]"):
        assert_weight_ema_tracks_weights(model, overshoot, lambda: state, history, decay=None)


def test_ema_drifting_from_a_constant_is_caught():
    model = nn.Linear(1, 1, bias=False)
    state = {"weight": model.weight.detach().clone()}

    def drift():  # an "EMA" that adds a little each update
        state["weight"] = state["weight"] + 1e-3

    history = [{"weight": model.weight.detach().clone()}] * 3
    with pytest.raises(InvariantViolation, match=r"(?s)EMA of a constant to stay that constant"):
        assert_weight_ema_tracks_weights(model, drift, lambda: state, history, decay=None)


# ----------------------------------------------------------- the reference model
def test_fixed_flags_follow_the_seed_option_a_and_broken_flags_do_not():
    assert sm.staging_flags(sm.FIXED, 4) == dict.fromkeys(sm.MODULES, False)
    assert sm.staging_flags(sm.FIXED, 5) == dict.fromkeys(sm.MODULES, True)
    assert sm.staging_flags(sm.BROKEN, 0) == dict.fromkeys(sm.MODULES, True)
    stuck = sm.FIXED.__class__(stuck_flag="hpm")
    assert sm.staging_flags(stuck, 50)["hpm"] is False
    ignored = sm.FIXED.__class__(ignored_start_key="hpm_start_epoch")
    assert [sm.staging_flags(ignored, e)["hpm"] for e in range(6)] == [False] * 3 + [True] * 3


def test_without_keeps_every_weight_and_the_model_is_exact_identity_before_start():
    model = sm.build_model(sm.FIXED)
    grid, support, _ = sm.make_batch(sm.FIXED, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(grid, support, epoch=4)
        for module in sm.MODULES:
            assert torch.equal(model.without(module)(grid, support, epoch=4), full), module


def test_checkpointed_model_matches_plain_model_in_training():
    cfg = sm.FIXED.__class__(hyperlora_start_epoch=0, solver_context_start_epoch=0,
                             cross_attention_start_epoch=0, hpm_start_epoch=0)
    grid, support, target = sm.make_batch(cfg, 2, torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        model = sm.build_model(sm.replace(cfg, gradient_checkpointing=ckpt))
        loss = nn.functional.cross_entropy(model(grid, support, epoch=0).flatten(0, 1),
                                           target.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_train_epochs_is_deterministic_finite_and_background_heavy():
    threads = torch.get_num_threads()
    a = sm.train_epochs(sm.FIXED, 6, seed=0)  # CPU-time budget: bench/bench_training.py
    b = sm.train_epochs(sm.FIXED, 6, seed=0)
    assert a == b
    assert set(a) == {"loss", "accuracy", "bg_fraction", "target_bg_fraction", "fg_accuracy",
                      "lora_norm", "ema_accuracy", "ema_bg_fraction"}
    assert all(len(v) == 6 and all(math.isfinite(x) for x in v) for v in a.values())
    assert 0.7 < a["target_bg_fraction"][0] < 0.95  # background-heavy grids
    assert a["lora_norm"][:5] == [0.0] * 5 and a["lora_norm"][5] > 0  # deltas gated until 5
    assert torch.get_num_threads() == threads
    assert "ema_accuracy" not in sm.train_epochs(sm.replace(sm.FIXED, use_ema=False), 1, 0)


def test_cli_check_acceptance(capsys):
    assert main(["check", "--system", "staged_modules", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    rows = report["cases"]
    assert {r["invariant"] for r in rows} == {"S1", "S2", "S3", "S4", "S5", "S6"}
    for row in rows:
        if row["expected"] == "holds":
            assert row["outcome"] == "holds", row
        else:
            assert row["outcome"] == "caught" and row["counterexample"], row


# ----------------------------------------------------------- strategies reach edges
@pytest.mark.parametrize("strategy, predicate", [
    (start_epochs(max_epoch=8), lambda s: s == 0),
    (start_epochs(max_epoch=8), lambda s: s == 8),
    (start_epochs(min_epoch=1, max_epoch=8), lambda s: s == 1),
    (weight_histories(), lambda h: h[0] == "constant" and len(h[1]) >= 2),
    (weight_histories(), lambda h: len(h[1]) == 1),
    (weight_histories(), lambda h: float(h[1][0].abs().max()) < 1e-5),
], ids=["start0", "start_max", "start_min1", "constant_history", "length1", "tiny"])
def test_strategies_reach_edges(strategy, predicate):
    find(strategy, predicate, settings=settings(max_examples=2000, database=None))


# ----------------------------------------------------------- bad input, table-driven
_M = UserModel(2)
_W = _M.without()
_X = torch.ones(1, 5)
_EMA_MODEL = nn.Linear(2, 2, bias=False)
_NOOP = lambda: None  # noqa: E731
_READ = lambda: {"weight": _EMA_MODEL.weight}  # noqa: E731
_EMPTY_MODEL = nn.Module()
_EMPTY_MODEL.weight = nn.Parameter(torch.zeros(2, 0))

BAD = [
    ("s1_negative_start", lambda: assert_staged_module_identity_before_start(
        _M, _W, _X, start_epoch=-1), r"start_epoch=-1: must be an integer epoch >= 0"),
    ("s1_start_zero", lambda: assert_staged_module_identity_before_start(
        _M, _W, _X, start_epoch=0), r"start_epoch=0: has no epoch before it"),
    ("s1_epoch_not_before", lambda: assert_staged_module_identity_before_start(
        _M, _W, _X, start_epoch=2, epochs=[1, 2]), r"epochs=\[1, 2\]: must all lie before"),
    ("s1_not_callable", lambda: assert_staged_module_identity_before_start(
        "model", _W, _X, start_epoch=2), r"staged='model': must be callable"),
    ("s1_nan_input", lambda: assert_staged_module_identity_before_start(
        _M, _W, torch.tensor([[math.nan] * 5]), start_epoch=2), r"inputs\[0\]=.*must be finite"),
    ("s1_shape_mismatch", lambda: assert_staged_module_identity_before_start(
        _M, lambda e, x: x, _X, start_epoch=2), r"staged\(...\).shape=\(1, 2\) and without"),
    ("s1_float_epoch", lambda: assert_staged_module_identity_before_start(
        _M, _W, _X, start_epoch=2.0), r"start_epoch=2.0: must be an integer epoch"),
    ("s2_epoch_before_start", lambda: assert_staged_module_active_from_start(
        _M, _W, _X, start_epoch=2, epochs=[1]), r"epochs=\[1\]: must all lie at or after"),
    ("s2_no_epochs", lambda: assert_staged_module_active_from_start(
        _M, _W, _X, start_epoch=2, epochs=[]), r"epochs=\[\]: must name at least one epoch"),
    ("s2_negative_start", lambda: assert_staged_module_active_from_start(
        _M, _W, _X, start_epoch=-3, epochs=[0]), r"start_epoch=-3"),
    ("s3_not_callable", lambda: assert_film_identity_at_init(None, _X),
     r"film=None: must be callable"),
    ("s3_inf_input", lambda: assert_film_identity_at_init(UserFiLM(5), _X * math.inf),
     r"x=.*must be finite"),
    ("s3_shape_changes", lambda: assert_film_identity_at_init(lambda x: x.sum(-1), _X),
     r"film\(x\).shape=\(1,\) and x.shape=\(1, 5\)"),
    ("s5_decay_above_one", lambda: assert_weight_ema_tracks_weights(
        _EMA_MODEL, _NOOP, _READ, [{"weight": torch.zeros(2, 2)}], decay=1.5),
     r"decay=1.5: must lie in \[0, 1\]"),
    ("s5_empty_history", lambda: assert_weight_ema_tracks_weights(
        _EMA_MODEL, _NOOP, _READ, [], decay=0.5), r"history=\[\]: must be a non-empty"),
    ("s5_unknown_name", lambda: assert_weight_ema_tracks_weights(
        _EMA_MODEL, _NOOP, _READ, [{"bias": torch.zeros(2)}], decay=0.5),
     r"history\[0\]='bias': is not a parameter of model"),
    ("s5_shape_mismatch", lambda: assert_weight_ema_tracks_weights(
        _EMA_MODEL, _NOOP, _READ, [{"weight": torch.zeros(3)}], decay=0.5),
     r"history\[0\]\['weight'\].shape=\(3,\): must match"),
    ("s5_update_not_callable", lambda: assert_weight_ema_tracks_weights(
        _EMA_MODEL, 3, _READ, [{"weight": torch.zeros(2, 2)}], decay=0.5),
     r"update=3: must be a zero-argument callable"),
    ("s6_negative_start", lambda: assert_stage_schedule_honoured(
        lambda s: {}, {"hpm_start_epoch": -1}, _X, epochs=3),
     r"starts\['hpm_start_epoch'\]=-1: must be an integer epoch >= 0"),
    ("s6_epochs_too_few", lambda: assert_stage_schedule_honoured(
        lambda s: {}, {"hpm_start_epoch": 4}, _X, epochs=4),
     r"epochs=4: must be an integer > every start epoch \(4\)"),
    ("s6_missing_pair", lambda: assert_stage_schedule_honoured(
        lambda s: {}, {"hpm_start_epoch": 1}, _X, epochs=3),
     r"must return a \(staged, without\) pair for 'hpm_start_epoch'"),
    ("config_negative_start", lambda: sm.StagedModulesConfig(hyperlora_start_epoch=-1),
     r"hyperlora_start_epoch=-1: must be an integer epoch >= 0"),
    ("config_unknown_flag", lambda: sm.StagedModulesConfig(stuck_flag="lora"),
     r"stuck_flag='lora': must be None or one of"),
    ("config_film_init", lambda: sm.StagedModulesConfig(film_init="xavier"),
     r"film_init='xavier'"),
    ("config_ema_decay", lambda: sm.StagedModulesConfig(ema_decay=2.0), r"ema_decay=2.0"),
    ("model_negative_epoch", lambda: sm.staging_flags(sm.FIXED, -1),
     r"epoch=-1: must be an integer epoch >= 0"),
    ("train_zero_epochs", lambda: sm.train_epochs(sm.FIXED, 0, 0), r"epochs=0"),
    ("strategy_start_bounds", lambda: start_epochs(min_epoch=4, max_epoch=2),
     r"Cannot have max_epoch=2 < min_epoch=4"),
    ("strategy_negative_min", lambda: start_epochs(min_epoch=-1), r"min_epoch=-1"),
    ("strategy_history_length", lambda: weight_histories(min_length=0),
     r"min_length=0: must be an integer >= 1"),
    ("strategy_history_magnitude", lambda: weight_histories(max_magnitude=math.inf),
     r"max_magnitude=inf"),
    ("s1_empty_input", lambda: assert_staged_module_identity_before_start(
        _M, _W, torch.ones(0, 5), start_epoch=2),
     r"staged\(epoch=0, \*inputs\).shape=\(0, 2\): must be non-empty"),
    ("s2_empty_input", lambda: assert_staged_module_active_from_start(
        _M, _W, torch.ones(0, 5), start_epoch=2, epochs=[2]),
     r"staged\(epoch=2, \*inputs\).shape=\(0, 2\): must be non-empty"),
    ("s2_without_nan", lambda: assert_staged_module_active_from_start(
        _M, lambda e, x: _W(e, x) * math.nan, _X, start_epoch=2, epochs=[2]),
     r"without\(epoch=2, \*inputs\): 2 of 2 output elements .* non-finite"),
    ("s3_empty_x", lambda: assert_film_identity_at_init(UserFiLM(5), torch.ones(0, 5)),
     r"x.shape=\(0, 5\): must be non-empty"),
    ("s3_wrong_signature", lambda: assert_film_identity_at_init(lambda x, c: x, _X),
     r"film: calling it as film\(x \(shape \(1, 5\), torch.float32\), \*context\) failed "
     r"\(TypeError"),
    ("s5_empty_weight", lambda: assert_weight_ema_tracks_weights(
        _EMPTY_MODEL, _NOOP, lambda: {"weight": torch.zeros(2, 0)},
        [{"weight": torch.zeros(2, 0)}], decay=0.5),
     r"history\[0\]\['weight'\].shape=\(2, 0\): must be non-empty"),
    ("s5_read_not_tensor", lambda: assert_weight_ema_tracks_weights(
        _EMA_MODEL, _NOOP, lambda: {"weight": [[0.0, 0.0], [0.0, 0.0]]},
        [{"weight": torch.zeros(2, 2)}], decay=0.5),
     r"read\(\)\['weight'\]=.*must be a torch.Tensor, got list"),
    ("s1_epochs_not_list", lambda: assert_staged_module_identity_before_start(
        _M, _W, _X, start_epoch=2, epochs=1), r"epochs=1: must be a list of integer epochs"),
    ("s2_epochs_none", lambda: assert_staged_module_active_from_start(
        _M, _W, _X, start_epoch=2, epochs=None), r"epochs=None: must be a list of integer epochs"),
    ("s1_start_huge", lambda: assert_staged_module_identity_before_start(
        _M, _W, _X, start_epoch=10 ** 20), r"start_epoch=100000000000000000000: must be an integer "
                                           r"epoch <= 1e\+06"),
    ("s6_epochs_huge", lambda: assert_stage_schedule_honoured(
        lambda s: {"k": (_M, _W)}, {"k": 1}, _X, epochs=10 ** 400),
     r"epochs=1000.*: must be an integer > every start epoch \(1\) .* <= 1e\+06"),
    ("s6_empty_input", lambda: assert_stage_schedule_honoured(
        lambda s: {"k": (_M, _W)}, {"k": 1}, torch.ones(0, 5), epochs=3),
     r"staged\(epoch=0, \*inputs\).shape=\(0, 2\): must be non-empty"),
]


# ------------------------------------------- NaN is never "equal", "inside" or "inactive"
def test_s2_nan_output_is_a_violation_not_activity():
    """NaN differs from every number, so a NaN output used to count as 'the module acts'."""
    nan_model = lambda e, x: _M(e, x) * (math.nan if e >= 2 else 1.0)  # noqa: E731
    with pytest.raises(InvariantViolation, match=r"(?s)\[S2\].*finite outputs.*staged: 2 of 2 "
                                                 r"output elements at epoch 2 are non-finite"):
        assert_staged_module_active_from_start(nan_model, _W, _X, start_epoch=2, epochs=[2])


def test_s1_nan_output_on_both_sides_is_not_identity():
    both_nan = lambda e, x: _W(e, x) * math.nan  # noqa: E731
    with pytest.raises(InvariantViolation, match=r"(?s)\[S1\].*staged: 2 of 2 output elements "
                                                 r"at epoch 0 are non-finite"):
        assert_staged_module_identity_before_start(both_nan, both_nan, _X, start_epoch=1)


def test_s6_nan_before_start_is_a_violation():
    """NaN on both sides compared 'close', so a module producing NaN read as off."""
    nan_model = lambda e, x: _M(e, x) * (math.nan if e < 1 else 1.0)  # noqa: E731
    with pytest.raises(InvariantViolation, match=r"(?s)\[S6\].*at epoch 0 are non-finite"):
        assert_stage_schedule_honoured(lambda s: {"k": (nan_model, _W)}, {"k": 1}, _X, epochs=3)


@pytest.mark.parametrize("decay", [None, 0.5], ids=["any-decay", "decay-0.5"])
def test_s5_nan_ema_is_a_violation(decay):
    """The convex-hull test compared NaN with the bounds: False on both sides, so 'inside'."""
    model = nn.Linear(2, 2, bias=False)
    shadow = {"weight": model.weight.detach().clone()}

    def update():
        shadow["weight"] = torch.full((2, 2), math.nan)
    with pytest.raises(InvariantViolation, match=r"(?s)\[S5\]"):
        assert_weight_ema_tracks_weights(model, update, lambda: shadow,
                                         [{"weight": torch.ones(2, 2)}], decay=decay)


@pytest.mark.parametrize("call, match", refusals(BAD))
def test_bad_input_is_named(call, match):
    assert_refused(call, match)
