"""Golden files: the schema, JSON writes, reading with complete validation, and recording.

File contract (DESIGN.md "Golden files"): ``golden/<run>/<device-key>.json`` holding
``{"schema_version", "run", "metadata", "metrics": {name: {"steps", "values"}},
"tolerances": {name: {"rtol", "atol"}}, "signatures": [...]}``. JSON only, nothing is
unpickled; writes go through ``invariants._atomic`` (temp file + fsync + rename, the old
file's mode kept); a non-finite curve, a curve that differs between two seeded runs, or a
run that does not behave as documented is refused; recording rewrites only the current
device key. ``read_golden`` validates every field (``_Check``) so that nothing a golden
holds can make a comparison vacuous, and every problem (unreadable, not UTF-8, a pickle,
corrupt or too deep JSON, a schema violation) is one ``GoldenError`` line naming the file,
where in it and the value. ``obtained_document`` is the same schema for the
``<run>.<device>.obtained.json`` a mismatch leaves beside the test output.
"""
from __future__ import annotations

import json
import math
import os
import platform
import reprlib
import stat
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from invariants._atomic import AtomicWriteError, file_kind, write_bytes_atomic
from invariants._determinism import DETERMINISM_FLAGS
from invariants._tolerances import Tolerance
from invariants.golden.run import (
    Curves,
    GoldenError,
    GoldenRun,
    device_key,
    execute,
    findings_of,
    mechanism_problems,
)
from invariants.signatures.config import SEVERITIES

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


