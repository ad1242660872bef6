"""S4: checkpoint gradient equivalence — torch 2.13's own behaviour pinned, the check
applied to torch.utils.checkpoint in both modes and to functions it has never seen,
argument structures drawn by Hypothesis, and bad input table-driven."""
import functools
import math
import warnings

import pytest
import torch
from hypothesis import example, find, given, settings, strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from invariants import (ArgumentLayout, InvalidArgumentError, InvariantViolation,
                        argument_layouts, assert_checkpoint_gradient_equivalent)
from reference_models.staged_modules import HyperLoRA, TreeStep
from tests.common import assert_refused, refusals


# ----------------------------------------------------------- a first solver step
class Solver(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, h, deltas):  # x (B, 4), h (B, 4) or None, deltas {"w": (B, 4, 4)}
        z = self.lin(x) + torch.bmm(x[:, None], deltas["w"])[:, 0]
        return torch.tanh(z if h is None else z + h)


def _first_step():
    torch.manual_seed(0)
    solver, hyper = Solver(), HyperLoRA(4, 2, 0.1)
    x = torch.randn(2, 4)                           # no grad: the encoder output is constant
    deltas = {"w": hyper(torch.randn(2, 4))["input"]}  # produced upstream: non-leaf
    return solver, hyper, x, deltas


# ----------------------------------------------------------- torch 2.13, pinned
def test_torch_version_is_the_one_measured():
    assert torch.__version__.startswith("2.13."), (
        f"the behaviour pinned below was measured on torch 2.13; this is {torch.__version__}: "
        "re-measure and update docs/staged_modules.md")


def test_torch_reentrant_first_step_warns_and_cuts_the_graph():
    solver, hyper, x, deltas = _first_step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = checkpoint(solver, x, None, deltas, use_reentrant=True)
    messages = [str(w.message) for w in caught]
    assert messages == ["None of the inputs have requires_grad=True. Gradients will be None"]
    assert caught[0].category is UserWarning
    assert out.requires_grad is False and out.grad_fn is None
    # In a real loss something else requires grad: backward runs, gradients are silently None.
    anchor = torch.ones(1, requires_grad=True)
    (out.sum() + anchor.sum()).backward()
    assert anchor.grad is not None
    assert solver.lin.weight.grad is None and solver.lin.bias.grad is None
    assert all(p.grad is None for p in hyper.parameters())


def test_torch_reentrant_first_step_alone_raises_on_backward():
    solver, _, x, deltas = _first_step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = checkpoint(solver, x, None, deltas, use_reentrant=True)
    with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad and "
                                           "does not have a grad_fn"):
        out.sum().backward()


def test_torch_reentrant_is_fine_once_a_positional_input_requires_grad():
    """The loss is specific to the first step: with h requiring grad, dict gradients flow."""
    solver, hyper, x, deltas = _first_step()
    h = torch.randn(2, 4, requires_grad=True)
    assert_checkpoint_gradient_equivalent(solver, (x, h, deltas), use_reentrant=True,
                                          params=hyper)


def test_torch_non_reentrant_first_step_is_silent_and_complete():
    solver, hyper, x, deltas = _first_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = checkpoint(solver, x, None, deltas, use_reentrant=False)
    out.sum().backward()
    assert solver.lin.weight.grad is not None
    used = [*hyper.a["input"].parameters(), *hyper.b["input"].parameters()]
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in used)


def test_torch_omitted_use_reentrant_warns_and_acts_reentrant():
    solver, _, x, deltas = _first_step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = checkpoint(solver, x, None, deltas)
    assert str(caught[0].message).startswith(
        "torch.utils.checkpoint: the use_reentrant parameter should be passed explicitly. "
        "Starting in PyTorch 2.9, calling checkpoint without use_reentrant will raise an "
        "exception.")
    assert out.requires_grad is False  # not an exception on 2.13: the reentrant default


def test_torch_reentrant_rejects_keyword_arguments():
    solver, _, x, deltas = _first_step()
    with pytest.raises(ValueError, match="Unexpected keyword arguments: h,deltas"):
        checkpoint(solver, x, h=None, deltas=deltas, use_reentrant=True)


# ----------------------------------------------------------- the check on torch itself
def test_check_holds_for_torch_non_reentrant_first_step():
    solver, hyper, x, deltas = _first_step()
    assert_checkpoint_gradient_equivalent(solver, (x, None, deltas), use_reentrant=False,
                                          params=hyper)


