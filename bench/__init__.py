"""Benchmarks with budgets. Run all: ``python -m bench`` (``--json FILE`` to save).

Each ``bench/bench_*.py`` module defines ``run() -> list[Result]``. Figures that
are relative are measured against a baseline in the same run.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass
class Result:
    name: str
    value: float
    unit: str
    budget: float | None  # None: reported, no budget
    met: bool | None
    note: str = ""

    def as_json(self) -> dict:
        d = asdict(self)
        d.pop("note")
        return d


def row(r: Result) -> str:
    """One printed line: figure, unit, budget, met (and the note)."""
    budget = "-" if r.budget is None else f"{r.budget:g}"
    met = "-" if r.met is None else ("yes" if r.met else "NO")
    return (f"{r.name:<58} {r.value:>12.4g} {r.unit:<8} {budget:>10}  {met}"
            + (f"   # {r.note}" if r.note else ""))


def under(name: str, value: float, unit: str, budget: float | None, note: str = "") -> Result:
    """A figure whose budget is an upper bound."""
    return Result(name, value, unit, budget, None if budget is None else value <= budget, note)


def best_of(fn: Callable[[], object], *, repeat: int = 5, number: int = 1) -> float:
    """Best wall time per call (seconds) over ``repeat`` rounds of ``number`` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best
