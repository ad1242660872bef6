"""Golden runs: short deterministic training runs recorded as JSON curves.

File contract (DESIGN.md "Golden files"): ``golden/<run>/<device-key>.json`` holding
``{"schema_version", "run", "metadata", "metrics": {name: {"steps", "values"}},
"tolerances": {name: {"rtol", "atol"}}, "signatures": [...]}``. JSON only, nothing
is unpickled; writes are atomic (temp file + rename); a non-finite curve or one
that differs between two seeded runs is refused; a config-hash mismatch is a
"stale golden" failure, distinct from a tolerance failure; a golden for another
device key is never compared. On mismatch, ``<run>.<device>.obtained.json`` and a
PNG of golden vs obtained are written to the output directory and the message
names the metric, step, golden and obtained values, the plot and how to update.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from invariants._assertions import invariant_check
from invariants._errors import InvalidArgumentError, InvariantViolation, require

__all__ = [
    "GoldenError",
    "GoldenRun",
    "GoldenTolerance",
    "assert_matches_golden",
    "compare_curves",
    "device_key",
    "deterministic",
    "findings_of",
    "one_thread",
    "read_golden",
    "record_golden",
    "run_spread",
    "write_json_atomic",
]

SCHEMA_VERSION = 1
Curves = dict[str, tuple[list[float], list[float]]]


class GoldenError(InvalidArgumentError):
    """A golden file or golden run is unusable: corrupt, unknown, from the future, nondeterministic."""


@dataclass(frozen=True)
class GoldenTolerance:
    rtol: float
    atol: float

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                    name, value, "must be a finite number >= 0")


# Default per-metric tolerances for a CPU run compared with a CPU golden (bit-identical
# in practice; the slack absorbs a different BLAS build). Runs override per metric from
# measured spread (`invariants golden --repeat N`), never by guessing.
DEFAULT_TOLERANCE = GoldenTolerance(rtol=1e-5, atol=1e-6)


@dataclass(frozen=True)
class GoldenRun:
    """A named short training run of a reference model.

    Args:
      name: ``<system>-<fixed|broken>`` style identifier; the golden directory name.
      fn: ``fn(seed, device) -> {metric: (steps, values)}``; must be deterministic on CPU.
      config: JSON-serialisable description of everything that shapes the curves; its
        SHA-256 is stored, and a mismatch means "stale golden, regenerate".
      tolerances: per-metric overrides of ``DEFAULT_TOLERANCE``.
      signatures: the collapse findings the run must show, as ``(signature, metric)``
        pairs (empty for a fixed run: it must show none).
      check: optional ``check(curves)`` raising InvariantViolation when the run does not
        show its documented mechanism (broken runs) — beyond the signature list.
      seed: the RNG seed of the run.
      note: what the run can and cannot reproduce of the seed's collapse (stored in the file).
      signature_config: the ``SignatureConfig`` its curves are scanned with; it must be the
        same for a system's fixed and broken run (stored in ``config`` so it is hashed).
    """

    name: str
    fn: Callable[[int, torch.device], Mapping[str, tuple[Sequence[float], Sequence[float]]]]
    config: Mapping[str, Any]
    tolerances: Mapping[str, GoldenTolerance] = field(default_factory=dict)
    signatures: tuple[tuple[str, str], ...] = ()
    check: Callable[[Curves], None] | None = None
    seed: int = 0
    note: str = ""
    signature_config: Any = None  # a SignatureConfig for scanning this run (None: defaults)

    @property
    def config_sha256(self) -> str:
        blob = json.dumps({"run": self.config, "signature_config": repr(self.signature_config)},
                          sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def tolerance(self, metric: str) -> GoldenTolerance:
        return self.tolerances.get(metric, DEFAULT_TOLERANCE)


def device_key(device: torch.device | str) -> str:
    """``cpu`` or ``cuda-sm<major><minor>`` (e.g. ``cuda-sm90``)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    raise InvalidArgumentError(f"device={device}: golden runs support cpu and cuda only")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread; restore the caller's setting after.

    For the reference models' tiny tensors a second thread only adds synchronisation
    (measured 5-30x slower on a loaded 2-core machine), and a fixed count keeps
    floating-point reduction order, hence golden curves, independent of the machine.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def deterministic(seed: int, *, threads: int = 1) -> Iterator[None]:
    """Seed python/numpy/torch, force deterministic algorithms and a fixed thread count."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    try:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.random.set_rng_state(saved[2])
        random.setstate(saved[3])
        np.random.set_state(saved[4])
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def _execute(run: GoldenRun, device: torch.device) -> Curves:
    with deterministic(run.seed):
        raw = run.fn(run.seed, device)
    curves: Curves = {}
    for metric, pair in raw.items():
        steps, values = pair
        steps = [int(s) if float(s).is_integer() else float(s) for s in steps]
        values = list(values) if values and all(isinstance(v, str) for v in values) \
            else [float(v) for v in values]  # text metrics (generated samples) stay strings
        if len(steps) != len(values):
            raise GoldenError(f"run {run.name!r}, metric {metric!r}: {len(steps)} steps but "
                              f"{len(values)} values")
        curves[metric] = (steps, values)
    return curves


def _metadata(run: GoldenRun, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = list(torch.cuda.get_device_capability(device))
    else:
        name, capability = platform.processor() or platform.machine(), None
    return {
        "torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__,
        "device": device_key(device), "device_name": name, "device_capability": capability,
        "num_threads": 1, "seed": run.seed, "dtype": str(torch.get_default_dtype()),
        "determinism": {"use_deterministic_algorithms": True,
                        "CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
        "config_sha256": run.config_sha256, "config": run.config,
        "command": "pytest -m golden --golden-update  (or: invariants golden --update)",
        "note": run.note,
    }


def findings_of(run: GoldenRun, curves: Curves) -> list[dict[str, Any]]:
    """The collapse findings of the run's curves (canonical metric names only), as dicts."""
    from invariants._signatures import CANONICAL_METRICS, scan_series
    series = {m: c for m, c in curves.items() if m in CANONICAL_METRICS}
    return [{"signature": f.signature, "metric": f.metric, "severity": f.severity,
             "step": f.step} for f in scan_series(series, run.signature_config)]


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
    return _record(run, golden_dir, device, signatures)[0]


