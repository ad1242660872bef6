"""Spawning a gloo process group on loopback: ``spawn_group`` and the free-port helper.

``spawn_group(fn, world_size, ...)`` starts ``world_size`` spawned processes, each with a
gloo process group on a free loopback port, runs ``fn(rank, world_size, *args)`` with one
torch thread and returns every rank's result (passed back with ``torch.save`` and read
with ``torch.load(weights_only=True)``). It has a hard timeout and always reaps its
processes, also when a rank fails or hangs.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from invariants._determinism import set_num_threads
from invariants._validate import require, require_positive

__all__ = ["spawn_group"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, outdir: str,
           timeout_s: float) -> None:
    set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}",
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def spawn_group(fn: Callable[..., Any], world_size: int = 2, *args: Any,
                timeout: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    ``fn`` must be a module-level function (it is pickled by name for ``spawn``).
    Raises RuntimeError naming the rank and its traceback if a rank fails, and
    TimeoutError (after killing every process) if the group does not finish in time.
    """
    require(callable(fn), "fn", fn, "must be a module-level callable")
    require(isinstance(world_size, int) and not isinstance(world_size, bool)
            and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
    require_positive("timeout", timeout)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="invariants-dist-") as outdir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), fn, args, outdir,
                                               timeout), nprocs=world_size, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if ctx.join(timeout=0.2):
                        break
                except Exception:  # a rank raised: report its own traceback
                    errors = sorted(Path(outdir).glob("rank*.err"))
                    detail = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errors)
                    raise RuntimeError(f"a rank of the {world_size}-process gloo group failed:\n"
                                       f"{detail or 'no traceback captured'}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the {world_size}-process gloo group did not finish in {timeout:g}s "
                        "(a rank waiting in a collective the others never reached?); all "
                        "processes were killed")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=True)
                for r in range(world_size)]
