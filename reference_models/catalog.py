"""The one list of seed systems: their Cases (tests and ``invariants check``) and golden runs.

Each seed system is one folder ``reference_models/<system>/`` (config, model, train, cases,
golden); this module only gathers ``<system>.cases.cases()`` and ``<system>.golden.RUNS``, in SPEC
order, so adding a system is one folder and one line here.
"""
from __future__ import annotations

import importlib

from invariants import Case, GoldenRun

SYSTEMS = (
    "hyperlora",         # seed 000
    "staged_modules",    # seed 001
    "curriculum_lm",     # seed 002
    "lora_init",         # seed 003
    "evolving_context",  # seed 004
)


def cases() -> list[Case]:
    out: list[Case] = []
    for name in SYSTEMS:
        out.extend(importlib.import_module(f"reference_models.{name}.cases").cases())
    return out


def golden_runs() -> tuple[GoldenRun, ...]:
    out: list[GoldenRun] = []
    for name in SYSTEMS:
        out.extend(importlib.import_module(f"reference_models.{name}.golden").RUNS)
    return tuple(out)


CASES = cases()
