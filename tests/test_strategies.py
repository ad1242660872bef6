"""The strategies reach the edges they promise, and reject bad arguments up front."""
import math

import pytest
import torch
from hypothesis import find, given, settings, strategies as st

from invariants import dtypes, float_tensors, lora_configs, values_around
from tests.common import assert_refused, refusals

REACHES = [
    ("exact zero", float_tensors(), lambda t: bool((t == 0).any())),
    ("batch 1", float_tensors(), lambda t: t.shape[0] == 1),
    ("non-contiguous", float_tensors(), lambda t: not t.is_contiguous()),
    ("bfloat16", float_tensors(dtype=dtypes()), lambda t: t.dtype == torch.bfloat16),
    ("float64", float_tensors(dtype=dtypes()), lambda t: t.dtype == torch.float64),
    ("tiny magnitude", float_tensors(min_magnitude=1e-6, max_magnitude=1e4),
     lambda t: bool(((t.abs() > 0) & (t.abs() <= 1e-6)).any())),
    ("huge magnitude", float_tensors(min_magnitude=1e-6, max_magnitude=1e4),
     lambda t: bool((t.abs() >= 1e4).any())),
    ("negative", float_tensors(), lambda t: bool((t < 0).any())),
]


@pytest.mark.parametrize("strategy,predicate", [(s, p) for _, s, p in REACHES],
                         ids=[name for name, _, _ in REACHES])
def test_float_tensors_reach(strategy, predicate):
    found = find(strategy, predicate, settings=settings(max_examples=500, database=None))
    assert predicate(found)


def test_float_tensors_respect_magnitude_bounds():
    @given(float_tensors(min_magnitude=1e-3, max_magnitude=10.0, allow_zero=False,
                         dtype=torch.float64))
    def prop(t):
        assert bool(((t.abs() >= 1e-3) & (t.abs() <= 10.0)).all()), t
        assert torch.isfinite(t).all()
    prop()


@pytest.mark.parametrize("which", ["at", "one ulp above", "one ulp below"])
def test_values_around_hits_the_float32_neighbours(which):
    bound = torch.tensor(1.0, dtype=torch.float32)
    target = {"at": bound,
              "one ulp above": torch.nextafter(bound, torch.tensor(2.0)),
              "one ulp below": torch.nextafter(bound, torch.tensor(0.0))}[which]
    found = find(values_around(1.0), lambda v: v == float(target),
                 settings=settings(max_examples=500, database=None))
    assert found == float(target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_around_reaches_one_ulp_either_side_in_every_dtype(dtype):
    bound = torch.tensor(1.0, dtype=dtype)
    eps = torch.finfo(dtype).eps
    for target in (1.0 + eps, 1.0 - eps / 2):  # the neighbours of 1.0 in this dtype
        found = find(values_around(1.0, dtype=dtype), lambda v, t=target: v == t,
                     settings=settings(max_examples=500, database=None))
        assert found == target and float(torch.tensor(found, dtype=dtype)) == found
    assert float(bound) == 1.0


@pytest.mark.parametrize("predicate", [
    lambda c: c.rank == 1,
    lambda c: c.rank == min(c.in_features, c.out_features) > 1,
    lambda c: c.in_features == 1,
    lambda c: c.scale >= 10.0,
    lambda c: c.dropout > 0,
], ids=["rank 1", "full rank", "width 1", "scale >= 10", "dropout"])
def test_lora_configs_reach(predicate):
    assert predicate(find(lora_configs(), predicate, settings=settings(max_examples=500,
                                                                        database=None)))


def test_lora_configs_accept_values_and_strategies():
    @given(lora_configs(in_features=4, out_features=st.just(3), rank=st.integers(1, 2)))
    def prop(c):
        assert (c.in_features, c.out_features) == (4, 3) and 1 <= c.rank <= 2
    prop()


BAD_ARGUMENTS = [
    ("negative max", lambda: float_tensors(max_magnitude=-1.0), r"Cannot have max_magnitude=-1"),
    ("min above max", lambda: float_tensors(min_magnitude=5, max_magnitude=1),
     r"Cannot have max_magnitude=1 < min_magnitude=5"),
    ("infinite max", lambda: float_tensors(max_magnitude=math.inf), r"max_magnitude=inf"),
    ("negative shape", lambda: float_tensors(shape=(2, -1)), r"shape=\(2, -1\)"),
    ("bound zero", lambda: values_around(0.0), r"bound=0.0: must be a finite number > 0"),
    ("ulps zero", lambda: values_around(1.0, ulps=0), r"ulps=0"),
    ("no dtypes", lambda: dtypes(include=()), r"include=\(\)"),
    ("int dtype", lambda: dtypes(include=(torch.int64,)), r"include=torch.int64"),
    ("max_features 0", lambda: lora_configs(max_features=0), r"max_features=0"),
    ("float16 max exceeded",
     lambda: float_tensors(dtype=torch.float16, max_magnitude=1e6),
     r"max_magnitude=1e\+06: exceeds the largest finite torch.float16"),
]


@pytest.mark.parametrize("make,match", refusals(BAD_ARGUMENTS))
def test_bad_strategy_arguments(make, match):
    assert_refused(make, match)


# ----------------------------------------------------------- strategy objects built once
def _drawn(strategy_for, n=60):
    """The tensors a derandomized property draws from ``strategy_for(shape)`` per example."""
    out = []

    @settings(max_examples=n, derandomize=True, database=None)
    @given(st.data())
    def prop(data):
        shape = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 6)))
        out.append(data.draw(strategy_for(shape)))
    prop()
    return out


@pytest.mark.parametrize("kwargs", [{}, {"dtype": dtypes()}, {"min_magnitude": 1e-6}],
                         ids=["default", "dtypes", "tiny"])
def test_float_tensors_reuse_changes_no_example(kwargs):
    """float_tensors called inside a property (as the catalog does) is built once per argument
    set; the examples are the ones a freshly built strategy gives."""
    from invariants import _strategies
    assert float_tensors(shape=(2, 3), **kwargs) is float_tensors(shape=(2, 3), **kwargs)
    cached = _drawn(lambda shape: float_tensors(shape=shape, **kwargs))
    fresh = _drawn(lambda shape: _strategies._float_tensors.__wrapped__(
        shape, kwargs.get("dtype", torch.float32), kwargs.get("min_magnitude", 0.0), 1e3,
        True, st.booleans()))
    assert len(cached) == len(fresh) > 10
    for a, b in zip(cached, fresh):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


def test_float_tensors_take_an_unhashable_shape():
    t = find(float_tensors(shape=[2, 3]), lambda t: True, settings=settings(database=None))
    assert t.shape == (2, 3)
