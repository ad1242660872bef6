"""Shared parts of the golden runs of every seed system (``reference_models/<system>/golden.py``).

A golden run is one ``GoldenRun`` (the library's type): a named, seeded short training run whose
curves are compared with ``golden/<run>/<device-key>.json``. Each system folder defines its fixed
and broken run with ``collapse_pair``; ``reference_models.catalog.golden_runs()`` gathers them. World
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
A fixed run whose long horizon amplifies the rounding too (hyperlora's 400 Adam steps) gets
its own measured ``DISTRIBUTED_HORIZON_FIXED`` (``fixed_distributed_horizon``).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

from invariants import GoldenRun, GoldenTolerance, InvariantViolation, SignatureConfig

# exact comparison: discrete and schedule metrics (accuracy, levels, lr, stage)
EXACT = GoldenTolerance(rtol=0.0, atol=0.0)


def rel(rtol: float) -> GoldenTolerance:
    """A relative-only tolerance (no golden value of 0 ever deviated)."""
    return GoldenTolerance(rtol=rtol, atol=0.0)


def as_violation(check: Callable[[Any], None], run: str) -> Callable[[Any], None]:
    """``check(curves)`` with its ``AssertionError`` re-raised as ``InvariantViolation`` naming
    ``run`` (the collapse modules assert plainly; the golden machinery reports violations)."""
    def wrapped(curves: Any) -> None:
        try:
            check(curves)
        except InvariantViolation:
            raise
        except AssertionError as exc:
            raise InvariantViolation(f"{run}: {exc}") from None
    wrapped.__name__ = getattr(check, "__name__", "check")
    return wrapped


def collapse_pair(system: str, module: Any, *, broken_signatures: tuple,
                  tolerances: dict | None = None, distributed_tolerances: dict | None = None,
                  distributed_horizon: tuple[int, str] | None = None,
                  fixed_distributed_horizon: tuple[int, str] | None = None,
                  broken_distributed_chaotic: str = "", seed: int = 0,
                  signature_config: SignatureConfig | None = None
                  ) -> tuple[GoldenRun, GoldenRun]:
    """The fixed and the broken run of a system's collapse module (``<system>/collapse.py``:
    ``FIXED``, ``BROKEN``, ``run(cfg, seed, device)``, ``check_fixed``, ``check_broken``,
    ``NOTE``). One training function, one SignatureConfig (default: the default detectors),
    one tolerance table; only the config, the check, the expected critical signatures
    (broken) and the world-size-2 horizons differ. The config stored and hashed is the whole
    config dataclass. ``seed`` is the golden seed of both runs; ``broken_distributed_chaotic``
    the measured reason the broken run's collapse is not asserted at world size >= 2."""
    signature_config = SignatureConfig() if signature_config is None else signature_config

    def make(kind: str, cfg: Any, check: Callable, horizon: tuple[int, str] | None,
             signatures: tuple, chaotic: str = "") -> GoldenRun:
        return GoldenRun(
            name=f"{system}-{kind}", kind=kind,
            fn=lambda seed, device: module.run(cfg, seed, device),
            config={"system": system, "run": f"{module.__name__}.run", "cfg": asdict(cfg)},
            check=as_violation(check, f"{system}-{kind}"), note=module.NOTE,
            signatures=signatures, signature_config=signature_config,
            tolerances=tolerances or {}, distributed_tolerances=distributed_tolerances or {},
            distributed_horizon=horizon, distributed_chaotic=chaotic, seed=seed)

    return (make("fixed", module.FIXED, module.check_fixed, fixed_distributed_horizon, ()),
            make("broken", module.BROKEN, module.check_broken, distributed_horizon,
                 broken_signatures, broken_distributed_chaotic))