def write_json_atomic(path: Path, doc: Any) -> Path:
    """Write ``doc`` as the golden JSON format to ``path`` through ``invariants._atomic``.

    Creates missing parent directories. Returns the file written (a symlink's target).

    Raises:
      GoldenError: ``doc`` holds a non-finite number (nothing is written), the directory
        cannot be made, or the write failed (disk full, permission, not a regular file);
        the old file is then unchanged and no temp file is left.
    """
    path = Path(path)
    try:
        data = (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()
    except ValueError as exc:
        raise GoldenError(f"{path}: refusing to write a non-finite number ({exc}); goldens "
                          "are finite") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GoldenError(f"{path}: cannot create directory {str(path.parent)!r} "
                          f"({exc.strerror or exc})") from None
    try:
        return write_bytes_atomic(path, data)
    except AtomicWriteError as exc:
        raise GoldenError(str(exc)) from None


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


_KEYS = ("schema_version", "run", "metadata", "metrics", "tolerances", "signatures")
_CURVE_KEYS = ("steps", "values")
_TOLERANCE_KEYS = ("rtol", "atol")
_SIGNATURE_KEYS = ("signature", "metric", "severity", "step")  # a stored finding (scan contract)
_SHA256_HEX = frozenset("0123456789abcdef")

_show = reprlib.Repr()  # bounded echo of a bad value: depth, lengths and digits capped
_show.maxlevel, _show.maxlist, _show.maxdict, _show.maxstring, _show.maxlong = 2, 4, 4, 40, 24
_show.maxother = 40


def _json_type(value: Any) -> str:
    for typ, name in ((type(None), "null"), (bool, "boolean"), ((int, float), "number"),
                      (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, typ):
            return name
    return type(value).__name__  # pragma: no cover - json.loads makes only the six above


def _number_problem(value: Any) -> str | None:
    """Why ``value`` is not a finite JSON number (``None`` when it is one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a finite number, got {_json_type(value)}"
    try:
        finite = math.isfinite(value)
    except OverflowError:
        return f"is an integer too large for a float ({len(str(abs(value)))} digits)"
    return None if finite else "must be finite (a golden never stores a non-finite value)"


class _Check:
    """Validation of one parsed golden: every failure is one ``GoldenError`` line naming
    the file, where in it (``metrics['loss'].values[3]``), the value and the problem."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, value: Any, problem: str) -> None:
        raise GoldenError(f"{self.path}: {where}={_show.repr(value)}: {problem}")

    def number(self, where: str, value: Any, *, minimum: float | None = None) -> None:
        problem = _number_problem(value)
        if problem:
            self.fail(where, value, problem)
        if minimum is not None and value < minimum:
            self.fail(where, value, f"must be >= {minimum:g}")

    def keys(self, where: str, obj: Any, keys: Sequence[str], what: str) -> None:
        if not isinstance(obj, dict):
            self.fail(where, obj, f"must be an object {what}, got {_json_type(obj)}")
        missing = [k for k in keys if k not in obj]
        unknown = sorted(set(obj) - set(keys))
        if missing or unknown:
            self.fail(where, obj, f"must have exactly the keys {list(keys)} ("
                      + ", ".join(([f"missing {missing}"] if missing else [])
                                  + ([f"unknown {unknown}"] if unknown else [])) + ")")

    def document(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            raise GoldenError(f"{self.path}: golden must be a JSON object, got "
                              f"{_json_type(doc)}")
        for key in _KEYS:
            if key not in doc:
                raise GoldenError(f"{self.path}: missing key {key!r} (a golden holds "
                                  f"{', '.join(_KEYS)})")
        for key in sorted(set(doc) - set(_KEYS)):
            raise GoldenError(f"{self.path}: unknown key {key!r} (a golden holds exactly "
                              f"{', '.join(_KEYS)})")
        self.schema_version(doc["schema_version"])
        if not isinstance(doc["run"], str) or not doc["run"]:
            self.fail("run", doc["run"], "must be a non-empty string (the run's name)")
        self.metadata(doc["metadata"])
        metrics = doc["metrics"]
        if not isinstance(metrics, dict) or not metrics:
            self.fail("metrics", metrics, "must be a non-empty object {name: {steps, values}}: "
                      "a golden without curves compares nothing")
        for name, curve in metrics.items():
            self.curve(name, curve)
        self.tolerances(doc["tolerances"], metrics)
        self.signatures(doc["signatures"], metrics)

    def schema_version(self, version: Any) -> None:
        if isinstance(version, bool) or not isinstance(version, int):
            self.fail("schema_version", version, f"must be the integer {SCHEMA_VERSION}, got "
                      f"{_json_type(version)}")
        if version > SCHEMA_VERSION:
            self.fail("schema_version", version, f"is from the future (this harness reads "
                      f"{SCHEMA_VERSION}); upgrade the harness")
        if version != SCHEMA_VERSION:
            self.fail("schema_version", version, f"is invalid (this harness reads "
                      f"{SCHEMA_VERSION})")

    def metadata(self, meta: Any) -> None:
        if not isinstance(meta, dict):
            self.fail("metadata", meta, f"must be an object, got {_json_type(meta)}")
        sha = meta.get("config_sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _SHA256_HEX):
            self.fail("metadata.config_sha256", sha, "must be the run config's SHA-256 "
                      "(64 lowercase hex digits); it is how a stale golden is told apart")

    def curve(self, name: str, curve: Any) -> None:
        where = f"metrics[{name!r}]"
        if not name:
            self.fail("metrics", name, "a metric name must be a non-empty string")
        self.keys(where, curve, _CURVE_KEYS, '{"steps": [...], "values": [...]}')
        steps, values = curve["steps"], curve["values"]
        for key, seq in (("steps", steps), ("values", values)):
            if not isinstance(seq, list):
                self.fail(f"{where}.{key}", seq, f"must be an array, got {_json_type(seq)}")
        if not steps:
            self.fail(f"{where}.steps", steps, "must not be empty: an empty curve compares "
                      "nothing")
        if len(steps) != len(values):
            self.fail(where, f"{len(steps)} steps, {len(values)} values",
                      "must have as many values as steps")
        for i, step in enumerate(steps):
            self.number(f"{where}.steps[{i}]", step)
            if i and step <= steps[i - 1]:
                self.fail(f"{where}.steps[{i}]", step, f"must be greater than the step before "
                          f"it ({steps[i - 1]!r}): steps strictly increase")
        if isinstance(values[0], str):  # a text metric (generated samples): every value text
            for i, value in enumerate(values):
                if not isinstance(value, str):
                    self.fail(f"{where}.values[{i}]", value, "must be a string like the "
                              f"metric's first value (a text metric), got {_json_type(value)}")
            return
        for i, value in enumerate(values):
            self.number(f"{where}.values[{i}]", value)

    def tolerances(self, tolerances: Any, metrics: Mapping[str, Any]) -> None:
        if not isinstance(tolerances, dict):
            self.fail("tolerances", tolerances, f"must be an object {{metric: {{rtol, atol}}}}, "
                      f"got {_json_type(tolerances)}")
        if set(tolerances) != set(metrics):
            self.fail("tolerances", sorted(tolerances), "must name exactly the golden's metrics "
                      f"(missing {sorted(set(metrics) - set(tolerances))}, unknown "
                      f"{sorted(set(tolerances) - set(metrics))})")
        for name, tol in tolerances.items():
            where = f"tolerances[{name!r}]"
            self.keys(where, tol, _TOLERANCE_KEYS, '{"rtol": number, "atol": number}')
            for key in _TOLERANCE_KEYS:
                self.number(f"{where}.{key}", tol[key], minimum=0)

    def signatures(self, signatures: Any, metrics: Mapping[str, Any]) -> None:
        if not isinstance(signatures, list):
            self.fail("signatures", signatures, f"must be an array of findings, got "
                      f"{_json_type(signatures)}")
        for i, finding in enumerate(signatures):
            where = f"signatures[{i}]"
            self.keys(where, finding, _SIGNATURE_KEYS, "{signature, metric, severity, step}")
            for key in ("signature", "metric"):
                if not isinstance(finding[key], str) or not finding[key]:
                    self.fail(f"{where}.{key}", finding[key], "must be a non-empty string")
            if finding["metric"] not in metrics:
                self.fail(f"{where}.metric", finding["metric"], "is not a metric of this golden")
            if finding["severity"] not in SEVERITIES:
                self.fail(f"{where}.severity", finding["severity"],
                          f"must be one of {list(SEVERITIES)}")
            self.number(f"{where}.step", finding["step"])


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite constant {name}")


def _read_bytes(path: Path) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GoldenError(f"{path}: golden file not found") from None
    except OSError as exc:
        raise GoldenError(f"{path}: cannot read the golden file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read, a directory fail it
        raise GoldenError(f"{path}: is a {file_kind(st.st_mode)}, not a golden file (a JSON "
                          "file)")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise GoldenError(f"{path}: cannot read the golden file ({exc.strerror or exc})") from None


def _parse(path: Path, data: bytes) -> Any:
    if data[:1] == b"\x80" and data[1:2] and 2 <= data[1] <= 5:
        raise GoldenError(f"{path}: looks like a Python pickle (protocol {data[1]}), not JSON; "
                          "goldens are JSON only and nothing is ever unpickled")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GoldenError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); a golden is a JSON file") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise GoldenError(f"{path}:{exc.lineno}:{exc.colno}: corrupt golden JSON: "
                          f"{exc.msg}") from None
    except RecursionError:
        raise GoldenError(f"{path}: JSON nested too deeply to read (a golden is a few levels "
                          "deep)") from None
    except ValueError as exc:
        finite = " (goldens are finite)" if "non-finite constant" in str(exc) else ""
        raise GoldenError(f"{path}: corrupt golden JSON: {' '.join(str(exc).split())}"
                          f"{finite}") from None


def read_golden(path: Path) -> dict[str, Any]:
    """Parse and validate a golden file completely; return the document.

    Valid means: the six keys and no other, ``schema_version`` the integer this harness
    reads, ``metadata`` an object with the config's SHA-256, ``metrics`` a non-empty object
    of curves whose ``steps`` are finite, strictly increasing numbers and whose ``values``
    (as many) are all finite numbers or all strings (a text metric), ``tolerances`` per
    metric ``{rtol, atol}`` finite and >= 0, ``signatures`` findings ``{signature, metric,
    severity, step}`` of the scan contract. Nothing in a valid golden can make a comparison
    pass without comparing (an all-null curve, an empty one, a NaN tolerance).

    Raises:
      GoldenError: one line naming the file and the problem: not found, unreadable (a
        directory, a FIFO, permission denied), not UTF-8, a pickle, corrupt or too deeply
        nested JSON, or any schema violation above (with where and the value).
    """
    path = Path(path)
    doc = _parse(path, _read_bytes(path))
    _Check(path).document(doc)
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
