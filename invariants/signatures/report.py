"""Owns what ``invariants scan`` shows: the text report (``render_report``) and the
plot of flagged metrics with their thresholds (``write_plot``, rendered in memory and
written through ``invariants._atomic``: the old plot survives a failed write, the new one
gets the umask's mode, and a FIFO, device or directory at the name is refused).
"""
from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np

from invariants._atomic import AtomicWriteError, write_bytes_atomic
from invariants._errors import InvalidArgumentError
from invariants.signatures.config import TEXT_METRICS
from invariants.signatures.findings import Finding, _g, verdict_of
from invariants.signatures.logs import LogData

_RATIO_SIGS = ("encoder_grad_share", "encoder_starving")


def render_report(data: LogData, findings: Sequence[Finding]) -> str:
    """The human-readable report ``invariants scan`` prints by default."""
    verdict = verdict_of(findings)
    spans = [(np.min(st), np.max(st)) for _, st, _ in data.columns.values() if len(st)]
    first, last = min(a for a, _ in spans), max(b for _, b in spans)   # one numpy pass a column
    lines = [f"{data.path}: {data.format}, {data.records} records, {data.step_key} "
             f"{_g(first.item())}..{_g(last.item())}",
             "metrics: " + ", ".join(f"{m} ({len(c[0])})" for m, c in sorted(data.columns.items()))]
    if data.ignored:
        lines.append("ignored (not canonical, not mapped): " + ", ".join(data.ignored))
    n_crit = sum(f.severity == "critical" for f in findings)
    n_warn = len(findings) - n_crit
    head = {"healthy": "HEALTHY: no collapse signature found",
            "warning": f"WARNING: {n_warn} warning(s), no critical finding",
            "collapse": f"COLLAPSE: {n_crit} critical, {n_warn} warning(s)"}[verdict]
    lines.append(head)
    if verdict == "collapse":
        first = next(f for f in findings if f.severity == "critical")
        lines.append(f"first critical: {first.signature} on {first.metric} at "
                     f"{data.step_key} {first.step}")
    if findings:
        w_step = max(len(data.step_key), *(len(str(f.step)) for f in findings))
        w_sig = max(len("signature"), *(len(f.signature) for f in findings))
        lines.append(f"  {data.step_key:>{w_step}}  {'severity':<8}  {'signature':<{w_sig}}  message")
        for f in findings:
            lines.append(f"  {str(f.step):>{w_step}}  {f.severity:<8}  {f.signature:<{w_sig}}  "
                         f"{f.message}")
    return "\n".join(lines)


def write_plot(data: LogData, findings: Sequence[Finding], out: str | os.PathLike) -> None:
    """Draw each flagged numeric metric with its thresholds and first-detection steps; atomic."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    out = os.fspath(out)
    if os.path.isdir(out):
        raise InvalidArgumentError(f"--plot={out!r}: is a directory; give a file name, "
                                   "e.g. plot.png")
    flagged = [m for m in dict.fromkeys(f.metric for f in findings)
               if m in data.columns and m not in TEXT_METRICS]
    text_findings = [f for f in findings if f.metric in TEXT_METRICS]
    metrics = flagged or [m for m in data.columns if m not in TEXT_METRICS][:4]
    rows = max(len(metrics), 1)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.6 * rows + (0.6 if text_findings else 0)),
                             squeeze=False, sharex=True)
    verdict = verdict_of(findings)
    fig.suptitle(f"{os.path.basename(data.path)}: {verdict}", fontsize=12,
                 color={"healthy": "green", "warning": "darkorange", "collapse": "red"}[verdict])
    colors = {"warning": "darkorange", "critical": "red"}
    for ax, m in zip(axes[:, 0], metrics):
        steps, values = data.series(m)
        fin = np.isfinite(values)
        ax.plot(steps[fin], values[fin], lw=1.0, color="tab:blue", label=m)
        if (~fin).any():
            y0 = float(np.min(values[fin])) if fin.any() else 0.0
            ax.plot(steps[~fin], np.full(int((~fin).sum()), y0), "x", color="red", ms=8,
                    label="non-finite")
        for k, f in enumerate(f for f in findings if f.metric == m):
            c = colors[f.severity]
            if f.threshold is not None and math.isfinite(f.threshold):
                ax.axhline(f.threshold, color=c, ls="--", lw=0.9)
            ax.axvline(f.step, color=c, ls=":", lw=1.2)
            if f.value is not None and math.isfinite(f.value) and f.signature not in _RATIO_SIGS:
                ax.plot([f.step], [f.value], "o", color=c, ms=5)
            thr = "" if f.threshold is None else f", threshold {f.threshold:.4g}"
            ax.annotate(f"{f.severity}: {f.signature} @ {f.step}{thr}", xy=(0.01, 0.97 - 0.1 * k),
                        xycoords="axes fraction", va="top", color=c, fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    axes[-1, 0].set_xlabel(data.step_key)
    if text_findings:
        fig.text(0.01, 0.005, "\n".join(f"{f.signature} @ {f.step}: {f.message}"[:140]
                                        for f in text_findings[:3]), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.025 * min(len(text_findings), 3) + 0.01 if text_findings else 0, 1, 0.97))
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    except OSError as exc:
        raise InvalidArgumentError(f"--plot={out!r}: cannot write the plot "
                                   f"({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    try:
        write_bytes_atomic(out, png.getvalue())
    except AtomicWriteError as exc:  # the old plot is unchanged, no temp file is left
        raise InvalidArgumentError(f"--plot={out!r}: cannot write the plot: {exc.problem}") from None
