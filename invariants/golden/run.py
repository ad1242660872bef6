"""Golden runs: the ``GoldenRun`` record, executing it deterministically, memoising, device keys.

A golden run is a named short training run whose ``fn(seed, device)`` returns metric
curves; ``execute`` runs it under ``deterministic(seed)`` and normalises the curves
(integral steps as ints, numbers as floats, text metrics as strings). Runs are found by
name in a runs module's ``RUNS`` (``load_runs``, through the one name resolver of
``invariants.distributed``): a spawned rank cannot be sent a run's closure. The default
runs module is a string, imported only when the caller names no other module.
``findings_of`` and ``mechanism_problems`` judge a run's behaviour, independent of any
golden file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from invariants._determinism import deterministic
from invariants._errors import InvalidArgumentError, InvariantViolation
from invariants._tolerances import Tolerance
from invariants._validate import require
from invariants.distributed.jobs import UnresolvedName, resolve

__all__ = ["GoldenError", "GoldenRun", "device_key", "execute_memoized", "findings_of",
           "mechanism_problems"]

Curves = dict[str, tuple[list[float], list[float]]]


class GoldenError(InvalidArgumentError):
    """A golden file or golden run is unusable: corrupt, unknown, from the future, nondeterministic."""


# Default per-metric tolerances for a CPU run compared with a CPU golden (bit-identical
# in practice; the slack absorbs a different BLAS build). Runs override per metric from
# measured spread (`invariants golden --repeat N`), never by guessing.
DEFAULT_TOLERANCE = Tolerance(rtol=1e-5, atol=1e-6)
# Where spawned ranks find the runs by name (a run's fn is a closure: it cannot be sent).
# A string: imported only when the caller passes no runs module of its own.
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
        ``check`` and its listed ``signatures`` must still hold on the obtained curves —
        unless ``distributed_chaotic`` says why they cannot.
      distributed_chaotic: the measured reason a run's outcome beyond its horizon is a
        different realisation at world size >= 2 (e.g. a 1-ulp change of one initial weight
        already moves the broken run's final accuracy by 5-10 points). Then only what lies
        before the horizon is asserted there (curves, findings, the listed signatures that
        the golden shows before it); its collapse is asserted at world size 1 and over
        seeds by ``invariants golden --sweep``. Needs a horizon; not hashed.
    """

    name: str
    fn: Callable[[int, torch.device], Mapping[str, tuple[Sequence[float], Sequence[float]]]]
    config: Mapping[str, Any]
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    signatures: tuple[tuple[str, str], ...] = ()
    check: Callable[[Curves], None] | None = None
    seed: int = 0
    note: str = ""
    signature_config: Any = None  # a SignatureConfig for scanning this run (None: defaults)
    distributed_tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    distributed_exclusions: Mapping[str, str] = field(default_factory=dict)
    distributed_horizon: tuple[int, str] | None = None
    kind: str = "fixed"  # "fixed": must show no collapse; "broken": must show `signatures`
    distributed_chaotic: str = ""

    def __post_init__(self) -> None:
        require(self.kind in ("fixed", "broken"), "kind", self.kind, "must be 'fixed' or 'broken'")
        for metric, why in self.distributed_exclusions.items():
            require(isinstance(why, str) and why.strip() != "", f"distributed_exclusions[{metric!r}]",
                    why, "must give the reason the metric cannot match (never exclude silently)")
        require(isinstance(self.distributed_chaotic, str), "distributed_chaotic",
                self.distributed_chaotic, "must be a string (the measured reason)")
        require(not self.distributed_chaotic or self.distributed_horizon is not None,
                "distributed_chaotic", self.distributed_chaotic,
                "needs a distributed_horizon (what is compared before it)")
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

    def tolerance(self, metric: str) -> Tolerance:
        return self.tolerances.get(metric, DEFAULT_TOLERANCE)

    def distributed_tolerance(self, metric: str) -> Tolerance:
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


def load_runs(module: str, names: Sequence[str]) -> list[GoldenRun]:
    """The runs named ``names`` (all if empty) of ``module``'s ``RUNS``.

    Raises:
      InvalidArgumentError: the module cannot be imported or defines no ``RUNS``.
      GoldenError: a name that is not a run of the module (listing the known runs).
    """
    try:
        runs = list(resolve(f"{module}:RUNS", argument="--runs"))
    except UnresolvedName as exc:
        if isinstance(exc.cause, ModuleNotFoundError):
            problem = f"cannot import it ({exc.cause})"
        elif isinstance(exc.cause, AttributeError):
            problem = "the module defines no RUNS"
        else:
            raise
        raise InvalidArgumentError(f"--runs={module!r}: {problem}") from None
    known = {r.name: r for r in runs}
    for name in names:
        if name not in known:
            raise GoldenError(f"--run={name!r}: unknown golden run; known runs: "
                              f"{', '.join(sorted(known))}")
    return [known[n] for n in names] if names else runs


_MEMO: dict[tuple[str, str, str, int], tuple[Callable, Curves]] = {}


def execute_memoized(run: GoldenRun, device: torch.device | str = "cpu") -> Curves:
    """The run's curves, computed once per process for (name, config hash, device, fn).

    Runs are deterministic (``test_two_cpu_runs_are_bit_identical``), so tests that only
    *read* a run's curves share one execution; tests about determinism itself call
    ``execute`` for a fresh one. Callers get copies: mutating them cannot leak.
    """
    device = torch.device(device)
    key = (run.name, run.config_sha256, str(device), id(run.fn))
    hit = _MEMO.get(key)
    if hit is None or hit[0] is not run.fn:  # the fn is kept, so its id cannot be reused
        hit = _MEMO[key] = (run.fn, execute(run, device))
    return {m: (list(s), list(v)) for m, (s, v) in hit[1].items()}


def execute(run: GoldenRun, device: torch.device | str = "cpu") -> Curves:
    """A fresh execution of ``run`` under ``deterministic(run.seed)``, its curves normalised."""
    device = torch.device(device)
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


def findings_of(run: GoldenRun, curves: Curves) -> list[dict[str, Any]]:
    """The collapse findings of the run's curves (canonical metric names only), as dicts."""
    from invariants.signatures import CANONICAL_METRICS, scan_series
    series = {m: c for m, c in curves.items() if m in CANONICAL_METRICS}
    return [{"signature": f.signature, "metric": f.metric, "severity": f.severity,
             "step": f.step} for f in scan_series(series, run.signature_config)]


def mechanism_problems(run: GoldenRun, curves: Curves,
                       found: Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """What is wrong with a run's behaviour, independent of any golden file.

    A ``fixed`` run must show no finding at all, not even a warning (a guard left switched
    on must stay silent on it); a ``broken`` run must show every ``(signature, metric)`` in
    ``run.signatures`` as a *critical* finding (its seed's downstream collapse); every run
    must pass ``run.check``.
    """
    found = findings_of(run, curves) if found is None else found
    problems = []
    if run.kind == "fixed" and found:
        problems.append(f"  the fixed run shows collapse signatures: {list(found)}")
    shown = {(f["signature"], f["metric"]) for f in found if f["severity"] == "critical"}
    missing = [pair for pair in run.signatures if tuple(pair) not in shown]
    if missing:
        problems.append(f"  the run's documented collapse is missing (as critical findings): "
                        f"{missing} (critical found: {sorted(shown)})")
    if run.check is not None:
        try:
            run.check(curves)
        except InvariantViolation as exc:
            problems.append(f"  the run's own check fails: {exc}")
    return problems
