"""DDP equivalence and rank-consistent decisions on real torch.distributed (gloo, CPU).

Spawning a gloo group costs 2-5 s on this 2-core box and a training step costs
milliseconds, so ONE spawned group (``ddp_workers.suite_worker``) runs every job —
the five seed systems' steps, their broken variants, the checkpointing cases and
the decision loops — and the tests below judge its recorded states. Under
pytest-xdist the group is spawned once per session, shared by the workers through
a file lock (``tests/shared_group.py``); the results file is read back with
``torch.load(weights_only=True)``. The group is watched for hangs (no rank making
progress for ``spawn_group``'s ``hang_after``), not timed: a busy machine makes it
slower, not failed; ``GROUP_BACKSTOP_S`` is only an overall backstop. If it fails,
the first test reports every rank's exit code and traceback and the others skip,
naming that test. It is always reaped (``test_no_rank_process_outlives_the_group``).
"""
import multiprocessing
import os
import re
import time

import pytest
import torch

from invariants import (InvariantViolation, assert_ddp_step_equivalent, assert_ranks_agree,
                        frobenius_norms, spawn_group)
from invariants.distributed.jobs import single_process_state
from tests import ddp_steps, ddp_workers
from tests.shared_group import group_value, shared_outcome

pytestmark = pytest.mark.distributed

GROUP_BACKSTOP_S = 900
SYSTEMS = ("lora_init", "hyperlora", "staged_modules", "curriculum_lm", "evolving_context")


def _run_suite() -> dict:
    started = time.monotonic()
    ranks = spawn_group(ddp_workers.suite_worker, 2, ddp_steps.JOBS, timeout=GROUP_BACKSTOP_S)
    return {"ranks": ranks, "seconds": time.monotonic() - started}


@pytest.fixture(scope="session")
def suite_outcome(tmp_path_factory) -> dict:
    """The suite's per-rank results (or its error), spawned once per session."""
    return shared_outcome(tmp_path_factory, "ddp_suite", _run_suite)


@pytest.fixture
def suite(suite_outcome, request, tmp_path_factory) -> dict:
    return group_value(suite_outcome, request, tmp_path_factory)


def _states(suite, name):
    """(single-process state, per-rank DDP states) of one job."""
    return (single_process_state(ddp_steps.JOBS[name]),
            [rank["steps"][name] for rank in suite["ranks"]])


def _spec(name):
    factory = ddp_steps.JOBS[name]["factory"].split(":")[1]
    return getattr(ddp_steps, factory)(0)


# ------------------------------------------------------------ 1. DDP == one process
@pytest.mark.parametrize("system", SYSTEMS)
def test_ddp_step_equals_single_process_step(suite, system):
    single, per_rank = _states(suite, system)
    cap, norm = _spec(system).max_norm, float(single["grad_norm_before_clip"])
    assert norm > cap, f"{system}: the clip must bind (pre-clip norm {norm:.4g} <= cap " \
                       f"{cap:g}), else global vs per-rank clipping cannot differ"
    assert any(k.startswith("grad.") for k in single) and any(k.startswith("param.")
                                                              for k in single)
    assert_ddp_step_equivalent(single, per_rank)


def test_hyperlora_clamp_binds_and_agrees_under_ddp(suite):
    single, per_rank = _states(suite, "hyperlora")
    spec = ddp_steps.hyperlora_step(0)
    with torch.no_grad():  # the step's own forward: raw deltas exceed τ = 1.0 on the batch
        raw = frobenius_norms(spec.model.hyperlora.raw_deltas(spec.batch[2]))
    assert float(raw.max()) > 1.0 and float(raw.min()) < 1.0, \
        f"the clamp must bind on some samples and not others (raw ‖ΔW_i‖F in " \
        f"[{float(raw.min()):.3g}, {float(raw.max()):.3g}])"
    for rank, state in enumerate(per_rank):  # after the step, still clamped, on every rank
        assert float(state["clamped_delta_norms"].max()) <= 1.0, f"rank {rank}"
    assert_ddp_step_equivalent({k: v for k, v in single.items() if "delta_norms" in k},
                               per_rank)


def test_staged_modules_ema_weights_agree_under_ddp(suite):
    single, per_rank = _states(suite, "staged_modules")
    ema = {k: v for k, v in single.items() if k.startswith("ema.")}
    assert len(ema) == sum(1 for k in single if k.startswith("param."))
    assert_ddp_step_equivalent(ema, per_rank)


