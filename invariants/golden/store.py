"""Golden files: the schema, atomic JSON writes, reading with validation, and recording.

File contract (DESIGN.md "Golden files"): ``golden/<run>/<device-key>.json`` holding
``{"schema_version", "run", "metadata", "metrics": {name: {"steps", "values"}},
"tolerances": {name: {"rtol", "atol"}}, "signatures": [...]}``. JSON only, nothing is
unpickled; writes are atomic (temp file + rename); a non-finite curve, a curve that
differs between two seeded runs, or a run that does not behave as documented is refused;
recording rewrites only the current device key. ``obtained_document`` is the same
schema for the ``<run>.<device>.obtained.json`` a mismatch leaves beside the test output.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from invariants._determinism import DETERMINISM_FLAGS
from invariants._tolerances import Tolerance
from invariants.golden.run import (Curves, GoldenError, GoldenRun, device_key, execute,
                                   findings_of, mechanism_problems)

__all__ = ["read_golden", "record_golden"]

SCHEMA_VERSION = 1


def metadata(run: GoldenRun, device: torch.device) -> dict[str, Any]:
    """What a golden file stores about the machine, the determinism settings and the run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = list(torch.cuda.get_device_capability(device))
    else:
        name, capability = platform.processor() or platform.machine(), None
    return {
        "torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__,
        "device": device_key(device), "device_name": name, "device_capability": capability,
        "num_threads": 1, "seed": run.seed, "dtype": str(torch.get_default_dtype()),
        "determinism": dict(DETERMINISM_FLAGS),
        "config_sha256": run.config_sha256, "config": run.config,
        "command": "pytest -m golden --golden-update  (or: invariants golden --update)",
        "note": run.note,
    }


def _nonfinite(curves: Curves) -> list[str]:
    bad = []
    for metric, (steps, values) in curves.items():
        for step, value in zip(steps, values):
            if not isinstance(value, str) and not math.isfinite(value):
                bad.append(f"{metric} at step {step} = {value}")
                break
    return bad


def _first_difference(a: Curves, b: Curves) -> str | None:
    if set(a) != set(b):
        return f"metric sets differ: {sorted(set(a) ^ set(b))}"
    for metric in sorted(a):
        if a[metric][0] != b[metric][0]:
            return f"{metric}: steps differ"
        for i, (x, y) in enumerate(zip(a[metric][1], b[metric][1])):
            if x != y and not (isinstance(x, float) and isinstance(y, float)
                                and math.isnan(x) and math.isnan(y)):
                return f"{metric} at step {a[metric][0][i]}: {x!r} vs {y!r}"
    return None


def write_json_atomic(path: Path, doc: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def record_golden(run: GoldenRun, golden_dir: Path, device: torch.device | str = "cpu",
                  *, signatures: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Run twice, refuse non-finite or non-reproducible curves, write the current device key.

    ``signatures`` defaults to the collapse findings of the recorded curves.

    Only ``golden/<run>/<device-key of device>.json`` is written; other keys are untouched.
    """
    return record(run, golden_dir, device, signatures)[0]


def record(run: GoldenRun, golden_dir: Path, device: torch.device | str,
           signatures: Sequence[Mapping[str, Any]] = ()) -> tuple[Path, Curves]:
    """``record_golden``, also returning the recorded curves (the pytest plugin's update)."""
    device = torch.device(device)
    first = execute(run, device)
    bad = _nonfinite(first)
    if bad:
        raise GoldenError(f"run {run.name!r}: refusing to record a non-finite curve: {bad[0]}")
    second = execute(run, device)
    diff = _first_difference(first, second)
    signatures = list(signatures) or findings_of(run, first)
    wrong = mechanism_problems(run, first, signatures)
    if wrong:
        raise GoldenError(f"run {run.name!r}: refusing to record a golden for a run that does "
                          "not behave as documented:\n" + "\n".join(wrong))
    if diff:
        raise GoldenError(f"run {run.name!r}: refusing to record a curve that differs between "
                          f"two seeded runs ({diff}); make the run deterministic first")
    doc = {
        "schema_version": SCHEMA_VERSION, "run": run.name, "metadata": metadata(run, device),
        "metrics": {m: {"steps": s, "values": v} for m, (s, v) in sorted(first.items())},
        "tolerances": {m: {"rtol": run.tolerance(m).rtol, "atol": run.tolerance(m).atol}
                       for m in sorted(first)},
        "signatures": list(signatures),
    }
    path = Path(golden_dir) / run.name / f"{device_key(device)}.json"
    write_json_atomic(path, doc)
    return path, first


_REQUIRED = {"schema_version": int, "run": str, "metadata": dict, "metrics": dict,
             "tolerances": dict, "signatures": list}


def read_golden(path: Path) -> dict[str, Any]:
    """Parse and validate a golden file; every problem is a GoldenError naming file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GoldenError(f"{path}: golden file not found") from None
    try:
        doc = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(
            ValueError(f"non-finite constant {c}")))
    except json.JSONDecodeError as exc:
        raise GoldenError(f"{path}:{exc.lineno}:{exc.colno}: corrupt golden JSON: {exc.msg}") from None
    except ValueError as exc:
        raise GoldenError(f"{path}: corrupt golden JSON: {exc} (goldens are finite)") from None
    if not isinstance(doc, dict):
        raise GoldenError(f"{path}: golden must be a JSON object, got {type(doc).__name__}")
    for key, typ in _REQUIRED.items():
        if key not in doc:
            raise GoldenError(f"{path}: missing key {key!r}")
        if not isinstance(doc[key], typ):
            raise GoldenError(f"{path}: key {key!r} must be {typ.__name__}, got "
                              f"{type(doc[key]).__name__}")
    version = doc["schema_version"]
    if version > SCHEMA_VERSION:
        raise GoldenError(f"{path}: schema_version={version} is from the future (this harness "
                          f"reads <= {SCHEMA_VERSION}); upgrade the harness")
    if version < 1:
        raise GoldenError(f"{path}: schema_version={version} is invalid")
    for metric, curve in doc["metrics"].items():
        if not (isinstance(curve, dict) and isinstance(curve.get("steps"), list)
                and isinstance(curve.get("values"), list)
                and len(curve["steps"]) == len(curve["values"])):
            raise GoldenError(f"{path}: metric {metric!r} must be {{'steps': [...], 'values': "
                              "[...]}} with equal lengths")
    return doc


def obtained_document(run: GoldenRun, device: torch.device, curves: Curves,
                      tolerance: Callable[[str], Tolerance],
                      found: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The golden schema for curves that did not match (non-finite values as strings)."""
    return {
        "schema_version": SCHEMA_VERSION, "run": run.name,
        "metadata": metadata(run, device),
        "metrics": {m: {"steps": s, "values": [v if isinstance(v, str) or math.isfinite(v)
                                               else str(v) for v in vals]}
                    for m, (s, vals) in sorted(curves.items())},
        "tolerances": {m: {"rtol": tolerance(m).rtol, "atol": tolerance(m).atol}
                       for m in sorted(curves)},
        "signatures": list(found)}
