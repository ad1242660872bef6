"""CollapseGuard: the streaming driver in a training loop (warn / stop / raise)."""
import math
import warnings

import pytest
import torch

from invariants import (CollapseDetected, CollapseGuard, CollapseWarning, InvalidArgumentError,
                        SignatureConfig, scan_records)
from tests.test_signatures_logs import MODE_COLLAPSE, rlan_timeline


def _run(guard, records):
    for step, metrics in records:
        guard.update(step, metrics)
        if guard.should_stop:
            return step
    return None


def test_stop_mode_stops_the_rlan_run_at_epoch_41_after_warning_at_31():
    guard = CollapseGuard(mode="stop")
    with pytest.warns(CollapseWarning) as record:
        stopped = _run(guard, rlan_timeline())
    assert stopped == 41
    assert guard.verdict == "collapse"
    texts = [str(w.message) for w in record]
    assert any(t.startswith("[warning] lora_norm at step 31") for t in texts), texts
    assert any("[critical] lora_norm at step 41" in t for t in texts), texts


def test_guard_findings_equal_the_vectorised_scan():
    guard = CollapseGuard(mode="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        _run(guard, rlan_timeline())
    assert [f.as_json() for f in sorted(guard.findings, key=lambda f: f.sort_key())] == \
        [f.as_json() for f in scan_records(rlan_timeline())]


def test_warn_mode_never_stops():
    guard = CollapseGuard(mode="warn")
    guard.update(2, {"entropy": 0.3})  # healthy first: entropy_spike is a spike, not a level
    with pytest.warns(CollapseWarning, match=r"\[critical\] entropy_spike at step 3"):
        guard.update(3, {"entropy": 5.2})
    assert not guard.should_stop and guard.verdict == "collapse"


def test_raise_mode_raises_with_findings():
    guard = CollapseGuard(mode="raise")
    guard.update(0, {"loss": 1.0})
    with pytest.raises(CollapseDetected, match=r"non_finite at step 1: loss=nan") as exc:
        guard.update(1, {"loss": float("nan")})
    assert [f.signature for f in exc.value.findings] == ["non_finite"]


def test_raise_mode_only_warns_below_stop_on():
    guard = CollapseGuard(mode="raise")
    with pytest.warns(CollapseWarning, match="lora_norm"):
        guard.update(0, {"lora_norm": 1.2})  # warning level: no raise
    guard = CollapseGuard(mode="raise", stop_on="warning")
    with pytest.raises(CollapseDetected, match="lora_norm"):
        guard.update(0, {"lora_norm": 1.2})


def test_stop_on_warning():
    guard = CollapseGuard(mode="stop", stop_on="warning")
    with pytest.warns(CollapseWarning):
        guard.update(0, {"lora_norm": 1.2})
    assert guard.should_stop


def test_each_finding_reported_once():
    guard = CollapseGuard()
    assert guard.update(0, {"entropy": 0.2}) == []
    with pytest.warns(CollapseWarning):
        first = guard.update(1, {"entropy": 3.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = guard.update(2, {"entropy": 4.0})
    assert len(first) == 1 and again == []


@pytest.mark.parametrize("sync_every", [1, 3])
def test_tensors_none_and_samples(sync_every):
    guard = CollapseGuard(sync_every=sync_every)
    with pytest.warns(CollapseWarning):
        new = guard.update(0, {"loss": torch.tensor(float("inf")), "grad_norm": None,
                               "sample": MODE_COLLAPSE})
        if sync_every > 1:
            assert new == [] and guard.pending == 1
            new = guard.flush()
    got = sorted((f.signature, f.metric) for f in new)
    assert got == [("mode_collapse", "sample"), ("non_finite", "grad_norm"), ("non_finite", "loss"),
                   ("repetition", "sample"), ("seq_repetition", "sample")]
    assert math.isinf(next(f.value for f in new if f.metric == "loss"))


def test_metric_map_and_ignore_unknown():
    guard = CollapseGuard(metric_map={"loss": "train/loss"}, ignore_unknown=True)
    guard.update(0, {"train/loss": 1.0, "throughput": 123.0})
    with pytest.warns(CollapseWarning) as record:
        new = guard.update(1, {"train/loss": 5.0})
    plain = CollapseGuard()
    plain.update(0, {"loss": 1.0})
    with pytest.warns(CollapseWarning):
        expected = plain.update(1, {"loss": 5.0})
    assert new == expected and new, "a mapped metric must be read as its canonical name"
    assert len(record) == len(new)


def test_numpy_and_tensor_steps():
    import numpy as np
    guard = CollapseGuard()
    guard.update(np.int64(1), {"loss": 1.0})
    guard.update(torch.tensor(2), {"loss": 1.0})
    assert guard.findings == []


def test_config_is_used():
    guard = CollapseGuard(SignatureConfig(entropy_max=10.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert guard.update(0, {"entropy": 0.2}) == []
        assert guard.update(1, {"entropy": 5.2}) == []  # default entropy_max 2.0 would fire


def _reachable_bytes(root):
    """sys.getsizeof summed over every object reachable from ``root`` (types, modules and
    functions excluded), and how many there are: any list, deque, array or dict that grows
    with the number of updates shows, whatever attribute or slot holds it."""
    import gc
    import sys
    import types
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.CodeType, types.MethodType)
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total, len(seen)


def _healthy(i):
    return {"loss": 1.0 + 0.001 * (i % 7), "grad_norm": 1.0 + 0.01 * (i % 3), "accuracy": 0.5,
            "val_loss": 1.05 - 1e-6 * i, "lr": 1e-3, "entropy": 0.3, "lora_norm": 0.5,
            "z_e_step_change": 0.1}


def test_memory_is_constant_per_metric():
    """5,000 and 50,000 updates leave the guard (and everything it reaches) the same size."""
    guard = CollapseGuard(SignatureConfig(spike_window=50))
    for i in range(5_000):
        guard.update(i, _healthy(i))
    size_5k, objects_5k = _reachable_bytes(guard)
    for i in range(5_000, 50_000):
        guard.update(i, _healthy(i))
    size_50k, objects_50k = _reachable_bytes(guard)
    assert guard.findings == []
    # 45,000 more updates of 8 metrics: a per-update list would add >= 45,000 x 8 bytes
    assert size_50k - size_5k <= 1024, (size_5k, size_50k)
    assert objects_50k - objects_5k <= 16, (objects_5k, objects_50k)


def test_memory_probe_sees_a_hidden_history():
    """The probe itself has teeth: an extra list that keeps every value is seen."""
    guard = CollapseGuard()
    before, _ = _reachable_bytes(guard)
    guard._scanner.__dict__["history"] = [float(i) for i in range(1000)]
    after, _ = _reachable_bytes(guard)
    assert after - before >= 1000 * 8


@pytest.mark.parametrize("kwargs, call, match", [
    ({"mode": "panic"}, None, r"mode='panic': must be one of"),
    ({"stop_on": "fatal"}, None, r"stop_on='fatal': must be 'warning' or 'critical'"),
    ({"config": {"entropy_max": 1}}, None, r"config=.*must be a SignatureConfig"),
    ({"metric_map": {"los": "x"}}, None, r"metric_map='los': keys must be canonical"),
    ({}, (0, {"lossy": 1.0}), r"metric='lossy': unknown metric; canonical names are"),
    ({}, (0, {"loss": "high"}), r"metrics\['loss'\]='high': must be a number"),
    ({}, (0, {"sample": 3}), r"metrics\['sample'\]=3: must be a str"),
    ({}, (0, {"loss": True}), r"metrics\['loss'\]=True: must be a number"),
    ({}, (0, {"loss": "0.5"}), r"metrics\['loss'\]='0.5': must be a number"),
    ({}, (math.nan, {"loss": 1.0}), r"step=nan"),
    ({}, ("5", {"loss": 1.0}), r"step='5': must be a number"),
    ({}, (0, [("loss", 1.0)]), r"metrics=.*must be a mapping"),
    ({}, (0, {"loss": 10 ** 400}), r"metrics\['loss'\]=1000.*: integer too large for a float"),
    ({"metric_map": [("loss", "x")]}, None, r"metric_map=\[\('loss', 'x'\)\]: must be a mapping"),
    ({"sync_every": 0}, None, r"sync_every=0: must be an integer >= 1"),
    ({"sync_every": True}, None, r"sync_every=True: must be an integer >= 1"),
    ({"sync_every": 8.0}, None, r"sync_every=8.0: must be an integer >= 1"),
    ({}, (0, {"loss": torch.tensor(1 + 2j)}),
     r"metrics\['loss'\]=Tensor\(shape=\(\), dtype=torch.complex64\): must be real"),
    ({}, (0, {"loss": torch.tensor(1.0, device="meta")}),
     r"metrics\['loss'\]=Tensor\(shape=\(\), dtype=torch.float32\): is a meta tensor"),
    ({}, (0, {"loss": torch.ones(3)}),
     r"metrics\['loss'\]=Tensor\(shape=\(3,\), dtype=torch.float32\): must hold one value "
     r"\(a 0-d tensor\), got 3 elements"),
    ({}, (0, {"loss": torch.tensor(True)}), r"metrics\['loss'\]=.*bool.*: must be a number"),
    ({}, (0, {"sample": torch.tensor(1.0)}), r"metrics\['sample'\]=Tensor.*: must be a str"),
    ({}, (0, {"sample": 1.0}), r"metrics\['sample'\]=1.0: must be a str"),
    ({}, (0, {"lossy": torch.tensor(1.0)}), r"metric='lossy': unknown metric"),
    ({"metric_map": {"loss": "train/loss"}}, (0, {"los": 1.0}), r"metric='los': unknown;"),
    ({}, (10 ** 400, {"loss": 1.0}), r"step=1000.*: integer too large for a float"),
    ({}, (True, {"loss": 1.0}), r"step=True: must be a number"),
    ({}, (math.inf, {"loss": 1.0}), r"step=inf: must be finite"),
    ({}, (-math.inf, {"loss": 1.0}), r"step=-inf: must be finite"),
    ({}, (torch.tensor(1j), {"loss": 1.0}), r"step=tensor\(.*\): must be a number"),
    ({}, (0, {"loss": b"1.0"}), r"metrics\['loss'\]=b'1.0': must be a number"),
], ids=["mode", "stop_on", "config", "map-key", "unknown-metric", "non-numeric", "sample-type",
        "bool", "numeric-str",
        "nan-step", "str-step", "not-mapping", "huge-int", "map-not-mapping",
        "sync_every-0", "sync_every-bool", "sync_every-float", "complex-tensor", "meta-tensor",
        "multi-element-tensor", "bool-tensor", "sample-tensor", "sample-float",
        "unknown-metric-tensor", "unknown-mapped", "huge-int-step", "bool-step", "inf-step",
        "minus-inf-step", "complex-tensor-step", "bytes"])
def test_bad_arguments(kwargs, call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        guard = CollapseGuard(**kwargs)
        if call is not None:
            guard.update(*call)


def test_entropy_spike_from_an_untrained_start_is_not_a_collapse():
    """An untrained 10-class classifier starts near ln 10 = 2.30 > 2.0 and comes down
    (hyperlora-fixed golden run: 2.27 at step 0); only a return above 2.0 after having been
    healthy (< 0.5) is the seed-000 spike.  Attention sharpness mirrors it (< 0.1 after > 0.5)."""
    guard = CollapseGuard(mode="raise")
    for step, h in enumerate([2.27, 2.28, 1.6, 0.9, 0.7, 2.2]):  # never below 0.5
        assert guard.update(step, {"entropy": h, "attention_sharpness": 0.05 + 0.05 * step}) == []
    guard.update(6, {"entropy": 0.4, "attention_sharpness": 0.6})  # healthy now
    with pytest.raises(CollapseDetected, match="entropy_spike at step 7") as exc:
        guard.update(7, {"entropy": 2.1, "attention_sharpness": 0.09})
    assert sorted(f.signature for f in exc.value.findings) == ["attention_collapse",
                                                               "entropy_spike"]


@pytest.mark.parametrize("value", [1.0, torch.tensor(1.0)], ids=["float", "tensor"])
def test_step_must_not_go_backwards(value):
    """Checked at the update that logs it, buffered or not (the contract: non-decreasing)."""
    guard = CollapseGuard(sync_every=8)
    guard.update(10, {"loss": value})
    guard.update(10, {"loss": value})            # equal steps are allowed
    with pytest.raises(InvalidArgumentError, match=r"step=9: must be non-decreasing \(previous step "
                                                   r"was 10\)"):
        guard.update(9, {"loss": value})


@pytest.mark.parametrize("bad", [
    {"loss": torch.tensor(1.0), "grad_norm": torch.ones(2)},
    {"loss": torch.tensor(1.0), "accuracy": "high"},
    {"loss": torch.tensor(1.0), "lossy": 1.0},
], ids=["multi-element", "non-numeric", "unknown"])
def test_an_update_that_raises_logs_nothing(bad):
    guard = CollapseGuard(sync_every=8)
    guard.update(0, {"loss": torch.tensor(1.0)})
    with pytest.raises(InvalidArgumentError):
        guard.update(1, bad)
    assert guard.pending == 1
    guard.update(1, {"loss": torch.tensor(1.0)})     # step 1 was not taken by the bad update
    assert guard.flush() == [] and guard.pending == 0
