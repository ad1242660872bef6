"""Distributed invariants on real torch.distributed (gloo, CPU, spawned processes).

Each test starts its own process group on a free loopback port, finishes under a
timeout, and leaves no process behind (spawn_group reaps them even on failure).
"""
import multiprocessing

import pytest

from invariants import (InvariantViolation, assert_ddp_step_equivalent, assert_ranks_agree,
                        ddp_equivalence, spawn_group)
from reference_models import ddp_cases

pytestmark = pytest.mark.distributed


def _no_leftover_children():
    alive = [p for p in multiprocessing.active_children() if p.is_alive()]
    assert not alive, f"leftover processes: {alive}"


def test_naive_per_rank_guard_diverges_and_reduced_guard_agrees():
    naive = spawn_group(ddp_cases.guard_decisions_worker, 2, False, timeout=30)
    with pytest.raises(InvariantViolation,
                       match=r"rank 1 disagreed at step 12: rank 0 decided 0, rank 1 decided 1"):
        assert_ranks_agree([[tuple(x) for x in h] for h in naive])
    reduced = spawn_group(ddp_cases.guard_decisions_worker, 2, True, timeout=30)
    assert_ranks_agree([[tuple(x) for x in h] for h in reduced])
    assert reduced[0][12] == [12, 1] and reduced[0][11] == [11, 0]  # both stop at 12
    _no_leftover_children()


def test_ddp_step_equals_single_process_step_lora_init():
    single, per_rank = ddp_equivalence("reference_models.ddp_cases:lora_init_step", timeout=30)
    assert float(single["grad_norm_before_clip"]) > 0.05, "the clip must bind for this test"
    assert_ddp_step_equivalent(single, per_rank)
    _no_leftover_children()


def test_per_rank_clipping_is_caught():
    single, per_rank = ddp_equivalence("reference_models.ddp_cases:lora_init_step",
                                       clip="per_rank", timeout=30)
    with pytest.raises(InvariantViolation, match=r"rank 0: (param\.|grad_norm)"):
        assert_ddp_step_equivalent(single, per_rank)
    _no_leftover_children()
