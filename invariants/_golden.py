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
from invariants._errors import InvalidArgumentError, InvariantViolation
from invariants._validate import require

__all__ = [
    "GoldenError",
    "GoldenRun",
    "GoldenTolerance",
    "assert_matches_golden",
    "assert_ranks_logged_same_curves",
    "compare_curves",
    "device_key",
    "deterministic",
    "distributed_deviations",
    "execute_distributed",
    "execute_distributed_jobs",
    "execute_memoized",
    "findings_of",
    "mechanism_problems",
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
# Where spawned ranks find the runs by name (a run's fn is a closure: it cannot be sent).
DEFAULT_RUNS_MODULE = "reference_models.golden_runs"


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
        same for a system's fixed and broken run (hashed into ``config_sha256``).
      kind: ``"fixed"`` (no critical finding allowed) or ``"broken"`` (its ``signatures``
        must all be found).
      distributed_tolerances: per-metric tolerances for comparing a world-size >= 2 run
        (``assert_matches_golden(world_size=2)``) with the world-size-1 golden; measured
        (``invariants golden --world-size 2 --deviations``). Unlisted metrics use
        ``tolerance(metric)``. Not hashed: the golden itself does not depend on them.
      distributed_exclusions: ``{metric: reason}`` for metrics that cannot match the
        world-size-1 golden under data parallelism; they are still required to be
        identical on every rank, and the reason is printed with every comparison.
      distributed_horizon: ``(step, reason)``: at world size >= 2 compare the curves and
        the findings only at steps < ``step``. For a run whose dynamics amplify the
        float32 rounding of the gradient average (a broken, unstable run): the measured
        step where the deviation starts its exponential growth. Beyond it, the run's
        ``check`` and its listed ``signatures`` must still hold on the obtained curves.
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
    distributed_tolerances: Mapping[str, GoldenTolerance] = field(default_factory=dict)
    distributed_exclusions: Mapping[str, str] = field(default_factory=dict)
    distributed_horizon: tuple[int, str] | None = None
    kind: str = "fixed"  # "fixed": must show no collapse; "broken": must show `signatures`

    def __post_init__(self) -> None:
        require(self.kind in ("fixed", "broken"), "kind", self.kind, "must be 'fixed' or 'broken'")
        for metric, why in self.distributed_exclusions.items():
            require(isinstance(why, str) and why.strip() != "", f"distributed_exclusions[{metric!r}]",
                    why, "must give the reason the metric cannot match (never exclude silently)")
        if self.distributed_horizon is not None:
            step, why = self.distributed_horizon
            require(isinstance(step, int) and step >= 1 and isinstance(why, str) and why.strip(),
                    "distributed_horizon", self.distributed_horizon,
                    "must be (step >= 1, the measured reason)")

    @property
    def config_sha256(self) -> str:
        tolerances = {m: [t.rtol, t.atol] for m, t in sorted(self.tolerances.items())}
        blob = json.dumps({"run": self.config, "signature_config": repr(self.signature_config),
                           "tolerances": tolerances}, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def tolerance(self, metric: str) -> GoldenTolerance:
        return self.tolerances.get(metric, DEFAULT_TOLERANCE)

    def distributed_tolerance(self, metric: str) -> GoldenTolerance:
        """The tolerance of ``metric`` when a world-size >= 2 run is compared with the golden."""
        return self.distributed_tolerances.get(metric, self.tolerance(metric))


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


_MEMO: dict[tuple[str, str, str, int], tuple[Callable, Curves]] = {}


def execute_memoized(run: GoldenRun, device: torch.device | str = "cpu") -> Curves:
    """The run's curves, computed once per process for (name, config hash, device, fn).

    Runs are deterministic (``test_two_cpu_runs_are_bit_identical``), so tests that only
    *read* a run's curves share one execution; tests about determinism itself call
    ``_execute`` for a fresh one. Callers get copies: mutating them cannot leak.
    """
    device = torch.device(device)
    key = (run.name, run.config_sha256, str(device), id(run.fn))
    hit = _MEMO.get(key)
    if hit is None or hit[0] is not run.fn:  # the fn is kept, so its id cannot be reused
        hit = _MEMO[key] = (run.fn, _execute(run, device))
    return {m: (list(s), list(v)) for m, (s, v) in hit[1].items()}


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


def mechanism_problems(run: GoldenRun, curves: Curves,
                       found: Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """What is wrong with a run's behaviour, independent of any golden file.

    A ``fixed`` run must show no critical (collapse) finding; a ``broken`` run must show
    every ``(signature, metric)`` in ``run.signatures``; every run must pass ``run.check``.
    """
    found = findings_of(run, curves) if found is None else found
    problems = []
    if run.kind == "fixed":
        critical = [f for f in found if f["severity"] == "critical"]
        if critical:
            problems.append(f"  the fixed run shows collapse signatures: {critical}")
    shown = {(f["signature"], f["metric"]) for f in found}
    missing = [pair for pair in run.signatures if tuple(pair) not in shown]
    if missing:
        problems.append(f"  the run's documented signatures are missing: {missing} "
                        f"(found: {sorted(shown)})")
    if run.check is not None:
        try:
            run.check(curves)
        except InvariantViolation as exc:
            problems.append(f"  the run's own check fails: {exc}")
    return problems


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
    wrong = mechanism_problems(run, first, signatures)
    if wrong:
        raise GoldenError(f"run {run.name!r}: refusing to record a golden for a run that does "
                          "not behave as documented:\n" + "\n".join(wrong))
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


def _before(curve: tuple[list, list], horizon: int | None) -> tuple[list, list]:
    steps, values = curve
    if horizon is None:
        return curve
    keep = [i for i, st in enumerate(steps) if st < horizon]
    return [steps[i] for i in keep], [values[i] for i in keep]


def _before_golden(curve: Mapping[str, list], horizon: int | None) -> Mapping[str, list]:
    steps, values = _before((curve["steps"], curve["values"]), horizon)
    return {"steps": steps, "values": values}


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
                          world_size: int = 1,
                          per_rank: Sequence[Curves] | None = None,
                          runs_module: str = DEFAULT_RUNS_MODULE,
                          timeout: float = 120.0) -> Curves:
    """Run (or take ``curves``), compare with ``golden/<run>/<device-key>.json``, return the curves.

    With ``world_size >= 2`` the run is executed data-parallel on that many gloo ranks
    (``execute_distributed``, or take their curves as ``per_rank``). Every rank must
    have logged the same curves (``assert_ranks_logged_same_curves``); rank 0's curves
    are compared with the world-size-1 golden using ``run.distributed_tolerance`` and
    without ``run.distributed_exclusions``. Returns rank 0's curves.

    Raises:
      InvariantViolation: a stale golden (config hash changed), a missing golden,
        a run that does not behave as documented (``mechanism_problems``), or
        curves outside the per-metric tolerance table; the message names the metric,
        step, golden and obtained values, the written ``.obtained.json`` and plot, and
        how to update. At world size >= 2 also: ranks that logged different curves
        (naming the metric, step and rank).
      GoldenError: the golden file is corrupt, from a future schema, or for another run;
        an exclusion names a metric the run does not log.
    """
    __tracebackhide__ = True
    require(isinstance(world_size, int) and not isinstance(world_size, bool) and world_size >= 1,
            "world_size", world_size, "must be an integer >= 1")
    device = torch.device(device)
    key = device_key(device)
    path = Path(golden_dir) / run.name / f"{key}.json"
    update_hint = (f"if the change is intended, regenerate with `pytest -m golden "
                   f"--golden-update -k {run.name}` or `invariants golden --update --run "
                   f"{run.name}` (rewrites only {key})")
    tolerance = run.tolerance
    excluded: Mapping[str, str] = {}
    suffix, where = "", f"({key})"
    if world_size > 1:
        if per_rank is None:
            per_rank = execute_distributed([run], world_size, runs_module=runs_module,
                                           device=device, timeout=timeout)[run.name]
        require(len(per_rank) == world_size, "per_rank", f"{len(per_rank)} ranks",
                f"must hold one curve set per rank (world_size={world_size})")
        assert_ranks_logged_same_curves(run.name, per_rank)
        curves = per_rank[0]
        excluded = run.distributed_exclusions
        unknown = sorted(set(excluded) - set(curves))
        if unknown:
            raise GoldenError(f"run {run.name!r}: distributed_exclusions name metrics the run "
                              f"does not log: {unknown}")
        tolerance = run.distributed_tolerance
        suffix, where = f".ws{world_size}", f"({key}, world size {world_size}, rank 0)"
        update_hint = (f"the golden is the world-size-1 run: if `invariants golden --run "
                       f"{run.name}` matches, the data-parallel path of the training function "
                       f"differs (see `invariants golden --world-size {world_size} --deviations "
                       f"--run {run.name}`)")
    elif curves is None:
        curves = _execute(run, device)
    output_dir = Path(output_dir)
    obtained_path = output_dir / f"{run.name}.{key}{suffix}.obtained.json"
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
    horizon = run.distributed_horizon[0] if world_size > 1 and run.distributed_horizon else None
    problems: list[Mismatch | str] = compare_curves(
        {m: _before(c, horizon) for m, c in curves.items() if m not in excluded},
        {m: _before_golden(g, horizon) for m, g in golden["metrics"].items()
         if m not in excluded}, tolerance)
    found = findings_of(run, curves)
    want_findings = golden["signatures"]
    if horizon is not None:
        found_early = [f for f in found if f["step"] < horizon]
        want_findings = [f for f in want_findings if f["step"] < horizon]
    else:
        found_early = found
    if found_early != want_findings:
        key_of = lambda f: (f["signature"], f["metric"], f["severity"], f["step"])  # noqa: E731
        want, got = {key_of(f) for f in want_findings}, {key_of(f) for f in found_early}
        problems.append(f"  collapse signatures changed: new {sorted(got - want)}, "
                        f"gone {sorted(want - got)}"
                        + (f" (steps < {horizon})" if horizon is not None else ""))
    problems += mechanism_problems(run, curves, found)  # also under data parallelism
    if world_size > 1:
        if horizon is not None and problems:
            problems.append(f"  compared at steps < {horizon} only: {run.distributed_horizon[1]}")
    if problems:
        write_json_atomic(obtained_path, {
            "schema_version": SCHEMA_VERSION, "run": run.name,
            "metadata": _metadata(run, device),
            "metrics": {m: {"steps": s, "values": [v if isinstance(v, str) or math.isfinite(v)
                                                   else str(v) for v in vals]}
                        for m, (s, vals) in sorted(curves.items())},
            "tolerances": {m: {"rtol": tolerance(m).rtol, "atol": tolerance(m).atol}
                           for m in sorted(curves)},
            "signatures": found})
        plot = _plot(output_dir / f"{run.name}.{key}{suffix}.obtained.png", run.name, curves,
                     golden["metrics"], problems)
        lines = [p.line() if isinstance(p, Mismatch) else p for p in problems]
        lines += [f"  {m}: excluded from the world-size-{world_size} comparison: {why}"
                  for m, why in sorted(excluded.items())]
        raise InvariantViolation(
            f"golden run {run.name!r} {where} differs from {path}:\n" + "\n".join(lines) +
            f"\n  obtained curves: {obtained_path}\n  plot: {plot}\n  {update_hint}")
    return curves


# ------------------------------------------------------- world size >= 2 (torch.distributed)
def _golden_rank_worker(rank: int, world_size: int, runs_module: str,
                        jobs: list[tuple[list[str], bool]], device: str
                        ) -> list[dict[str, dict[str, list]]]:
    """One rank: each job's runs under ``deterministic(seed)``, inside the process group.

    A job is ``(run names, reduce_metrics)``. ``reduce_metrics=False`` sets
    ``reference_models.data_parallel.REDUCE_METRICS`` to False for that job: each rank
    then logs its own shard's metrics (the bug ``assert_ranks_logged_same_curves``
    exists to catch).
    """
    from reference_models import data_parallel
    out = []
    for names, reduce_metrics in jobs:
        data_parallel.REDUCE_METRICS = reduce_metrics
        try:
            curves_of = {}
            for run in _load_runs(runs_module, names):
                curves = _execute(run, torch.device(device))
                curves_of[run.name] = {m: [list(st), list(vals)] for m, (st, vals) in curves.items()}
        finally:
            data_parallel.REDUCE_METRICS = True
        out.append(curves_of)
    # Free the runs' DDP reducers while the group is alive, and leave together: a rank
    # that tears the group down (rank 0 hosts the store) while the other is still in
    # its last collective or its teardown made a rank die in C++ ("terminate called
    # without an active exception"), observed a few times in 20-odd groups.
    import gc
    import torch.distributed as dist
    gc.collect()
    dist.barrier()
    return out


def execute_distributed(runs: Sequence[GoldenRun], world_size: int = 2, *,
                        runs_module: str = DEFAULT_RUNS_MODULE, device: torch.device | str = "cpu",
                        timeout: float = 120.0, reduce_metrics: bool = True
                        ) -> dict[str, list[Curves]]:
    """Run golden runs on ``world_size`` gloo ranks (one spawned group for all of them).

    The ranks import ``runs_module`` and look the runs up by name (a run's ``fn`` is a
    closure and cannot be sent to a spawned process); a run whose config there differs
    from the caller's is a GoldenError. The training functions go data-parallel under
    the process group (``reference_models.data_parallel``). Returns
    ``{run name: [rank 0 curves, rank 1 curves, ...]}``. ``reduce_metrics=False`` is the
    broken variant (every rank logs its own shard's metrics), for tests.
    """
    return execute_distributed_jobs([(runs, reduce_metrics)], world_size, runs_module=runs_module,
                                    device=device, timeout=timeout)[0]


def execute_distributed_jobs(jobs: Sequence[tuple[Sequence[GoldenRun], bool]],
                             world_size: int = 2, *, runs_module: str = DEFAULT_RUNS_MODULE,
                             device: torch.device | str = "cpu", timeout: float = 120.0
                             ) -> list[dict[str, list[Curves]]]:
    """Several ``(runs, reduce_metrics)`` jobs in ONE spawned group (spawning costs seconds)."""
    from invariants._distributed import spawn_group
    require(isinstance(world_size, int) and not isinstance(world_size, bool) and world_size >= 2,
            "world_size", world_size, "must be an integer >= 2 (world size 1 is _execute)")
    device = torch.device(device)
    require(device.type == "cpu", "device", device, "distributed golden runs use gloo on cpu")
    known = {r.name: r for r in _load_runs(runs_module, [])}
    for runs, _ in jobs:
        for run in runs:
            if run.name not in known or known[run.name].config_sha256 != run.config_sha256:
                raise GoldenError(f"run {run.name!r}: {runs_module}.RUNS has no run of that name "
                                  "with the same config; the ranks could not run it")
    payload = [([r.name for r in runs], bool(reduce)) for runs, reduce in jobs]
    per_rank = spawn_group(_golden_rank_worker, world_size, runs_module, payload, str(device),
                           timeout=timeout)
    return [{name: [{m: (list(st), list(vals)) for m, (st, vals) in ranks[j][name].items()}
                    for ranks in per_rank] for name in names}
            for j, (names, _) in enumerate(payload)]


@invariant_check("golden")
def assert_ranks_logged_same_curves(run_name: str, per_rank: Sequence[Curves]) -> None:
    """Every rank logged the same metrics, steps and values as rank 0 (exactly).

    A data-parallel run reduces its metrics over the ranks; a metric that was not
    reduced shows up as a rank logging its own shard's value.

    Raises:
      InvariantViolation: naming the earliest step at which a rank disagrees, the
        metric, both values, and every other metric that disagrees.
    """
    __tracebackhide__ = True
    ref = per_rank[0]
    disagreements = []   # (step, metric, rank, rank-0 value, rank value)
    for rank, curves in enumerate(per_rank[1:], start=1):
        if set(curves) != set(ref):
            raise InvariantViolation(
                f"run {run_name!r}: rank {rank} logged metrics {sorted(curves)}, rank 0 logged "
                f"{sorted(ref)}")
        for metric in sorted(ref):
            (s0, v0), (s1, v1) = ref[metric], curves[metric]
            if list(s0) != list(s1):
                raise InvariantViolation(
                    f"run {run_name!r}: rank {rank} logged {metric!r} at steps {list(s1)[:5]}..., "
                    f"rank 0 at {list(s0)[:5]}... ({len(s1)} vs {len(s0)} points)")
            for step, a, b in zip(s0, v0, v1):
                same = a == b or (isinstance(a, float) and isinstance(b, float)
                                  and math.isnan(a) and math.isnan(b))
                if not same:
                    disagreements.append((step, metric, rank, a, b))
                    break
    if disagreements:
        step, metric, rank, a, b = min(disagreements, key=lambda d: (d[0], d[2], d[1]))
        others = sorted({f"{m} (rank {r}, step {st})" for st, m, r, _, _ in disagreements
                         if (m, r) != (metric, rank)})
        raise InvariantViolation(
            f"run {run_name!r}: rank {rank} disagreed with rank 0 on {metric!r} at step {step}: "
            f"rank 0 logged {a!r}, rank {rank} logged {b!r} (every rank must log the "
            f"full-batch value: is the metric reduced over the ranks?)"
            + (f"\n  also disagreeing, first step each: {', '.join(others)}" if others else ""))


def distributed_deviations(curves: Curves, golden: Mapping[str, Mapping[str, list]]
                           ) -> dict[str, dict[str, Any]]:
    """Per metric: bit-identical or not, the largest |diff| and relative diff, and where.

    What the distributed tolerance table is set from (with a margin, documented).
    """
    out: dict[str, dict[str, Any]] = {}
    for metric in sorted(set(curves) & set(golden)):
        values, g_values = curves[metric][1], golden[metric]["values"]
        steps = curves[metric][0]
        if any(isinstance(v, str) for v in list(values) + list(g_values)):
            differ = sum(a != b for a, b in zip(values, g_values))
            out[metric] = {"exact": differ == 0 and len(values) == len(g_values),
                           "texts_differ": differ, "of": len(values)}
            continue
        if len(values) != len(g_values):
            out[metric] = {"exact": False, "length": (len(values), len(g_values))}
            continue
        o = np.asarray(values, dtype=np.float64)
        g = np.asarray(g_values, dtype=np.float64)
        diff = np.abs(o - g)
        rel = np.where(np.abs(g) > 0, diff / np.where(np.abs(g) > 0, np.abs(g), 1.0), diff)
        i = int(np.argmax(diff)) if len(diff) else 0
        first = next((steps[k] for k in range(len(diff)) if diff[k] != 0), None)
        out[metric] = {"exact": bool((o == g).all()), "max_abs": float(diff.max(initial=0.0)),
                       "max_rel": float(rel.max(initial=0.0)),
                       "worst_step": steps[i] if len(diff) else None,
                       "first_inexact_step": first}
    return out


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
    p.add_argument("--world-size", type=int, default=1, metavar="W",
                   help="run data-parallel on W gloo CPU ranks (one spawned group) and compare "
                        "rank 0 with the world-size-1 golden (default: %(default)s)")
    p.add_argument("--deviations", action="store_true",
                   help="with --world-size >= 2: print each metric's largest deviation from "
                        "the golden (to set distributed_tolerances from measurement)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="with --world-size >= 2: seconds for the whole group (default: %(default)s)")
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
    require(args.world_size >= 1, "--world-size", args.world_size, "must be >= 1")
    if args.world_size > 1:
        return _cmd_golden_distributed(args, runs, device)
    require(not args.deviations, "--deviations", True, "needs --world-size >= 2")
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


def _cmd_golden_distributed(args, runs: Sequence[GoldenRun], device: torch.device) -> int:
    for flag, value in (("--update", args.update), ("--repeat", args.repeat)):
        require(not value, flag, value, "is for world size 1 (the golden is the single-process "
                "run); with --world-size >= 2 the runs are compared with it")
    per_run = execute_distributed(runs, args.world_size, runs_module=args.runs, device=device,
                                  timeout=args.timeout)
    failed = 0
    for run in runs:
        label = f"{run.name} ({device_key(device)}, world size {args.world_size})"
        try:
            assert_matches_golden(run, Path(args.golden_dir), device=device,
                                  output_dir=Path(args.output), world_size=args.world_size,
                                  per_rank=per_run[run.name], runs_module=args.runs)
            print(f"{label}: matches golden; every rank logged the same curves")
        except InvariantViolation as exc:
            failed += 1
            print(f"{label}: MISMATCH\n{exc}")
        for metric, why in sorted(run.distributed_exclusions.items()):
            print(f"  {metric}: not compared at world size {args.world_size}: {why}")
        if run.distributed_horizon is not None:
            step, why = run.distributed_horizon
            print(f"  compared at steps < {step} only: {why}")
        if args.deviations:
            golden = read_golden(Path(args.golden_dir) / run.name / f"{device_key(device)}.json")
            for metric, d in distributed_deviations(per_run[run.name][0],
                                                    golden["metrics"]).items():
                tol = run.distributed_tolerance(metric)
                if "max_abs" in d:
                    detail = (f"max |diff| {d['max_abs']:.3g} (step {d['worst_step']})   max "
                              f"relative {d['max_rel']:.3g}   first inexact step "
                              f"{d['first_inexact_step']}")
                else:
                    detail = ", ".join(f"{k} {v}" for k, v in d.items() if k != "exact")
                print(f"  {metric:<24} {'bit-identical' if d['exact'] else 'differs'}   "
                      f"{detail}   (tolerance rtol={tol.rtol:g}, atol={tol.atol:g})")
    return 1 if failed else 0
