"""Determinism: the one owner of seeding, torch thread counts and deterministic flags.

Everything that seeds the python, numpy or torch RNGs, changes torch's intra-op thread
count or turns on deterministic algorithms calls this module, so there is one place that
says what "a seeded run" means:

* ``seed_all(seed)`` seeds python's ``random``, numpy's global RNG and torch's (CPU and,
  through ``torch.manual_seed``, every CUDA device);
* ``seeded(seed)`` does that for a block and restores the three RNG states after (a
  model initialised from a seed without disturbing the caller's streams);
* ``num_threads(n)`` / ``one_thread()`` set torch's intra-op threads for a block and
  restore them; ``set_num_threads(n)`` sets them for the rest of the process (a spawned
  rank, a test session, a CLI command);
* ``deterministic(seed, threads=1)`` is what a golden run executes under: seeded, a fixed
  thread count, ``torch.use_deterministic_algorithms(True)`` and the cuBLAS workspace
  setting those algorithms need; ``DETERMINISM_FLAGS`` is that setting as stored in a
  golden file's metadata.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

from invariants._validate import require

__all__ = ["deterministic", "num_threads", "one_thread", "seeded"]

# cuBLAS needs a fixed workspace for deterministic GEMMs (CUDA >= 10.2); harmless on CPU.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
DETERMINISM_FLAGS = {"use_deterministic_algorithms": True,
                     "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE_CONFIG}


def _require_threads(n: int) -> None:
    require(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "threads", n,
            "must be an integer >= 1")


def _accelerator_present() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def seed_all(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch's RNGs with ``seed``.

    Without an accelerator only torch's CPU generator exists, and seeding it directly gives
    the same state as ``torch.manual_seed``, which also formats the call stack for its lazy
    CUDA/XPU/MTIA seeding (~0.6 ms at Hypothesis's stack depth; the catalog seeds ~900
    times). With one, ``torch.manual_seed`` seeds every device as usual."""
    random.seed(seed)
    np.random.seed(seed)
    if _accelerator_present():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, *, device: torch.device | str | None = None) -> Iterator[int]:
    """Run the block with every RNG seeded to ``seed``; restore the caller's RNG states after.

    Yields the seed. The CPU torch generator, numpy's and python's are restored; with a CUDA
    ``device``, that device's generator is forked too (so a run seeded on a GPU leaves the
    caller's GPU stream alone); other CUDA generators are left as the block leaves them.
    """
    device = None if device is None else torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []
    saved = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        try:
            seed_all(seed)
            yield seed
        finally:
            torch.random.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


def set_num_threads(n: int) -> None:
    """Set torch's intra-op thread count for the rest of the process."""
    _require_threads(n)
    torch.set_num_threads(n)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads; restore the caller's setting after."""
    _require_threads(n)
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """Run the block with one torch intra-op thread; restore the caller's setting after.

    For the reference models' tiny tensors a second thread only adds synchronisation
    (measured 5-30x slower on a loaded 2-core machine), and a fixed count keeps
    floating-point reduction order, hence golden curves, independent of the machine.
    """
    return num_threads(1)


@contextlib.contextmanager
def deterministic(seed: int, *, threads: int = 1) -> Iterator[None]:
    """Seed python/numpy/torch, force deterministic algorithms and a fixed thread count.

    Everything is restored after the block: the thread count, the deterministic flag,
    the three RNG states and ``$CUBLAS_WORKSPACE_CONFIG``.
    """
    saved_flag = torch.are_deterministic_algorithms_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    try:
        with num_threads(threads), seeded(seed):
            torch.use_deterministic_algorithms(True)
            yield
    finally:
        torch.use_deterministic_algorithms(saved_flag)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