def test_check_catches_torch_reentrant_first_step():
    solver, hyper, x, deltas = _first_step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(InvariantViolation) as info:
            assert_checkpoint_gradient_equivalent(solver, (x, None, deltas),
                                                  use_reentrant=True, params=hyper)
    text = str(info.value)
    assert text.startswith("[S4] assert_checkpoint_gradient_equivalent: expected "
                           "torch.utils.checkpoint(use_reentrant=True)")
    assert "out.requires_grad is False with checkpointing but True without" in text
    assert "7 of 7 tensors that get a gradient without checkpointing get None with it" in text
    assert "step.lin.weight" in text and "params.a.input.weight" in text
    assert "args[2]['w']" in text
    assert "Use use_reentrant=False" in text


def test_check_names_a_single_tensor_passed_as_params():
    solver, hyper, x, deltas = _first_step()
    w = hyper.a["input"].weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(InvariantViolation, match=r"get None with it: .*params[,;]"):
            assert_checkpoint_gradient_equivalent(solver, (x, None, deltas),
                                                  use_reentrant=True, params=w)


def test_check_leaves_callers_grads_untouched():
    solver, hyper, x, deltas = _first_step()
    solver.lin.weight.grad = torch.full_like(solver.lin.weight, 7.0)
    assert_checkpoint_gradient_equivalent(solver, (x, None, deltas), use_reentrant=False)
    assert torch.equal(solver.lin.weight.grad, torch.full_like(solver.lin.weight, 7.0))
    assert hyper.a["input"].weight.grad is None


def test_check_runs_the_step_once_plainly_then_checkpointed():
    """No separate probe: the plain run finds the upstream leaves and is the yardstick."""
    solver, hyper, x, deltas = _first_step()
    calls = []

    def step(*args):
        calls.append(torch.is_grad_enabled())
        return solver(*args)

    assert_checkpoint_gradient_equivalent(step, (x, None, deltas), use_reentrant=False,
                                          params=hyper)
    assert len(calls) == 3  # plain, checkpointed forward, its recomputation during backward


# ----------------------------------------------------------- a user's function, never seen
def test_check_on_a_user_function_with_nested_dicts_none_and_kwargs():
    torch.manual_seed(3)
    enc, film, upstream = nn.Linear(3, 5), nn.Linear(5, 10), nn.Linear(2, 5)

    def user_step(tokens, state, extras, *, scales=None, mode="sum"):
        # tokens (B, 3); state None or (B, 5); extras {"bias": {"a": t, "b": None}, "mix": [t]}
        z = enc(tokens) + extras["bias"]["a"]
        if state is not None:
            z = z * torch.sigmoid(state)
        gamma, beta = film(z).chunk(2, -1)
        z = gamma * z + beta + extras["mix"][0]
        if scales is not None:
            z = z * scales["s"]
        return {"out": z.relu(), "aux": (z.mean(), None), "tag": mode}

    tokens = torch.randn(4, 3)
    extras = {"bias": {"a": upstream(torch.randn(4, 2)), "b": None},
              "mix": [torch.randn(4, 5, requires_grad=True)]}
    scales = {"s": torch.rand(5, requires_grad=True)}
    assert_checkpoint_gradient_equivalent(user_step, (tokens, None, extras),
                                          {"scales": scales, "mode": "sum"},
                                          use_reentrant=False)


def test_check_catches_a_user_checkpoint_that_detaches_dict_tensors():
    """A hand-written 'checkpoint' that detaches every tensor in dicts loses upstream grads."""
    solver, hyper, x, deltas = _first_step()
    h = torch.randn(2, 4, requires_grad=True)

    def detaching_checkpoint(fn, *args):
        args = [{k: v.detach() for k, v in a.items()} if isinstance(a, dict) else a
                for a in args]
        return checkpoint(fn, *args, use_reentrant=False)

    with pytest.raises(InvariantViolation, match=r"5 of 8 tensors .* get None with it: "
                                                 r"args\[2\]\['w'\], params\.a\.input"):
        assert_checkpoint_gradient_equivalent(solver, (x, h, deltas),
                                              checkpoint=detaching_checkpoint, params=hyper)


def test_check_catches_recompute_without_rng_state():
    """preserve_rng_state=False: dropout differs on recompute; outputs agree, gradients do not."""
    lin = nn.Linear(4, 4)

    def step(x, h, d):
        return nn.functional.dropout(lin(x) + d["w"], 0.5, training=True)

    x = torch.randn(3, 4, requires_grad=True)
    d = {"w": torch.randn(3, 4, requires_grad=True)}
    assert_checkpoint_gradient_equivalent(
        step, (x, None, d), checkpoint=functools.partial(checkpoint, use_reentrant=False))
    with pytest.raises(InvariantViolation, match=r"grad of args\[0\]: \d+ / 12 elements"):
        assert_checkpoint_gradient_equivalent(
            step, (x, None, d),
            checkpoint=functools.partial(checkpoint, use_reentrant=False,
                                         preserve_rng_state=False))


