"""No host-device sync per step (issue 18.3, 16.7): ``CollapseGuard.update`` with tensor
values, ``clamp_frobenius``, ``NormGovernor.decide/clamp/update``.

A ``TorchFunctionMode`` counts every call that reads a tensor's value to the host
(``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.numpy()``...).
On CPU these are the calls that are host-device syncs on a GPU. The guard must make none
between syncs and exactly one (a ``.tolist()``) at each sync; its findings must equal those
of ``sync_every=1`` fed plain floats, with the true step, surfacing at most
``sync_every - 1`` updates late.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from invariants import (CollapseDetected, CollapseGuard, CollapseWarning, NormGovernor,
                        clamp_frobenius, scan_records)

_READS = frozenset({"item", "__float__", "__int__", "__index__", "__bool__", "tolist", "cpu",
                    "numpy", "__array__", "__format__", "__repr__"})


class HostReads(TorchFunctionMode):
    """Counts tensor-to-host reads by name while active (``reads``, a Counter)."""

    def __init__(self):
        super().__init__()
        self.reads: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.reads.values())


# ----------------------------------------------------------------- the counter has teeth
@pytest.mark.parametrize("read, name", [
    (lambda t: t.item(), "item"), (lambda t: float(t), "__float__"),
    (lambda t: int(t), "__int__"), (lambda t: bool(t > 0), "__bool__"),
    (lambda t: t.tolist(), "tolist"), (lambda t: t.cpu(), "cpu"),
    (lambda t: t.numpy(), "numpy"), (lambda t: 1.0 if t > 0.5 else 0.0, "__bool__"),
], ids=["item", "float", "int", "bool", "tolist", "cpu", "numpy", "python-if"])
def test_the_counter_sees_every_kind_of_host_read(read, name):
    t = torch.tensor(0.75)
    with HostReads() as m:
        read(t)
    assert m.reads == Counter({name: 1}), m.reads


# ------------------------------------------------------------------ the guard
def _timeline(n: int = 150) -> list[tuple[int, dict]]:
    """Healthy, then a loss jump at 60, a NaN grad norm at 90 and a LoRA-norm runaway from
    110: float32/float64/int64 tensors mixed with Python floats (``lr``)."""
    out = []
    for i in range(n):
        loss = 2.0 * 0.99 ** i + 0.01 * (i % 3)
        r = {"loss": torch.tensor(loss * (6.0 if i == 60 else 1.0), dtype=torch.float32),
             "grad_norm": torch.tensor(math.nan if i == 90 else 1.0 + 0.01 * (i % 5),
                                       dtype=torch.float64),
             "lora_norm": torch.tensor(0.5 if i < 110 else 0.5 + 0.02 * (i - 110)),
             "nan_batches": torch.tensor(i // 40, dtype=torch.int64),
             "lr": 1e-3}
        out.append((i, r))
    return out


def _as_floats(records):
    return [(s, {k: float(v) for k, v in r.items()}) for s, r in records]


def _run(guard, records, reads=None):
    """Feed every record; returns [(update index, finding)] in the order they surfaced and,
    with ``reads``, the host reads each update made."""
    surfaced, per_update = [], []
    for i, (step, metrics) in enumerate(records):
        before = reads.total if reads is not None else 0
        surfaced += [(i, f) for f in guard.update(step, metrics)]
        per_update.append((reads.total if reads is not None else 0) - before)
    before = reads.total if reads is not None else 0
    surfaced += [(len(records), f) for f in guard.flush()]
    per_update.append((reads.total if reads is not None else 0) - before)
    return surfaced, per_update


@pytest.mark.parametrize("sync_every", [1, 2, 7, 64])
def test_guard_reads_once_per_sync_and_finds_what_sync_every_1_finds(sync_every):
    records = _timeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        reference = CollapseGuard(sync_every=1)
        _run(reference, _as_floats(records))
        guard = CollapseGuard(sync_every=sync_every)
        with HostReads() as m:
            surfaced, per_update = _run(guard, records, m)
    assert set(m.reads) <= {"tolist"}, m.reads
    n = len(records)
    expected = [1 if (i + 1) % sync_every == 0 else 0 for i in range(n)] \
        + [1 if n % sync_every else 0]                      # flush: the partial buffer
    assert per_update == expected, (
        f"host reads per update (sync_every={sync_every}): first differing update "
        f"{next(i for i, (a, b) in enumerate(zip(per_update, expected)) if a != b)}")
    got = [f.as_json() for f in guard.findings]
    assert got == [f.as_json() for f in reference.findings]
    assert sorted(got, key=lambda f: (f["step"], f["signature"])) == sorted(
        (f.as_json() for f in scan_records(_as_floats(records))),
        key=lambda f: (f["step"], f["signature"]))
    # the timeline has teeth whatever the loss rules are: a loss finding, the NaN, the runaway
    assert {"loss", "grad_norm", "lora_norm"} <= {f.metric for f in guard.findings}
    assert ("non_finite", 90) in {(f.signature, f.step) for f in guard.findings}
    for i, f in surfaced:
        assert 0 <= i - f.step <= sync_every - 1, (
            f"{f.signature} of step {f.step} surfaced at update {i}, more than "
            f"sync_every - 1 = {sync_every - 1} updates late")


@pytest.mark.parametrize("make", [
    lambda x, i: torch.tensor(x, dtype=torch.bfloat16),
    lambda x, i: torch.tensor(x, dtype=torch.float16),
    lambda x, i: torch.tensor(round(x * 1000) if math.isfinite(x) else 2 ** 31 - 1,
                              dtype=torch.int32),
    lambda x, i: torch.tensor([x]),                               # one element, not 0-d
    lambda x, i: torch.tensor(x).reshape(1, 1) if i % 2 else torch.tensor(x),  # mixed shapes
    lambda x, i: torch.tensor(x, dtype=torch.float64 if i % 3 else torch.float32),
], ids=["bfloat16", "float16", "int32", "shape-1", "mixed-shapes", "mixed-dtypes-over-steps"])
def test_every_real_dtype_and_one_element_shape_gives_the_float_findings(make):
    """What is scanned is exactly float(tensor), whatever path the update takes (``i`` is
    the step plus the metric's position, so "mixed" rows mix within one update too)."""
    raw = [(i, {"loss": 2.0 * 0.97 ** i * (8.0 if i == 30 else 1.0),
                "grad_norm": math.inf if i == 41 else 1.0 + 0.1 * (i % 4)}) for i in range(60)]
    tensors = [(i, {k: make(v, i + j) for j, (k, v) in enumerate(r.items())}) for i, r in raw]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        ref = CollapseGuard(sync_every=1)
        _run(ref, _as_floats(tensors))
        guard = CollapseGuard(sync_every=7)
        with HostReads() as m:
            _run(guard, tensors)
    assert [f.as_json() for f in guard.findings] == [f.as_json() for f in ref.findings]
    if make(1.0, 0).is_floating_point():
        assert ("non_finite", 41) in {(f.signature, f.step) for f in guard.findings}
    assert guard.findings, "the loss jump at step 30 must be found"
    assert m.total == math.ceil(60 / 7), m.reads


def test_nan_is_reported_at_its_own_step_after_the_buffer_is_read():
    guard = CollapseGuard(sync_every=8)
    for step in range(5):
        assert guard.update(step, {"loss": torch.tensor(math.nan if step == 3 else 1.0)}) == []
    assert guard.findings == [] and guard.pending == 5
    with pytest.warns(CollapseWarning, match=r"non_finite at step 3"):
        new = guard.flush()
    assert [(f.signature, f.step) for f in new] == [("non_finite", 3)]
    assert guard.pending == 0 and guard.flush() == []


def test_context_manager_flushes_the_last_partial_buffer():
    with pytest.warns(CollapseWarning, match="non_finite at step 2"):
        with CollapseGuard(sync_every=64) as guard:
            for step in range(3):
                guard.update(step, {"loss": torch.tensor(math.inf if step == 2 else 1.0)})
    assert [f.step for f in guard.findings] == [2]


def test_a_logged_tensor_edited_in_place_afterwards_is_scanned_as_logged():
    guard = CollapseGuard(sync_every=4)
    acc = torch.tensor(1.0)
    for step in range(3):
        guard.update(step, {"loss": acc})
        acc.fill_(math.nan)          # e.g. an accumulator reset after logging
        acc.fill_(1.0)
    acc.fill_(math.nan)
    assert guard.flush() == []


def test_tensors_that_require_grad_are_logged_without_keeping_the_graph():
    w = torch.tensor(2.0, requires_grad=True)
    guard = CollapseGuard(sync_every=4)
    guard.update(0, {"loss": w * 3.0})
    (chunk,) = guard._chunks[torch.device("cpu")]
    assert not chunk.requires_grad and chunk.grad_fn is None


def test_stop_mode_stops_within_sync_every_updates_of_the_finding():
    records = [(i, {"lora_norm": torch.tensor(0.5 if i < 20 else 2.5)}) for i in range(40)]
    guard = CollapseGuard(mode="stop", sync_every=8)
    with pytest.warns(CollapseWarning):
        stopped = next(i for i, (s, m) in enumerate(records)
                       if guard.update(s, m) is not None and guard.should_stop)
    assert stopped == 23 and guard.findings[0].step == 20   # read at the 24th update


@pytest.mark.parametrize("sync_every", [1, 2, 7, 64])
def test_raise_mode_raises_at_the_sync_and_keeps_the_rest_buffered(sync_every):
    """Catch and continue: the findings (and the exceptions' findings) equal sync_every=1."""
    records = _timeline(130)

    def run(guard, recs):
        raised = []
        for step, metrics in recs:
            try:
                guard.update(step, metrics)
            except CollapseDetected as exc:
                raised += [f.as_json() for f in exc.findings]
        while guard.pending:
            try:
                guard.flush()
            except CollapseDetected as exc:
                raised += [f.as_json() for f in exc.findings]
        return raised, [f.as_json() for f in guard.findings]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        expected = run(CollapseGuard(mode="raise", sync_every=1), _as_floats(records))
        got = run(CollapseGuard(mode="raise", sync_every=sync_every), records)
    assert expected[0], "the timeline must trigger CollapseDetected"
    assert got == expected


def test_python_numbers_with_nothing_buffered_go_straight_through():
    guard = CollapseGuard(sync_every=64)
    with HostReads() as m:
        guard.update(0, {"loss": 1.0})
        with pytest.warns(CollapseWarning, match="non_finite at step 1"):
            assert len(guard.update(1, {"loss": math.nan})) == 1
    assert m.total == 0 and guard.pending == 0


# ------------------------------------------------------------------ clamp and governor
def _deltas(dtype):
    base = torch.randn(6, 8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base[0] *= 0.0                     # zero
    base[1] *= 1e-30                   # tiny
    base[2] *= 1e3                     # far above tau
    return base.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_clamp_and_governor_hot_path_make_no_host_read(dtype, layout):
    delta = _deltas(dtype)
    if layout == "transposed":
        delta = delta.transpose(-1, -2)          # non-contiguous
    g = NormGovernor()
    with HostReads() as m:
        a = clamp_frobenius(delta, 1.0)
        b = g.clamp(delta)
        levels = g.decide(torch.linalg.vector_norm(delta.double(), dim=(-2, -1)))
    assert m.total == 0, m.reads
    assert torch.equal(a, b) and levels.dtype == torch.int64


_NORMS = [0.5, 1.0, 1.0000001, 1.453, 1.5, 1.5000001, 1.714, 2.0, 2.0000001, math.nan, 0.7,
          math.inf, 1.2, 0.0, 1.6, 3.0, 0.9, 1.49]


@pytest.mark.parametrize("sync_every", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_governor_update_on_tensors_reads_once_and_matches_floats(sync_every, dtype):
    ref = NormGovernor()
    expected = [ref.update(float(torch.tensor(v, dtype=dtype))) for v in _NORMS]
    g = NormGovernor(sync_every=sync_every)
    with HostReads() as m:
        decisions, reads = [], []
        for v in _NORMS:
            before = m.total
            decisions.append(g.update(torch.tensor(v, dtype=dtype)))
            reads.append(m.total - before)
        before = m.total
        _ = decisions[-1].level                  # reading a pending decision: one read
        last_read = m.total - before
    assert set(m.reads) <= {"tolist"}, m.reads
    n = len(_NORMS)
    assert reads == [1 if (i + 1) % sync_every == 0 else 0 for i in range(n)]
    assert last_read == (1 if n % sync_every else 0)
    assert [d.step for d in decisions] == list(range(n))
    # bit-identical to the float path: norm, level, ema (repr: NaN-safe), early stop, action
    assert [repr(d) for d in decisions] == [repr(d) for d in expected]


def test_governor_pending_decision_resolves_in_order_with_float_updates_between():
    g, ref = NormGovernor(sync_every=64), NormGovernor()
    seq = [torch.tensor(1.2), 1.6, torch.tensor(1.7), torch.tensor(0.2), 2.5]  # EMA 1.55 at 1.7
    got = [g.update(v) for v in seq]
    want = [ref.update(float(v)) for v in seq]
    assert got == want and [d.action for d in got] == ["none", "clamp", "stop", "none", "stop"]


def test_governor_copies_the_norm_tensor():
    g = NormGovernor(sync_every=64)
    norm = torch.tensor(0.5)
    d = g.update(norm)
    norm.fill_(5.0)                              # in-place edit after the update
    assert (d.norm, d.level) == (0.5, "ok")


@pytest.mark.parametrize("call, match", [
    (lambda: NormGovernor().update(torch.tensor(1 + 1j)), r"norm=Tensor.*complex64.*: must be real"),
    (lambda: NormGovernor().update(torch.tensor(1.0, device="meta")), r"norm=.*: is a meta tensor"),
    (lambda: NormGovernor().update(torch.ones(2)), r"norm=.*: must hold one value .*got 2"),
    (lambda: NormGovernor().update(torch.tensor(True)), r"norm=.*bool.*: must be a number"),
    (lambda: NormGovernor(sync_every=0), r"sync_every=0: must be an integer >= 1"),
], ids=["complex", "meta", "multi-element", "bool", "sync_every-0"])
def test_governor_refuses_bad_tensor_norms(call, match):
    from invariants import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match=match):
        call()
