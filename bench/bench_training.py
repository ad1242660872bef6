"""Wall-time budgets of the reference training loops (moved out of the unit tests).

A unit test asserts what a run does (deterministic, finite, every metric logged); how long it
takes is a figure with a budget, measured here on an otherwise idle machine, best of 3.
"""
from __future__ import annotations

import time

import torch

from bench import Result, under
from reference_models import curriculum_lm as clm
from reference_models import evolving_context as ec
from reference_models import staged_modules as sm


def _best(fn, repeat: int = 3, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def run() -> list[Result]:
    torch.set_num_threads(1)
    sm.train_epochs(sm.FIXED, 1, seed=5)  # torch's one-off warm-up of a process
    return [
        under("curriculum_lm.train, 3 epochs (fixed)",
              _best(lambda: clm.train(clm.FIXED, seed=0, max_epochs=3)), "s", 5.0),
        under("evolving_context.train_steps, 100 steps (fixed)",
              _best(lambda: ec.train_steps(ec.FIXED, 100, seed=0)), "s", 3.0),
        under("staged_modules.train_epochs, 6 epochs (fixed), CPU time",
              _best(lambda: sm.train_epochs(sm.FIXED, 6, seed=0), clock=time.process_time),
              "s", 3.0),
    ]
