"""Golden runs: each run is one item (xdist spreads them), compared with its golden curve.

Regenerate after an intended change: ``pytest -m golden --golden-update`` (this device key
only), or ``invariants golden --update``.
"""
import re
from dataclasses import replace

import pytest

from invariants import InvariantViolation
from invariants.golden import execute_memoized, mechanism_problems
from invariants.golden.run import execute
from reference_models import lora_init
from reference_models.golden_runs import LORA_KWARGS, RUNS


@pytest.mark.golden
@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_golden_run(run, golden):
    """Curves and findings match the golden; fixed: no collapse; broken: its seed's signature."""
    curves = golden.check(run)
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
def test_two_cpu_runs_are_bit_identical(run):
    """A fresh execution equals the one the other golden tests of this process read."""
    first, second = execute_memoized(run, "cpu"), execute(run, "cpu")
    assert first == second, f"{run.name}: two seeded CPU runs differ"


@pytest.mark.golden
def test_removing_the_fix_fails_the_fixed_golden(golden, tmp_path):
    """Swap the zero-init fix for the seed's random init behind the fixed run's name and config."""
    fixed = next(r for r in RUNS if r.name == "lora_init-fixed")
    unfixed = replace(fixed, fn=lambda seed, device: lora_init.finetune_curves(
        lora_init.BROKEN, seed=seed, **LORA_KWARGS))
    golden.output_dir = tmp_path
    golden.update = False
    with pytest.raises(InvariantViolation) as info:
        golden.check(unfixed)
    text = str(info.value)
    assert re.search(r"kl_from_base: \d+/31 points outside tolerance; worst at step \d+: golden [-\d.e]+, obtained [-\d.e]+", text), text
    assert f"plot: {tmp_path}/lora_init-fixed.cpu.obtained.png" in text
    assert (tmp_path / "lora_init-fixed.cpu.obtained.json").exists()
