"""Spawned workers for the distributed tests: spawn_group's failure modes, the decision
loops (naive and rank-consistent) and the ONE suite worker that runs every DDP step job.

Test code, not a reference model; spawn_group pickles these functions by name
(``tests.ddp_workers``), so they are module-level. The DDP step factories are in
``tests/ddp_steps.py``.
"""
from __future__ import annotations

import os
import warnings

from invariants import CollapseGuard, RankConsistentGuard, agree_across_ranks
from invariants.distributed import run_ddp_jobs


# ------------------------------------------------------------------ spawn_group workers
def failing_worker(rank: int, world_size: int) -> int:
    """Rank 1 raises before any collective; rank 0 would wait in the barrier."""
    if rank == 1:
        raise ValueError("rank 1 found a bad shard")
    dist_barrier()
    return rank


def hanging_worker(rank: int, world_size: int) -> int:
    """The classic hang: rank 0 waits in a collective that rank 1 never reaches (it sleeps);
    a rank 2, if any, deadlocks on a lock it already holds."""
    import threading
    import time
    if rank == 1:
        time.sleep(3600)
    if rank == 2:
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()
    dist_barrier()
    return rank


def failure_modes_worker(rank: int, world_size: int) -> int:
    """Every way a rank can end badly, one per rank; rank 0 waits in the barrier.

    1 raises, 2 exits with code 3 without raising, 3 is killed by SIGKILL, 4 aborts
    (SIGABRT, as "terminate called without an active exception" does).
    """
    import signal
    if rank == 1:
        raise ValueError("rank 1 found a bad shard")
    if rank == 2:
        os._exit(3)
    if rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 4:
        os.abort()
    dist_barrier()
    return rank


def burn_cpu(seconds: float) -> None:
    """Use ``seconds`` of this thread's CPU (however long that takes on a busy machine)."""
    import time
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1


def slow_worker(rank: int, world_size: int, bursts: int, cpu_s: float, pause_s: float) -> int:
    """Slow but alive: rank 0 computes ``cpu_s`` then pauses ``pause_s``, ``bursts`` times,
    while every other rank waits for it in the barrier (using no CPU)."""
    import time
    if rank == 0:
        for _ in range(bursts):
            burn_cpu(cpu_s)
            time.sleep(pause_s)
    dist_barrier()
    return rank


def pid_file_worker(rank: int, world_size: int, directory: str) -> int:
    """Write this rank's pid to ``directory/rank<r>.pid`` and sleep (killed from outside)."""
    import time
    from pathlib import Path
    dist_barrier()
    tmp = Path(directory) / f"rank{rank}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(Path(directory) / f"rank{rank}.pid")
    time.sleep(3600)
    return rank


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """``(pid, address, port)`` of every TCP socket in LISTEN state owned by ``pids``
    (``/proc/net/tcp``/``tcp6`` matched to the processes' descriptors by inode)."""
    import socket
    owner = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owner:  # 0A: LISTEN
                continue
            host, port = address.split(":")
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host order
            found.append((owner[inode], socket.inet_ntop(family, raw), int(port, 16)))
    return sorted(found)


def listeners_worker(rank: int, world_size: int) -> dict:
    """While the group is up: every listening socket of the parent and of every rank."""
    import torch
    import torch.distributed as dist
    pids = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(pids, torch.tensor([os.getpid()]))
    ranks = [int(p) for p in pids]
    out = {"parent": os.getppid(), "ranks": ranks,
           "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
           "listening": listening_sockets([os.getppid()] + ranks) if rank == 0 else []}
    dist_barrier()  # every rank stays up until rank 0 has looked
    return out


def gone(pid: int) -> bool:
    """(In the test process) no such process, or a zombie: dead, reaped by its adopter."""
    from pathlib import Path
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def dist_barrier() -> None:
    import torch.distributed as dist
    dist.barrier()


# ------------------------------------------------------------------ decision workers
STEPS = 20


def _rank_losses(rank: int, steps: int = STEPS) -> list[float]:
    """Smooth decay on every rank; rank 1's shard hits a NaN loss at step 12."""
    losses = [2.0 * 0.97 ** s for s in range(steps)]
    if rank == 1:
        losses[12] = float("nan")
    return losses


def _rank_lora_norms(rank: int, steps: int = STEPS) -> list[float]:
    """Per-rank mean ‖ΔW‖F: rank 0 drifts up slowly; rank 1 spikes past kill 2.0 at step 7."""
    norms = [0.6 + 0.02 * s for s in range(steps)]
    if rank == 1:
        norms[7] = 2.5
    return norms


