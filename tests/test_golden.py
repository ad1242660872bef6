"""Golden runs: each run is one item (xdist spreads them), compared with its golden curve.

Regenerate after an intended change: ``pytest -m golden --golden-update`` (this device key
only), or ``invariants golden --update``.
"""
import re
from dataclasses import replace

import pytest

from invariants import InvariantViolation
from invariants._golden import _execute
from reference_models import lora_init
from reference_models.golden_runs import RUNS


@pytest.mark.golden
@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_golden_run(run, golden):
    curves = golden.check(run)
    if run.check is not None:
        run.check(curves)


@pytest.mark.golden
@pytest.mark.gpu
@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_golden_run_cuda(run, golden):
    """The same runs on CUDA, compared with the cuda-smXY key (skips without CUDA)."""
    import torch
    golden.device = torch.device("cuda")
    curves = golden.check(run)
    if run.check is not None:
        run.check(curves)


@pytest.mark.golden
@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_two_cpu_runs_are_bit_identical(run):
    first, second = _execute(run, "cpu"), _execute(run, "cpu")
    assert first == second, f"{run.name}: two seeded CPU runs differ"


@pytest.mark.golden
def test_removing_the_fix_fails_the_fixed_golden(golden, tmp_path):
    """Swap the zero-init fix for the seed's random init behind the fixed run's name and config."""
    fixed = next(r for r in RUNS if r.name == "lora_init-fixed")
    kwargs = {"pretrain_steps": 100, "finetune_steps": 30}
    unfixed = replace(fixed, fn=lambda seed, device: lora_init.finetune_curves(
        lora_init.BROKEN, seed=seed, **kwargs))
    golden.output_dir = tmp_path
    golden.update = False
    with pytest.raises(InvariantViolation) as info:
        golden.check(unfixed)
    text = str(info.value)
    assert re.search(r"kl_from_base: \d+/31 points outside tolerance; worst at step \d+: golden [-\d.e]+, obtained [-\d.e]+", text), text
    assert f"plot: {tmp_path}/lora_init-fixed.cpu.obtained.png" in text
    assert (tmp_path / "lora_init-fixed.cpu.obtained.json").exists()
