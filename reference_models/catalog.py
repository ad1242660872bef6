"""The one list of Cases that the tests and ``invariants check`` both run.

Each seed system's module defines ``cases()``; this module only gathers them,
in SPEC order, so adding a system is one line here.
"""
from __future__ import annotations

import importlib

from invariants import Case

SYSTEM_MODULES = (
    "reference_models.hyperlora",        # seed 000
    "reference_models.staged_modules",   # seed 001
    "reference_models.curriculum_lm",    # seed 002
    "reference_models.lora_init",        # seed 003
    "reference_models.evolving_context", # seed 004
)


def cases() -> list[Case]:
    out: list[Case] = []
    for name in SYSTEM_MODULES:
        out.extend(importlib.import_module(name).cases())
    return out


CASES = cases()