def _rank_val_losses(rank: int, steps: int = STEPS) -> list[float]:
    """Per-rank val loss of its val shard: rank 0 plateaus from check 4, rank 1 keeps improving
    until check 9. EarlyStopping(patience 3, min_delta 0.01) stops rank 0 at step 6."""
    if rank == 0:
        return [1.0 - 0.1 * min(s, 3) for s in range(steps)]
    return [1.2 - 0.05 * min(s, 9) for s in range(steps)]


def guard_decisions(rank: int, reduced: bool) -> list[list[int]]:
    """CollapseGuard over this rank's losses; (step, should_stop) each step."""
    guard = CollapseGuard(mode="stop")
    watched = RankConsistentGuard(guard) if reduced else guard
    history = []
    for step, loss in enumerate(_rank_losses(rank)):
        watched.update(step, {"loss": loss})
        history.append([step, int(watched.should_stop)])
    return history


def governor_decisions(rank: int, reduced: bool) -> list[list[int]]:
    """Seed 000's NormGovernor (FIXED thresholds); (step, stop) with stop = kill or early stop."""
    from reference_models import hyperlora as m
    governor = m.governor_for(m.FIXED)
    history, stopped = [], False
    for step, norm in enumerate(_rank_lora_norms(rank)):
        local = governor.update(norm).action == "stop"
        stopped = stopped or (agree_across_ranks(local) if reduced else local)
        history.append([step, int(stopped)])
    return history


def early_stopping_decisions(rank: int, reduced: bool) -> list[list[int]]:
    """Seed 002's EarlyStopping (FIXED patience/min_delta) on this rank's val losses."""
    from reference_models import curriculum_lm as m
    stopper = m.make_stopper(m.FIXED)
    history, stopped = [], False
    for step, val_loss in enumerate(_rank_val_losses(rank)):
        local = stopper.step(val_loss)
        stopped = stopped or (agree_across_ranks(local) if reduced else local)
        history.append([step, int(stopped)])
    return history


def guard_raise_steps(rank: int, reduced: bool) -> list[list[int]]:
    """CollapseGuard in ``raise`` mode: [[step, 1]] at the step this rank raised, or []."""
    from invariants import CollapseDetected
    guard = CollapseGuard(mode="raise")
    watched = RankConsistentGuard(guard) if reduced else guard
    for step, loss in enumerate(_rank_losses(rank)):
        try:
            watched.update(step, {"loss": loss})
        except CollapseDetected:
            return [[step, 1]]
    return []


DECISIONS = {"collapse_guard": guard_decisions, "norm_governor": governor_decisions,
             "early_stopping": early_stopping_decisions}


def suite_worker(rank: int, world_size: int, jobs: dict) -> dict:
    """ONE spawned group for the whole distributed suite: every DDP step job (errors
    captured per job) and every decision loop, naive and reduced. The loops do not
    break on a stop (so the naive variant cannot hang); they record what each rank
    would have done."""
    with warnings.catch_warnings():
        # reentrant checkpoint's "None of the inputs have requires_grad=True" and the
        # guards' CollapseWarning are what the broken variants are about; the tests
        # judge the recorded states, not the ranks' stderr
        warnings.simplefilter("ignore", UserWarning)
        out = {"pid": os.getpid(),
               "steps": run_ddp_jobs(rank, world_size, jobs, capture_errors=True),
               "decisions": {}}
        for name, fn in DECISIONS.items():
            for reduced in (False, True):
                key = f"{name}.{'reduced' if reduced else 'naive'}"
                out["decisions"][key] = fn(rank, reduced)
        out["decisions"]["collapse_guard_raise.reduced"] = guard_raise_steps(rank, True)
        out["gather_rows"] = gather_rows_agrees(rank, world_size)
    return out


def gather_rows_agrees(rank: int, world_size: int) -> dict:
    """``data_parallel.gather_rows`` (one collective) against one ``gather`` per tensor:
    mixed dtypes (float32, int64, bool, float64) and trailing shapes, unequal shards
    (5 rows over 2 ranks: 2 and 3)."""
    import torch
    from reference_models import data_parallel
    full = 5
    gen = torch.Generator().manual_seed(7)
    tensors = (torch.randn(full, 3, 4, generator=gen),
               torch.randint(0, 9, (full, 2), generator=gen),
               torch.rand(full, generator=gen) < 0.5,
               torch.randn(full, 1, generator=gen, dtype=torch.float64))
    shards = data_parallel.shard(*tensors)
    packed = data_parallel.gather_rows(*shards, full=full)
    one_by_one = [data_parallel.gather(t, full=full) for t in shards]
    return {"shard_rows": [len(t) for t in shards],
            "dtypes": [str(t.dtype) for t in packed],
            "equal_to_one_by_one": [bool(torch.equal(a, b)) for a, b in zip(packed, one_by_one)],
            "equal_to_full": [bool(torch.equal(a, b)) for a, b in zip(packed, tensors)]}