def _record(run: GoldenRun, golden_dir: Path, device: torch.device | str,
            signatures: Sequence[Mapping[str, Any]] = ()) -> tuple[Path, Curves]:
    device = torch.device(device)
    first = _execute(run, device)
    bad = _nonfinite(first)
    if bad:
        raise GoldenError(f"run {run.name!r}: refusing to record a non-finite curve: {bad[0]}")
    second = _execute(run, device)
    diff = _first_difference(first, second)
    signatures = list(signatures) or findings_of(run, first)
    if diff:
        raise GoldenError(f"run {run.name!r}: refusing to record a curve that differs between "
                          f"two seeded runs ({diff}); make the run deterministic first")
    doc = {
        "schema_version": SCHEMA_VERSION, "run": run.name, "metadata": _metadata(run, device),
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


@dataclass(frozen=True)
class Mismatch:
    metric: str
    index: int
    step: float
    golden: float
    obtained: float
    allowed: float
    count: int
    total: int

    def line(self) -> str:
        return (f"  {self.metric}: {self.count}/{self.total} points outside tolerance; worst at "
                f"step {self.step}: golden {self.golden:.9g}, obtained {self.obtained:.9g} "
                f"(|diff| {abs(self.obtained - self.golden):.3g} > allowed {self.allowed:.3g})")


def compare_curves(obtained: Curves, golden: Mapping[str, Mapping[str, list]],
                   tolerance: Callable[[str], GoldenTolerance]) -> list[Mismatch | str]:
    """Per-metric worst mismatch (or a structural problem as a string)."""
    problems: list[Mismatch | str] = []
    for metric in sorted(set(golden) - set(obtained)):
        problems.append(f"  {metric}: in the golden but not produced by the run")
    for metric in sorted(set(obtained) - set(golden)):
        problems.append(f"  {metric}: produced by the run but not in the golden")
    for metric in sorted(set(obtained) & set(golden)):
        steps, values = obtained[metric]
        g_steps, g_values = golden[metric]["steps"], golden[metric]["values"]
        if list(steps) != list(g_steps):
            problems.append(f"  {metric}: steps differ (golden {len(g_steps)} points, obtained "
                            f"{len(steps)}; first golden steps {g_steps[:3]}, obtained {steps[:3]})")
            continue
        if any(isinstance(v, str) for v in list(values) + list(g_values)):
            bad = [i for i, (a, b) in enumerate(zip(values, g_values)) if a != b]
            if bad:
                i = bad[0]
                problems.append(f"  {metric}: {len(bad)}/{len(values)} texts differ; first at step "
                                f"{steps[i]}: golden {g_values[i]!r}, obtained {values[i]!r}")
            continue
        tol = tolerance(metric)
        o = np.asarray(values, dtype=np.float64)
        g = np.asarray(g_values, dtype=np.float64)
        allowed = tol.atol + tol.rtol * np.abs(g)
        diff = np.abs(o - g)
        diff = np.where(np.isnan(diff), np.inf, diff)
        bad = diff > allowed
        if bad.any():
            i = int(np.argmax(np.where(bad, diff - allowed, -np.inf)))
            problems.append(Mismatch(metric, i, steps[i], float(g[i]), float(o[i]),
                                     float(allowed[i]), int(bad.sum()), len(o)))
    return problems


def _plot(path: Path, run: str, obtained: Curves, golden: Mapping[str, Any],
          problems: Sequence[Mismatch | str]) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def numeric(vals) -> bool:
        return not any(isinstance(v, str) for v in vals)

    metrics = sorted(m for m in set(obtained) | set(golden)
                     if numeric(obtained.get(m, ((), ()))[1])
                     and numeric(golden.get(m, {}).get("values", ())))
    worst = {p.metric: p for p in problems if isinstance(p, Mismatch)}
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.4 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        if metric in golden:
            ax.plot(golden[metric]["steps"], golden[metric]["values"], label="golden", lw=2,
                    color="tab:blue")
        if metric in obtained:
            ax.plot(obtained[metric][0], obtained[metric][1], label="obtained", lw=1.2,
                    ls="--", color="tab:red")
        if metric in worst:
            w = worst[metric]
            ax.axvline(w.step, color="black", lw=0.8, ls=":")
            ax.annotate(f"worst: step {w.step}", (w.step, w.obtained), fontsize=8)
        ax.set_title(f"{metric}" + ("  (MISMATCH)" if metric in worst else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"golden vs obtained: {run}")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


@invariant_check("golden")
def assert_matches_golden(run: GoldenRun, golden_dir: Path, *, device: torch.device | str = "cpu",
                          output_dir: Path, curves: Curves | None = None,
                          ci: bool | None = None) -> Curves:
    """Run (or take ``curves``), compare with ``golden/<run>/<device-key>.json``, return the curves.

    Raises:
      InvariantViolation: a stale golden (config hash changed), a missing golden, or
        curves outside the per-metric tolerance table; the message names the metric,
        step, golden and obtained values, the written ``.obtained.json`` and plot, and
        how to update.
      GoldenError: the golden file is corrupt, from a future schema, or for another run.
    """
    __tracebackhide__ = True
    device = torch.device(device)
    key = device_key(device)
    path = Path(golden_dir) / run.name / f"{key}.json"
    update_hint = (f"if the change is intended, regenerate with `pytest -m golden "
                   f"--golden-update -k {run.name}` or `invariants golden --update --run "
                   f"{run.name}` (rewrites only {key})")
    if curves is None:
        curves = _execute(run, device)
    output_dir = Path(output_dir)
    obtained_path = output_dir / f"{run.name}.{key}.obtained.json"
    ci = bool(os.environ.get("CI")) if ci is None else ci
    if not path.exists():
        raise InvariantViolation(
            f"missing golden {path} for run {run.name!r} on device key {key!r}; goldens are "
            f"never skipped. Create it: {update_hint}")
    golden = read_golden(path)
    if golden["run"] != run.name:
        raise GoldenError(f"{path}: golden is for run {golden['run']!r}, expected {run.name!r}")
    stored_sha = golden["metadata"].get("config_sha256")
    if stored_sha != run.config_sha256:
        raise InvariantViolation(
            f"stale golden, regenerate: {path} was recorded for config sha256 "
            f"{str(stored_sha)[:12]}…, the run's config is now {run.config_sha256[:12]}… "
            f"(this is not a tolerance failure: the run itself changed). {update_hint}")
    problems: list[Mismatch | str] = compare_curves(curves, golden["metrics"], run.tolerance)
    found = findings_of(run, curves)
    if found != golden["signatures"]:
        key_of = lambda f: (f["signature"], f["metric"], f["severity"], f["step"])  # noqa: E731
        want, got = {key_of(f) for f in golden["signatures"]}, {key_of(f) for f in found}
        problems.append(f"  collapse signatures changed: new {sorted(got - want)}, "
                        f"gone {sorted(want - got)}")
    if problems:
        write_json_atomic(obtained_path, {
            "schema_version": SCHEMA_VERSION, "run": run.name,
            "metadata": _metadata(run, device),
            "metrics": {m: {"steps": s, "values": [v if isinstance(v, str) or math.isfinite(v)
                                                   else str(v) for v in vals]}
                        for m, (s, vals) in sorted(curves.items())},
            "tolerances": {m: {"rtol": run.tolerance(m).rtol, "atol": run.tolerance(m).atol}
                           for m in sorted(curves)},
            "signatures": found})
        plot = _plot(output_dir / f"{run.name}.{key}.obtained.png", run.name, curves,
                     golden["metrics"], problems)
        lines = [p.line() if isinstance(p, Mismatch) else p for p in problems]
        raise InvariantViolation(
            f"golden run {run.name!r} ({key}) differs from {path}:\n" + "\n".join(lines) +
            f"\n  obtained curves: {obtained_path}\n  plot: {plot}\n  {update_hint}")
    return curves


def run_spread(run: GoldenRun, repeats: int, device: torch.device | str = "cpu"
               ) -> dict[str, dict[str, float]]:
    """Run ``repeats`` times; per metric, the largest absolute and relative spread seen.

    Used to set the tolerance table from measurement: on CPU the spread is 0.0 when
    the run is deterministic; on a GPU it is the floor for ``atol``/``rtol``.
    """
    require(isinstance(repeats, int) and repeats >= 2, "repeats", repeats,
            "must be an integer >= 2")
    device = torch.device(device)
    runs = [_execute(run, device) for _ in range(repeats)]
    out: dict[str, dict[str, float]] = {}
    for metric in sorted(runs[0]):
        values = np.array([r[metric][1] for r in runs], dtype=np.float64)
        spread = values.max(axis=0) - values.min(axis=0)
        scale = np.abs(values).max(axis=0)
        rel = np.where(scale > 0, spread / np.where(scale > 0, scale, 1), 0.0)
        out[metric] = {"max_abs_spread": float(spread.max(initial=0.0)),
                       "max_rel_spread": float(rel.max(initial=0.0))}
    return out


# ------------------------------------------------------------------ CLI: invariants golden
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "golden", help="compare, regenerate (--update) or measure the spread (--repeat N) of "
                       "golden runs")
    p.add_argument("--runs", default="reference_models.golden_runs",
                   help="module defining RUNS (default: %(default)s)")
    p.add_argument("--run", action="append", default=[], metavar="NAME",
                   help="only this run (repeatable)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--golden-dir", default="golden", help="default: %(default)s")
    p.add_argument("--output", default="golden-obtained",
                   help="where mismatches write .obtained.json and plots (default: %(default)s)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--update", action="store_true",
                       help="rewrite golden/<run>/<this device key>.json (other keys untouched)")
    group.add_argument("--repeat", type=int, metavar="N",
                       help="run each N times and print the per-metric spread (for tolerances)")
    p.set_defaults(func=_cmd_golden)


def _load_runs(module: str, names: Sequence[str]) -> list[GoldenRun]:
    import importlib
    try:
        runs = list(importlib.import_module(module).RUNS)
    except ModuleNotFoundError as exc:
        raise InvalidArgumentError(f"--runs={module!r}: cannot import it ({exc})") from None
    except AttributeError:
        raise InvalidArgumentError(f"--runs={module!r}: the module defines no RUNS") from None
    known = {r.name: r for r in runs}
    for name in names:
        if name not in known:
            raise GoldenError(f"--run={name!r}: unknown golden run; known runs: "
                              f"{', '.join(sorted(known))}")
    return [known[n] for n in names] if names else runs


def _cmd_golden(args) -> int:
    runs = _load_runs(args.runs, args.run)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device=cuda: torch.cuda.is_available() is False here")
    device = torch.device(args.device)
    failed = 0
    for run in runs:
        if args.repeat is not None:
            spread = run_spread(run, args.repeat, device)
            print(f"{run.name} ({device_key(device)}, {args.repeat} runs):")
            for metric, s in spread.items():
                print(f"  {metric:<24} max |spread| {s['max_abs_spread']:.3g}   "
                      f"max relative {s['max_rel_spread']:.3g}   (tolerance now "
                      f"rtol={run.tolerance(metric).rtol:g}, atol={run.tolerance(metric).atol:g})")
        elif args.update:
            path, _ = _record(run, Path(args.golden_dir), device)
            print(f"updated {path}")
        else:
            try:
                assert_matches_golden(run, Path(args.golden_dir), device=device,
                                      output_dir=Path(args.output))
                print(f"{run.name} ({device_key(device)}): matches golden")
            except InvariantViolation as exc:
                failed += 1
                print(f"{run.name} ({device_key(device)}): MISMATCH\n{exc}")
    return 1 if failed else 0