# ----------------------------------------------------------- Hypothesis: structures
_HYPER = HyperLoRA(4, 2, 0.1)
_VEC = nn.Linear(4, 4)
_STEPS = {d: TreeStep(d) for d in range(1, 5)}


def _materialise(layout, seed, dtype=torch.float32):
    d = layout.hidden
    hyper, vec = _HYPER.to(dtype), _VEC.to(dtype)
    return layout.materialise(
        generator=torch.Generator().manual_seed(seed), dtype=dtype,
        upstream_vector=lambda c: vec(nn.functional.pad(c, (0, 4 - d)))[:, :d],
        upstream_matrix=lambda c: hyper(nn.functional.pad(c, (0, 4 - d)))["input"][:, :d, :d])


@given(layout=argument_layouts(), seed=st.integers(0, 100),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
@example(layout=ArgumentLayout(1, 1, "const", None, {}), seed=0, dtype=torch.float32)
@example(layout=ArgumentLayout(2, 3, "grad", "upstream", {"w": {"b": {"ih": "upstream"}}},
                               ("h", "deltas")), seed=1, dtype=torch.float64)
def test_non_reentrant_holds_for_every_structure(layout, seed, dtype):
    step = _STEPS[layout.hidden].to(dtype)
    args, kwargs = _materialise(layout, seed, dtype)
    assert_checkpoint_gradient_equivalent(step, args, kwargs, use_reentrant=False, seed=seed)


@given(layout=argument_layouts(allow_kwargs=False), seed=st.integers(0, 100))
def test_reentrant_fails_exactly_when_no_positional_input_requires_grad(layout, seed):
    """The harness's model of the bug, checked against torch on every drawn structure."""
    step = _STEPS[layout.hidden].to(torch.float32)
    args, kwargs = _materialise(layout, seed)
    positional_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if positional_grad:
            assert_checkpoint_gradient_equivalent(step, args, use_reentrant=True, seed=seed)
        else:
            with pytest.raises(InvariantViolation, match="get None with it"):
                assert_checkpoint_gradient_equivalent(step, args, use_reentrant=True, seed=seed)


@pytest.mark.parametrize("predicate", [
    lambda l: l.h is None and l.x == "const" and isinstance(l.deltas, dict)
    and "upstream" in l.deltas.values(),                                 # the seed's first step
    lambda l: l.deltas == {},
    lambda l: l.deltas is None,
    lambda l: isinstance(l.deltas, dict) and any(
        isinstance(v, dict) and any(isinstance(w, dict) for w in v.values())
        for v in l.deltas.values()),                                     # nesting depth 2
    lambda l: l.as_kwargs == ("h", "deltas"),
    lambda l: l.batch == 1 and l.hidden == 1,
], ids=["first_step", "empty_dict", "no_dict", "nested_depth_2", "kwargs", "batch1_hidden1"])
def test_argument_layouts_reach_the_edges(predicate):
    find(argument_layouts(), predicate, settings=settings(max_examples=2000, database=None))


def test_argument_layouts_never_exceed_depth_or_use_kwargs_when_told():
    def depth(spec):
        return 1 + max((depth(v) for v in spec.values()), default=0) \
            if isinstance(spec, dict) else 0

    @settings(database=None)  # max_examples from the profile (ci 100, thorough 1000)
    @given(argument_layouts(max_depth=1, allow_kwargs=False, allow_none=False))
    def prop(layout):
        assert layout.as_kwargs == () and layout.h is not None and layout.deltas is not None
        assert depth(layout.deltas) <= 2
    prop()


# ----------------------------------------------------------- bad input, table-driven
def _solver_args():
    solver, hyper, x, deltas = _first_step()
    return solver, (x, None, deltas)


def _nan_args():
    solver, (x, h, deltas) = _solver_args()
    x = x.clone()
    x[0, 1] = math.nan
    return solver, (x, h, deltas)


BAD_CALLS = [
    ("step_not_callable", lambda: (42, (), {}, {"use_reentrant": False}), r"step=42: must be callable"),
    ("checkpoint_not_callable", lambda: (*_solver_args(), {}, {"checkpoint": "ckpt"}),
     r"checkpoint='ckpt': must be callable"),
    ("kwargs_with_reentrant", lambda: (Solver(), (torch.randn(2, 4),),
                                       {"h": None, "deltas": {"w": torch.zeros(2, 4, 4)}},
                                       {"use_reentrant": True}),
     r"kwargs=\['deltas', 'h'\] with use_reentrant=True: the reentrant checkpoint mode cannot "
     r"take keyword arguments"),
    ("mode_omitted", lambda: (*_solver_args(), {}, {}),
     r"use_reentrant=None: say which torch.utils.checkpoint mode to test"),
    ("mode_not_bool", lambda: (*_solver_args(), {}, {"use_reentrant": "no"}),
     r"use_reentrant='no': must be True, False or None"),
    ("args_not_tuple", lambda: (Solver(), torch.randn(2, 4), {}, {"use_reentrant": False}),
     r"args=Tensor\(shape=\(2, 4\).*must be a tuple"),
    ("kwargs_not_mapping", lambda: (*_solver_args(), [1], {"use_reentrant": False}),
     r"kwargs=\[1\]: must be a mapping"),
    ("nan_argument", lambda: (*_nan_args(), {}, {"use_reentrant": False}),
     r"args\[0\]=.*must be finite.*index \(0, 1\)"),
    ("step_raises", lambda: (Solver(), (torch.randn(2, 3), None, {"w": torch.zeros(2, 3, 3)}),
                             {}, {"use_reentrant": False}),
     r"calling it without checkpointing failed \(RuntimeError"),
    ("no_float_output", lambda: (lambda x: x.argmax(), (torch.randn(3, requires_grad=True),), {},
                                 {"use_reentrant": False}),
     r"returned no floating-point tensor"),
    ("nothing_requires_grad", lambda: (torch.tanh, (torch.randn(3),), {},
                                       {"use_reentrant": False}),
     r"nothing requires grad"),
    ("negative_rtol", lambda: (*_solver_args(), {}, {"use_reentrant": False, "rtol": -1.0}),
     r"rtol=-1.0: must be a finite number >= 0"),
    ("empty_output", lambda: (lambda x: x[:0] * 2, (torch.randn(3, requires_grad=True),), {},
                              {"use_reentrant": False}),
     r"returned only empty floating tensors \(shapes \[\(0,\)\]\); outputs must be non-empty"),
    ("step_makes_nan", lambda: (lambda x: x / 0.0 * 0.0, (torch.randn(3, requires_grad=True),), {},
                                {"use_reentrant": False}),
     r"step\(...\) output out: 3 of 3 elements are non-finite .* without checkpointing"),
    ("nan_gradient", lambda: (lambda x: torch.sqrt(x), (torch.zeros(3, requires_grad=True),), {},
                              {"use_reentrant": False}),
     r"gradient of args\[0\] without checkpointing: 3 of 3 elements are non-finite"),
    ("params_not_iterable", lambda: (*_solver_args(), {}, {"use_reentrant": False, "params": 5}),
     r"params=5: must be a tensor, an nn.Module, a mapping or an iterable"),
    ("seed_too_big", lambda: (*_solver_args(), {}, {"use_reentrant": False, "seed": 2 ** 70}),
     r"seed=1180591620717411303424: must be an integer in \[0, 2\*\*63\)"),
]


def test_checkpointed_run_turning_nan_is_a_violation():
    """NaN compared False with every tolerance: a checkpoint that yields NaN must not pass."""
    def nan_checkpoint(fn, *args, **kwargs):
        out = checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return out * math.nan
    step, args = _solver_args()
    with pytest.raises(InvariantViolation, match=r"(?s)\[S4\].*custom checkpoint"):
        assert_checkpoint_gradient_equivalent(step, args, checkpoint=nan_checkpoint)


@pytest.mark.parametrize("build, match", refusals(BAD_CALLS))
def test_bad_input_is_named(build, match):
    step, args, kwargs, options = build()
    assert_refused(lambda: assert_checkpoint_gradient_equivalent(step, args, kwargs, **options),
                   match)


BAD_STRATEGIES = [
    ("max_batch_below_min", dict(min_batch=3, max_batch=2), r"Cannot have max_batch=2 < min_batch=3"),
    ("min_batch_zero", dict(min_batch=0), r"min_batch=0: must be an integer >= 1"),
    ("max_hidden_below_min", dict(min_hidden=2, max_hidden=1),
     r"Cannot have max_hidden=1 < min_hidden=2"),
    ("negative_depth", dict(max_depth=-1), r"max_depth=-1: must be an integer >= 0"),
    ("negative_dict_size", dict(max_dict_size=-2), r"max_dict_size=-2: must be an integer >= 0"),
]


@pytest.mark.parametrize("kwargs, match", refusals(BAD_STRATEGIES))
def test_bad_strategy_arguments_are_named(kwargs, match):
    assert_refused(lambda: argument_layouts(**kwargs), match)


def test_materialise_upstream_without_a_network_is_named():
    layout = ArgumentLayout(1, 2, "upstream", None, None)
    with pytest.raises(InvalidArgumentError, match=r"upstream_vector=None: must be given"):
        layout.materialise(generator=torch.Generator().manual_seed(0))
