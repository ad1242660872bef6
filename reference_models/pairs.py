"""The fixed/broken collapse pairs of every seed system: ablations and plots, by command.

    python -m reference_models.pairs ablations [--seeds N] [--system NAME] [--json]
    python -m reference_models.pairs plot OUTDIR [--system NAME]

``ablations`` runs, per system and seed, the broken config, each of its ablations (the broken
config with one blamed setting restored to its fixed value, ``collapse.ABLATIONS``) and the
fixed config, and reports whether the seed's downstream collapse (the system's
``BROKEN_SIGNATURES`` as critical findings) is there. ``plot`` writes ``OUTDIR/<system>.png``:
the fixed and the broken run's curves side by side, each critical finding marked where it was
first detectable (docs/golden.md shows them).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from invariants import CANONICAL_METRICS, SignatureConfig, deterministic, scan_series
from reference_models.catalog import SYSTEMS


def _modules(system: str) -> tuple[Any, Any]:
    return (importlib.import_module(f"reference_models.{system}.collapse"),
            importlib.import_module(f"reference_models.{system}.golden"))


def collapse_shown(system: str, cfg: Any, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Run ``cfg`` of ``system`` on ``seed``: its critical findings and whether they contain
    every one of the system's documented collapse signatures."""
    collapse, _ = _modules(system)
    with deterministic(seed):                # as a golden run executes (one thread, flags)
        curves = collapse.run(cfg, seed, device)
    return shown_in(system, curves)


def shown_in(system: str, curves: dict) -> dict[str, Any]:
    """``collapse_shown``'s verdict on curves already made (a golden run's, when the config
    and the seed are that run's: ``GoldenRun.fn`` is ``collapse.run`` under the same
    ``deterministic(seed)``)."""
    _, golden = _modules(system)
    series = {m: c for m, c in curves.items() if m in CANONICAL_METRICS}
    findings = scan_series(series, SignatureConfig())
    critical = sorted({(f.signature, f.metric) for f in findings if f.severity == "critical"})
    return {"critical": critical, "findings": len(findings),
            "collapsed": set(golden.BROKEN_SIGNATURES) <= set(critical)}


def ablation_table(system: str, seeds: int) -> list[dict[str, Any]]:
    collapse, _ = _modules(system)
    variants = {"broken": collapse.BROKEN, **{f"restore {k}": v for k, v in
                                               collapse.ABLATIONS.items()},
                "fixed": collapse.FIXED}
    rows = []
    for name, cfg in variants.items():
        shown = [collapse_shown(system, cfg, seed) for seed in range(seeds)]
        rows.append({"system": system, "variant": name,
                     "collapsed": sum(s["collapsed"] for s in shown), "seeds": seeds,
                     "clean": sum(s["findings"] == 0 for s in shown)})
    return rows


def plot_pair(system: str, path: str, seed: int | None = None) -> str:
    """The pair on ``seed`` (default: the seed its goldens are recorded on)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    collapse, golden = _modules(system)
    seed = golden.RUNS[0].seed if seed is None else seed
    runs = {}
    for kind in ("fixed", "broken"):
        with deterministic(seed):            # as a golden run executes (one thread, flags)
            runs[kind] = collapse.run(getattr(collapse, kind.upper()), seed, "cpu")
    metrics = [m for m in sorted(set(runs["fixed"]) & set(runs["broken"]))
               if m in CANONICAL_METRICS and not any(isinstance(v, str)
                                                     for v in runs["broken"][m][1])]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.2 * len(metrics)), squeeze=False)
    findings = {kind: scan_series({m: c for m, c in curves.items() if m in CANONICAL_METRICS},
                                  SignatureConfig()) for kind, curves in runs.items()}
    for ax, metric in zip(axes[:, 0], metrics):
        for kind, color in (("fixed", "tab:blue"), ("broken", "tab:red")):
            ax.plot(*runs[kind][metric], color=color, label=kind, lw=1.4)
        for f in findings["broken"]:
            if f.severity == "critical":
                ax.axvline(f.step, color="red", alpha=0.25, lw=2)
                if f.metric == metric:
                    ax.annotate(f"{f.signature} @ {f.step}", (f.step, 0.85), fontsize=7,
                                xycoords=("data", "axes fraction"), color="red")
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{system}: fixed vs broken (seed {seed}); red: first critical findings")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_models.pairs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ablations")
    a.add_argument("--seeds", type=int, default=5)
    a.add_argument("--system", choices=SYSTEMS, action="append")
    a.add_argument("--json", action="store_true")
    p = sub.add_parser("plot")
    p.add_argument("outdir")
    p.add_argument("--system", choices=SYSTEMS, action="append")
    args = parser.parse_args(argv)
    systems = args.system or [s for s in SYSTEMS
                              if importlib.util.find_spec(f"reference_models.{s}.collapse")]
    if args.cmd == "plot":
        for system in systems:
            print(plot_pair(system, f"{args.outdir}/{system}.png"))
        return 0
    rows = [row for system in systems for row in ablation_table(system, args.seeds)]
    if args.json:
        print(json.dumps({"ablations": rows}, indent=2))
    else:
        for r in rows:
            print(f"{r['system']:<18} {r['variant']:<36} collapse {r['collapsed']}/{r['seeds']}"
                  f"   no finding at all {r['clean']}/{r['seeds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
