"""Shared parts of the golden runs of every seed system (``reference_models/<system>/golden.py``).

A golden run is one ``GoldenRun`` (the library's type): a named, seeded short training run whose
curves are compared with ``golden/<run>/<device-key>.json``. Each system folder defines its fixed
and broken run with ``make_run``; ``reference_models.catalog.golden_runs()`` gathers them. World
size 2 tolerances and horizons are measured per system (docs/golden.md).

World size 2: rank 0 of a world-size-2 run (gloo, CPU, DDP over the batch) is compared with the
world-size-1 golden. Each system's ``DISTRIBUTED_TOLERANCES`` was measured with
``invariants golden --world-size 2 --deviations`` (torch 2.13.0+cpu): rtol = 4 x the largest
relative deviation over the system's fixed and broken run (before the horizon), rounded up to
one significant digit; atol 0 (no golden value of 0 ever deviated). Discrete and schedule
metrics (accuracy, levels, lr, stage) were bit-identical in every run and must stay so: exact.
Continuous metrics that were bit-identical (staged_modules' lora_norm) keep the world-size-1
table. A broken run whose dynamics amplify DDP's float32 rounding is compared only before its
measured ``DISTRIBUTED_HORIZON`` step; after it, its check and signatures must still hold.
"""
from __future__ import annotations

from typing import Any, Callable

from invariants import GoldenRun, GoldenTolerance, InvariantViolation, SignatureConfig

# exact comparison: discrete and schedule metrics (accuracy, levels, lr, stage)
EXACT = GoldenTolerance(rtol=0.0, atol=0.0)


def rel(rtol: float) -> GoldenTolerance:
    """A relative-only tolerance (no golden value of 0 ever deviated)."""
    return GoldenTolerance(rtol=rtol, atol=0.0)


def per_step(out: dict[str, list], keys: tuple[str, ...], steps=None) -> dict[str, tuple]:
    """``{metric: (steps, values)}`` of the ``keys`` of a training function's output."""
    first = out[keys[0]]
    xs = list(range(len(first))) if steps is None else list(steps)
    return {k: (xs, list(out[k])) for k in keys}


def expect(cond: bool, run: str, expected: str, observed: str) -> None:
    """Raise ``InvariantViolation`` naming the run, what was expected and what was observed."""
    if not cond:
        raise InvariantViolation(f"{run}: expected {expected}\n  observed: {observed}")


def make_run(name: str, fn: Callable, config: dict[str, Any], check: Callable, note: str, *,
             signatures: tuple = (), signature_config: SignatureConfig | None = None,
             tolerances: dict | None = None, distributed_tolerances: dict | None = None,
             distributed_horizon: tuple[int, str] | None = None) -> GoldenRun:
    """A ``GoldenRun`` named ``<system>-<fixed|broken>``; its kind is the name's suffix."""
    return GoldenRun(name=name, fn=fn, config=config, check=check, note=note,
                     kind=name.rsplit("-", 1)[1],
                     signatures=signatures, signature_config=signature_config,
                     tolerances=tolerances or {},
                     distributed_tolerances=distributed_tolerances or {},
                     distributed_horizon=distributed_horizon)


def golden_pair(system: str, fn_for: Callable[[Any], Callable], fixed: Any, broken: Any, *,
                config: Callable[[Any], dict[str, Any]], checks: tuple[Callable, Callable],
                note: str, broken_signatures: tuple = (), tolerances: dict | None = None,
                distributed_tolerances: dict | None = None,
                distributed_horizon: tuple[int, str] | None = None,
                signature_config: SignatureConfig | None = None) -> tuple[GoldenRun, GoldenRun]:
    """A system's fixed and broken run: one training function, one SignatureConfig, one
    tolerance table; only the config, the check, the expected signatures (broken) and the
    world-size-2 horizon (broken) differ."""
    signature_config = SignatureConfig() if signature_config is None else signature_config
    fixed_check, broken_check = checks
    return (
        make_run(f"{system}-fixed", fn_for(fixed), config(fixed), fixed_check, note,
                 signature_config=signature_config, tolerances=tolerances,
                 distributed_tolerances=distributed_tolerances),
        make_run(f"{system}-broken", fn_for(broken), config(broken), broken_check, note,
                 signatures=broken_signatures, signature_config=signature_config,
                 tolerances=tolerances, distributed_tolerances=distributed_tolerances,
                 distributed_horizon=distributed_horizon),
    )
