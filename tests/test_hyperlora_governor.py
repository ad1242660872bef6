"""Seed 000's norm governor (H7): the seed's collapse timeline read through the
fixed and the monitor-only governor, monotone levels, streaming == vectorised,
non-finite norms, and the clamp it enforces."""
import math

import torch
from expecttest import assert_expected_inline
from hypothesis import given

from invariants import (GOVERNOR_LEVELS, NormGovernor, assert_norm_governor_acts,
                        frobenius_norms, lora_norm_series)
from reference_models import hyperlora as ref

# Seed §1.1 "The Collapse Timeline": (first epoch, last epoch, LoRA norm, accuracy, entropy).
# The seed has no row for epochs 11-20; they are not fed (the EMA advances per observation).
SEED_TIMELINE = [
    (1, 10, 0.5, "71%→95%", "0.38→0.09"),
    (21, 30, 0.793, "95%", "~0.1"),
    (31, 40, 1.453, "96%", "~0.09"),
    (41, 50, 1.714, "96%→49%", "0.09→5.2"),
    (51, 61, 1.646, "48%", "~5.0"),
]


def _timeline_report() -> str:
    """One line per epoch where either governor's decision changes, plus the last epoch."""
    fixed, broken = ref.governor_for(ref.FIXED), ref.governor_for(ref.BROKEN)
    lines = ["epoch  norm   acc       entropy    | fixed: level    ema    stop action | "
             "broken: level action"]
    previous = None
    rows = [(e, norm, acc, ent) for first, last, norm, acc, ent in SEED_TIMELINE
            for e in range(first, last + 1)]
    for i, (epoch, norm, acc, ent) in enumerate(rows):
        f, b = fixed.update(norm), broken.update(norm)
        key = (f.level, f.early_stop, f.action, b.level, b.action)
        if key != previous or i == len(rows) - 1:
            lines.append(f"{epoch:>5}  {norm:<5.3f}  {acc:<9} {ent:<10} | {f.level:<12} "
                         f"{f.ema:6.3f} {'yes' if f.early_stop else 'no':<4} {f.action:<6} | "
                         f"{b.level:<13} {b.action}")
        previous = key
    return "\n".join(lines)


def test_seed_timeline_through_the_governors():
    """A reader of the seed expects: warn from epoch 31 (1.453 > 1.0), critical at 41
    (1.714 > 1.5) with the clamp enforced, never kill (max 1.714 < 2.0), and the EMA
    early stop at 41 (EMA 0.5·1.453 + 0.5·1.714 = 1.58 > 1.5); the pre-fix governor
    (2.0 / 5.0 / 10.0, monitor-only) says "ok" and does nothing through the collapse."""
    assert_expected_inline(_timeline_report(), """\
epoch  norm   acc       entropy    | fixed: level    ema    stop action | broken: level action
    1  0.500  71%→95%   0.38→0.09  | ok            0.500 no   none   | ok            none
   31  1.453  96%       ~0.09      | warn          1.123 no   none   | ok            none
   41  1.714  96%→49%   0.09→5.2   | critical      1.583 yes  stop   | ok            none
   61  1.646  48%       ~5.0       | critical      1.646 yes  stop   | ok            none""")


def test_broken_governor_takes_no_action_at_collapse_norm():
    broken = NormGovernor.monitor_only()
    decision = broken.update(1.714)
    assert (decision.level, decision.action, decision.early_stop) == ("ok", "none", False)
    delta = torch.full((1, 2, 2), 1.714 / 2)
    assert torch.equal(broken.clamp(delta), delta)        # no clamp either
    fixed = NormGovernor()
    assert fixed.update(1.714).level == "critical"
    assert float(frobenius_norms(fixed.clamp(delta))) <= 1.0


def test_governor_kill_and_nonfinite_norms_stop():
    g = NormGovernor()
    levels = g.decide(torch.tensor([0.0, 1.0, 1.0000001, 1.5, 1.6, 2.0, 2.1, math.inf, math.nan]))
    assert [GOVERNOR_LEVELS[i] for i in levels] == [
        "ok", "ok", "warn", "warn", "critical", "critical", "kill", "kill", "kill"]
    assert g.update(2.5).action == "stop"
    g.reset()
    nan = g.update(math.nan)
    assert (nan.level, nan.early_stop, nan.action) == ("kill", True, "stop")


@given(norms=lora_norm_series(max_size=20))
def test_decide_vectorised_matches_streaming_and_is_monotone(norms):
    g = NormGovernor()
    n = len(norms)
    t = torch.tensor(norms, dtype=torch.float64)
    streamed = [GOVERNOR_LEVELS.index(d.level) for d in g.replay(norms)]
    assert g.decide(t).tolist() == streamed
    ordered = g.decide(t.sort().values)
    assert bool((ordered[1:] >= ordered[:-1]).all())
    if n == 20:                                            # any shape, same values
        assert g.decide(t.reshape(4, 5)).reshape(-1).tolist() == streamed


@given(norms=lora_norm_series())
def test_fixed_governor_property_and_slow_ema_variant(norms):
    """H7 holds for any EMA decay: the check follows ``governor.ema_decay``."""
    assert_norm_governor_acts(NormGovernor(), norms)
    assert_norm_governor_acts(NormGovernor(ema_decay=0.9), norms)


def test_slow_ema_stops_later_on_the_seed_timeline():
    """With a per-epoch decay of 0.9 the same governor stops at epoch 49, not 41 (EMA 1.503 > 1.5)."""
    g = NormGovernor(ema_decay=0.9)
    epochs = [(e, norm) for first, last, norm, _, _ in SEED_TIMELINE for e in range(first, last + 1)]
    first_stop = next(e for e, norm in epochs if g.update(norm).early_stop)
    assert first_stop == 49