def test_evolving_context_smoothed_context_agrees_under_ddp(suite):
    single, per_rank = _states(suite, "evolving_context")
    observed = {k: single[k] for k in ("context_z_e", "encoder_grad_share")}
    assert observed["context_z_e"].shape == (3, 8, 4, 16)  # (ACT steps, B, L, D)
    assert_ddp_step_equivalent(observed, per_rank)


@pytest.mark.parametrize("system", SYSTEMS)
def test_per_rank_clipping_is_caught(suite, system):
    single, per_rank = _states(suite, f"{system}_per_rank_clip")
    with pytest.raises(InvariantViolation,
                       match=r"observed: rank 0: (grad\.\S+|param\.\S+|grad_norm_before_clip): "
                             r"\d+ / \d+ elements"):
        assert_ddp_step_equivalent(single, per_rank)


def test_per_rank_clipping_reports_the_local_norm(suite):
    """The message names the quantity: the pre-clip norm each rank saw is its shard's."""
    single, per_rank = _states(suite, "hyperlora_per_rank_clip")
    local = [float(state["grad_norm_before_clip"]) for state in per_rank]
    assert local[0] != local[1]  # each rank clipped with its own shard's norm
    with pytest.raises(InvariantViolation, match=re.escape(
            f"rank 0: grad_norm_before_clip: 1 / 1 elements (100.0%) differ beyond rtol=1.3e-06, "
            f"atol=1e-05; greatest absolute difference "
            f"{abs(local[0] - float(single['grad_norm_before_clip'])):.6g} at index () "
            f"(actual {local[0]:.6g}, expected {float(single['grad_norm_before_clip']):.6g})")):
        assert_ddp_step_equivalent({"grad_norm_before_clip": single["grad_norm_before_clip"]},
                                   per_rank)


# ------------------------------------------------ losses that are not a mean over shards
def test_summed_decay_term_needs_the_world_size_under_ddp(suite):
    """Seed 000's λ·Σ_i‖ΔW_i‖F² is a sum over samples: DDP's gradient average halves it."""
    single, per_rank = _states(suite, "hyperlora_seed_loss")
    with pytest.raises(InvariantViolation, match=r"rank 0: grad\.\S+: \d+ / \d+ elements(.|\n)*"
                                                 r"grad\.hyperlora\.trunk\.weight"):
        assert_ddp_step_equivalent(single, per_rank)


def test_per_rank_token_mean_differs_from_the_global_token_mean(suite):
    """Seed 002's lm_loss averages over each rank's non-pad tokens; shards differ in count."""
    single, per_rank = _states(suite, "curriculum_lm_seed_loss")
    tokens = _spec("curriculum_lm_seed_loss").batch[0][:, 1:]
    counts = [int((half != 0).sum()) for half in tokens.chunk(2)]
    assert counts[0] != counts[1], counts
    with pytest.raises(InvariantViolation, match=r"rank 0: grad\.\S+: \d+ / \d+ elements"):
        assert_ddp_step_equivalent(single, per_rank)


# ------------------------------------------------------ 2. checkpointing under DDP (S4)
@pytest.mark.parametrize("name", ["staged_modules_ckpt", "first_step_nonreentrant"])
def test_nonreentrant_checkpoint_under_ddp_equals_plain_single_process_step(suite, name):
    single, per_rank = _states(suite, name)  # reference: the NON-checkpointed model
    assert ddp_steps.JOBS[name]["reference"] != ddp_steps.JOBS[name]["factory"]
    assert_ddp_step_equivalent(single, per_rank)


def test_nonreentrant_checkpoint_under_ddp_is_bit_identical_to_plain_ddp(suite):
    """Recomputation in backward replays the same kernels: not even a rounding difference."""
    for rank in suite["ranks"]:
        plain, ckpt = rank["steps"]["staged_modules"], rank["steps"]["staged_modules_ckpt"]
        assert plain.keys() == ckpt.keys()
        differ = [k for k in plain if not torch.equal(plain[k], ckpt[k])]
        assert not differ, f"checkpointed DDP step differs from the plain one in {differ}"


def test_reentrant_checkpoint_under_ddp_raises_in_backward(suite):
    """torch 2.13: the solver step is checkpointed 3x with the same parameters; the
    reentrant backward marks them ready once per recomputation and DDP's reducer raises
    during loss.backward() on every rank."""
    single, per_rank = _states(suite, "staged_modules_ckpt_reentrant")
    for rank, state in enumerate(per_rank):
        assert state.get("error", "").startswith(
            "RuntimeError: Expected to mark a variable ready only once."), (rank, state.keys())
    with pytest.raises(InvariantViolation, match=r"rank 0 raised: RuntimeError: Expected to "
                                                 r"mark a variable ready only once"):
        assert_ddp_step_equivalent(single, per_rank)


