"""Golden runs: each run is one item (xdist spreads them), compared with its golden curve.

Each run's curves are computed ONCE per session and shared by every test and xdist worker that
reads them (``curves_of``; tests/shared_group.py); the determinism test executes each run a
second time, afresh, in its own process. Regenerate after an intended change:
``pytest -m golden --golden-update`` (this device key only), or ``invariants golden --update``.
"""
import re
from dataclasses import replace

import pytest

from invariants import InvariantViolation
from invariants.golden import mechanism_problems
from invariants.golden.run import execute
from reference_models.golden_runs import RUNS
from tests.shared_group import shared_run_curves


@pytest.fixture
def curves_of(request, tmp_path_factory):
    """``curves_of(run)``: the run's CPU curves, executed once per session across workers."""
    return lambda run: shared_run_curves(tmp_path_factory, request, run)


@pytest.mark.golden
@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_golden_run(run, golden, curves_of):
    """Curves and findings match the golden; fixed: no collapse; broken: its seed's signature."""
    curves = golden.check(run, curves=None if golden.update or golden.device.type != "cpu"
                          else curves_of(run))
    assert not mechanism_problems(run, curves)


def test_every_system_has_a_fixed_and_a_broken_run():
    names = {r.name for r in RUNS}
    for system in ("hyperlora", "staged_modules", "curriculum_lm", "lora_init",
                   "evolving_context"):
        assert {f"{system}-fixed", f"{system}-broken"} <= names, system
    for run in RUNS:
        assert run.kind == run.name.rsplit("-", 1)[1], run.name
        if run.kind == "broken":
            assert run.signatures or run.check, f"{run.name}: states no mechanism to show"
        twin = next(r for r in RUNS if r.name == run.name.rsplit("-", 1)[0] + "-fixed")
        assert run.signature_config == twin.signature_config, (
            f"{run.name}: a detector setting must apply equally to the fixed run")


@pytest.mark.golden
@pytest.mark.gpu
@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_golden_run_cuda(run, golden):
    """The same runs on CUDA, compared with the cuda-smXY key (skips without CUDA)."""
    import torch
    golden.device = torch.device("cuda")
    curves = golden.check(run)
    assert not mechanism_problems(run, curves)


@pytest.mark.golden
@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_two_cpu_runs_are_bit_identical_and_built_on_the_device_given(run, curves_of):
    """A fresh execution equals the session's shared one (often made by another process), and
    it is made with torch's default device set to "meta": any tensor a run made without an
    explicit device would be a meta tensor, and the run would fail or differ."""
    import torch
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        obtained = execute(run, "cpu")
    finally:
        torch.set_default_device(previous)
    # read the shared execution second: another worker is often still making it, and this
    # worker's own execution overlaps that instead of waiting on the lock
    expected = curves_of(run)
    assert obtained == expected, (
        f"{run.name}: two seeded CPU runs differ, or the run depends on torch's default device")


SYSTEMS = sorted({r.name.rsplit("-", 1)[0] for r in RUNS})


@pytest.mark.golden
@pytest.mark.parametrize("system", SYSTEMS)
def test_removing_the_fix_fails_the_fixed_golden(system, golden, curves_of, tmp_path):
    """The fixed run's name and config with the broken run's training: the comparison fails by
    collapsing (its golden has no findings), names the first differing metric and writes the
    obtained curves and a plot that shows where. Its curves are the broken run's own (same
    training function, same seed), shared with the broken run's golden test."""
    fixed = next(r for r in RUNS if r.name == f"{system}-fixed")
    broken = next(r for r in RUNS if r.name == f"{system}-broken")
    assert fixed.seed == broken.seed, f"{system}: the pair must share its seed"
    unfixed = replace(fixed, fn=broken.fn)
    golden.output_dir = tmp_path
    golden.update = False
    with pytest.raises(InvariantViolation) as info:
        golden.check(unfixed, curves=curves_of(broken))
    text = str(info.value)
    assert re.search(r"points outside tolerance; worst at step \d+: golden [-\d.e]+, obtained "
                     r"[-\d.e]+", text), text
    assert "the fixed run shows collapse signatures" in text and "'critical'" in text, text
    assert f"plot: {tmp_path}/{system}-fixed.cpu.obtained.png" in text
    assert (tmp_path / f"{system}-fixed.cpu.obtained.json").exists()
    assert (tmp_path / f"{system}-fixed.cpu.obtained.png").stat().st_size > 0
