"""Comparing curves with a golden: tolerances, mismatches, the plot, and the spread measures.

``assert_matches_golden`` is the golden check: a missing golden fails (never skips), a
changed config hash is a "stale golden, regenerate" failure distinct from a tolerance
failure, curves are compared per metric within the run's tolerance table (one
``Tolerance`` type; ``GoldenTolerance`` is the same class), the collapse findings must be
the stored ones, and the run must behave as documented. On mismatch the obtained curves
and a PNG of golden vs obtained are written to the output directory and the message
names the metric, step, golden and obtained values, both files and how to update. Both
files go through ``invariants._atomic`` (the one write helper); one that cannot be written
is named with the reason in the message, which still reports the mismatch. Any NaN in a
comparison (golden, obtained or tolerance) is a mismatch, never a pass.
``distributed_deviations`` and ``run_spread`` measure what the tolerance tables are set from.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from invariants._assertions import invariant_check
from invariants._atomic import write_bytes_atomic
from invariants._errors import InvalidArgumentError, InvariantViolation
from invariants._tolerances import Tolerance
from invariants._validate import require
from invariants.golden.ranks import assert_ranks_logged_same_curves, execute_distributed
from invariants.golden.run import (DEFAULT_RUNS_MODULE, Curves, GoldenError, GoldenRun,
                                   device_key, execute, findings_of, mechanism_problems)
from invariants.golden.store import obtained_document, read_golden, write_json_atomic

__all__ = ["GoldenTolerance", "assert_matches_golden", "compare_curves",
           "distributed_deviations", "run_spread"]

# One tolerance type for the whole harness: a golden curve's per-metric tolerance is a
# ``Tolerance`` (its ``eps`` stays 0). The name stays importable for existing run tables.
GoldenTolerance = Tolerance


@dataclass(frozen=True)
class Mismatch:
    """The worst point of one metric outside its tolerance, and how many points are."""

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
                   tolerance: Callable[[str], Tolerance]) -> list[Mismatch | str]:
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
        # NaN anywhere (a NaN golden, obtained value or tolerance) is a mismatch, never a
        # pass: ``not (diff <= allowed)`` is true for NaN, ``diff > allowed`` would be false
        diff = np.where(np.isnan(diff), np.inf, diff)
        bad = ~(diff <= allowed)
        if bad.any():
            excess = np.where(np.isnan(allowed), np.inf, diff - allowed)
            i = int(np.argmax(np.where(bad, excess, -np.inf)))
            problems.append(Mismatch(metric, i, steps[i], float(g[i]), float(o[i]),
                                     float(allowed[i]), int(bad.sum()), len(o)))
    return problems


def plot_curves(path: Path, run: str, obtained: Curves, golden: Mapping[str, Any],
                problems: Sequence[Mismatch | str],
                findings: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write a PNG of golden vs obtained, one panel per numeric metric, worst step marked, and
    where each critical finding of the obtained curves was first detectable (red band)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def numeric(vals) -> bool:
        return not any(isinstance(v, str) for v in vals)

    metrics = sorted(m for m in set(obtained) | set(golden)
                     if numeric(obtained.get(m, ((), ()))[1])
                     and numeric(golden.get(m, {}).get("values", ())))
    worst = {p.metric: p for p in problems if isinstance(p, Mismatch)}
    rows = max(len(metrics), 1)  # a run of text metrics only still gets a (titled) figure
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.4 * rows), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        if metric in golden:
            ax.plot(golden[metric]["steps"], golden[metric]["values"], label="golden", lw=2,
                    color="tab:blue")
        if metric in obtained:
            ax.plot(obtained[metric][0], obtained[metric][1], label="obtained", lw=1.2,
                    ls="--", color="tab:red")
        for f in findings:
            if f["metric"] == metric and f["severity"] == "critical":
                ax.axvline(f["step"], color="red", lw=2, alpha=0.35)
                ax.annotate(f"{f['signature']} (step {f['step']})", (f["step"], 0.9),
                            xycoords=("data", "axes fraction"), fontsize=7, color="red")
        if metric in worst:
            w = worst[metric]
            ax.axvline(w.step, color="black", lw=0.8, ls=":")
            ax.annotate(f"worst: step {w.step}", (w.step, w.obtained), fontsize=8)
        ax.set_title(f"{metric}" + ("  (MISMATCH)" if metric in worst else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"golden vs obtained: {run}")
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=80)
    finally:
        plt.close(fig)
    write_bytes_atomic(path, png.getvalue())  # AtomicWriteError names the file and reason
    return path


def _written(path: Path, write: Callable[[Path], Any]) -> str:
    """``path`` once ``write(path)`` wrote it, or why it could not: a mismatch file that
    cannot be written (disk full, a directory in the way) never masks the mismatch."""
    try:
        write(path)
    except InvalidArgumentError as exc:  # AtomicWriteError, GoldenError: one line each
        return f"NOT written ({exc})"
    return str(path)


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
        curves = execute(run, device)
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
    if world_size > 1 and horizon is not None and run.distributed_chaotic:
        # beyond the horizon a chaotic run is another realisation: assert what precedes it
        early = {(f["signature"], f["metric"]) for f in golden["signatures"]
                 if f["step"] < horizon}
        problems += mechanism_problems(
            replace(run, check=None, signatures=tuple(p for p in run.signatures
                                                      if tuple(p) in early)),
            {m: _before(c, horizon) for m, c in curves.items()}, found_early)
        if problems:
            problems.append(f"  beyond step {horizon} not asserted: {run.distributed_chaotic}")
    else:
        problems += mechanism_problems(run, curves, found)  # also under data parallelism
    if world_size > 1:
        if horizon is not None and problems:
            problems.append(f"  compared at steps < {horizon} only: {run.distributed_horizon[1]}")
    if problems:
        doc = obtained_document(run, device, curves, tolerance, found)
        obtained_shown = _written(obtained_path, lambda p: write_json_atomic(p, doc))
        plot = _written(output_dir / f"{run.name}.{key}{suffix}.obtained.png",
                        lambda p: plot_curves(p, run.name, curves, golden["metrics"], problems,
                                              found))
        lines = [p.line() if isinstance(p, Mismatch) else p for p in problems]
        lines += [f"  {m}: excluded from the world-size-{world_size} comparison: {why}"
                  for m, why in sorted(excluded.items())]
        raise InvariantViolation(
            f"golden run {run.name!r} {where} differs from {path}:\n" + "\n".join(lines) +
            f"\n  obtained curves: {obtained_shown}\n  plot: {plot}\n  {update_hint}")
    return curves


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
    runs = [execute(run, device) for _ in range(repeats)]
    out: dict[str, dict[str, float]] = {}
    for metric in sorted(runs[0]):
        values = np.array([r[metric][1] for r in runs], dtype=np.float64)
        spread = values.max(axis=0) - values.min(axis=0)
        scale = np.abs(values).max(axis=0)
        rel = np.where(scale > 0, spread / np.where(scale > 0, scale, 1), 0.0)
        out[metric] = {"max_abs_spread": float(spread.max(initial=0.0)),
                       "max_rel_spread": float(rel.max(initial=0.0))}
    return out