SOLVER_STEP_PARAMS = re.compile(r"solver\.(w_in|w_h|gate|hyperlora|solver_context|hpm)\.")


def test_reentrant_first_step_under_ddp_loses_gradients_silently(suite):
    """S4's first step (x constant, h None, deltas in a dict) with use_reentrant=True under
    DDP(find_unused_parameters=True): no error, no reducer complaint — the step's
    parameters simply get None gradients, which DDP takes for unused parameters."""
    single, per_rank = _states(suite, "first_step_reentrant")
    for rank, state in enumerate(per_rank):
        assert "error" not in state, state["error"]
        lost = {k[len("grad."):] for k in single if k.startswith("grad.") and k not in state}
        expected = {k[len("grad."):] for k in single
                    if k.startswith("grad.") and SOLVER_STEP_PARAMS.search(k)}
        assert lost == expected and lost, (rank, sorted(lost ^ expected))
    with pytest.raises(InvariantViolation, match=r"rank 0: grad\.solver\.hyperlora\.\S+ is "
                                                 r"missing on the rank \(a None gradient"):
        assert_ddp_step_equivalent(single, per_rank)


# ------------------------------------------------------ 3. rank-consistent decisions
# (loop, step at which the rank-dependent metric triggers rank 0, rank 1); None: never
DECISION_LOOPS = {
    "collapse_guard": (None, 12),   # rank 1's loss is NaN at step 12
    "norm_governor": (None, 7),     # rank 1's lora_norm 2.5 > kill 2.0 at step 7
    "early_stopping": (6, 12),      # rank 0's val loss plateaus 3 checks earlier
}


def _first_stop(history):
    return next((step for step, stop in history if stop), None)


@pytest.mark.parametrize("loop", DECISION_LOOPS)
def test_naive_per_rank_decision_diverges_and_names_rank_and_step(suite, loop):
    naive = [rank["decisions"][f"{loop}.naive"] for rank in suite["ranks"]]
    assert [_first_stop(h) for h in naive] == list(DECISION_LOOPS[loop])
    first = min(s for s in DECISION_LOOPS[loop] if s is not None)
    rank0 = int(first == DECISION_LOOPS[loop][0])
    with pytest.raises(InvariantViolation,
                       match=rf"rank 1 disagreed at step {first}: rank 0 decided {rank0}, "
                             rf"rank 1 decided {1 - rank0}"):
        assert_ranks_agree([[tuple(x) for x in h] for h in naive])


@pytest.mark.parametrize("loop", DECISION_LOOPS)
def test_reduced_decision_agrees_on_every_rank_at_the_first_trigger(suite, loop):
    reduced = [rank["decisions"][f"{loop}.reduced"] for rank in suite["ranks"]]
    assert_ranks_agree([[tuple(x) for x in h] for h in reduced])
    first = min(s for s in DECISION_LOOPS[loop] if s is not None)
    assert [_first_stop(h) for h in reduced] == [first, first]


def test_rank_consistent_guard_raises_on_every_rank_at_the_same_step(suite):
    assert [rank["decisions"]["collapse_guard_raise.reduced"] for rank in suite["ranks"]] == \
        [[[12, 1]], [[12, 1]]]


# ------------------------------------------------------------------ 4. hygiene
def test_no_rank_process_outlives_the_group(suite):
    pids = [rank["pid"] for rank in suite["ranks"]]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for pid in pids:  # gone, not even a zombie (a recycled pid would run something else)
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except FileNotFoundError:
            continue
        assert b"multiprocessing" not in cmdline, f"rank process {pid} is still alive"
    alive = [p for p in multiprocessing.active_children() if p.is_alive()]
    assert not alive, f"leftover processes: {alive}"
    assert suite["seconds"] < GROUP_BACKSTOP_S


def test_gather_rows_moves_every_tensor_in_one_collective_bit_for_bit(suite):
    """The golden runs' per-step metrics travel in one packed all-gather
    (``data_parallel.gather_rows``): the same tensors as one ``gather`` each, and the full
    batch each rank started from, for mixed dtypes and unequal shards."""
    for rank, out in enumerate(suite["ranks"]):
        got = out["gather_rows"]
        assert got["shard_rows"] == [[2, 3][rank]] * 4, got
        assert got["dtypes"] == ["torch.float32", "torch.int64", "torch.bool", "torch.float64"]
        assert got["equal_to_one_by_one"] == [True] * 4, (rank, got)
        assert got["equal_to_full"] == [True] * 4, (rank, got)
