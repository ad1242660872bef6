"""Owns scoring: every detector (ours through the vectorised scanner, the anchors of
``anchors.py``) on every run of one half of the corpus, and the table
``{"detectors": [{"name", "healthy_runs", "false_critical", "false_any", "broken_runs",
"recall", "median_delay"}]}``.

- A healthy run counts in ``false_any`` if the detector raised anything on it, in
  ``false_critical`` if it raised a critical alarm.
- A broken run is detected if the detector raised anything at or after the logged point
  where the cause starts (``onset``); ``recall`` = detected / broken runs; the delay is in
  logged points from the onset to the first alarm at or after it (``median_delay`` over
  the detected runs).  ``recall_critical`` counts only critical alarms; ``early`` counts
  broken runs with an alarm before the onset (a false alarm on the healthy part).
- ``false_any_ci95`` and ``recall_ci95``: Wilson 95 % intervals of the two rates, so a
  reader sees what a half of 132 runs can resolve (12 of 132 warned: 5.3-15.2 %).
- ``combined``: recall minus the false-alarm rate (``false_any / healthy_runs``, Youden's
  J); ``acceptance(table)`` states issue 15's criteria for our row against the anchors.
"""
from __future__ import annotations

import math
import statistics

import numpy as np

from bench.detection import anchors, corpus
from invariants.signatures import SignatureConfig, VectorisedScanner

METRICS = ("loss", "grad_norm", "lr", "val_loss", "accuracy")


def our_alarms(log, config: SignatureConfig | None = None) -> list[tuple[int, str, str]]:
    """(logged index, severity, signature) of every finding of the vectorised scanner."""
    steps = log["loss"][0]
    uniq = np.unique(np.concatenate([log[m][0] for m in METRICS if m in log]))
    raw = {m: (np.searchsorted(uniq, log[m][0]), log[m][0], log[m][1])
           for m in METRICS if m in log}
    out = []
    for f in VectorisedScanner(config).scan(raw):
        i = int(np.searchsorted(steps, f.step, side="right")) - 1
        out.append((max(i, 0), f.severity, f"{f.signature}:{f.metric}"))
    return sorted(out)


def onset_index(spec: corpus.RunSpec, log) -> int | None:
    if spec.onset is None:
        return None
    return max(int(np.searchsorted(log["loss"][0], spec.onset, side="right")) - 1, 0)


def wilson(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """The Wilson score interval of k successes in n trials (95 % by default), rounded to 4
    places; None for n = 0."""
    if n == 0:
        return None
    p = k / n
    d = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def row(name: str, results: list[tuple[corpus.RunSpec, int | None, list]]) -> dict:
    """One table row from ``(spec, onset index, alarms)`` triples."""
    healthy = [(s, a) for s, o, a in results if s.healthy]
    broken = [(s, o, a) for s, o, a in results if not s.healthy]
    delays, crit, early = [], 0, 0
    for s, o, a in broken:
        after = [(i, sev) for i, sev, *_ in a if i >= o]
        if any(i < o for i, *_ in a):
            early += 1
        if after:
            delays.append(after[0][0] - o)
        if any(sev == "critical" for _, sev in after):
            crit += 1
    n_b = len(broken)
    false_any = sum(bool(a) for _, a in healthy)
    return {"name": name, "healthy_runs": len(healthy),
            "false_critical": sum(any(sev == "critical" for _, sev, *_ in a) for _, a in healthy),
            "false_any": false_any,
            "broken_runs": n_b, "recall": round(len(delays) / n_b, 4) if n_b else None,
            "median_delay": statistics.median(delays) if delays else None,
            "recall_critical": round(crit / n_b, 4) if n_b else None, "early": early,
            "false_any_ci95": wilson(false_any, len(healthy)),
            "recall_ci95": wilson(len(delays), n_b),
            "combined": (round(len(delays) / n_b - false_any / len(healthy), 4)
                         if n_b and healthy else None)}


def acceptance(table: list[dict], budget_false_any: float = 0.05,
               min_recall: float = 0.95) -> list[tuple[str, bool, str]]:
    """Issue 15's acceptance for the ``invariants`` row of ``table``, each criterion as
    ``(criterion, holds, the numbers behind it)``: no critical alarm on a healthy run;
    warnings on at most ``budget_false_any`` of them; recall at least ``min_recall``; a
    median delay no worse than the fastest anchor with as few or fewer false alarms; and a
    combined score (``recall - false_any / healthy_runs``, Youden's J) above every anchor's.
    """
    ours = next(r for r in table if r["name"] == "invariants")
    others = [r for r in table if r["name"] != "invariants" and r["combined"] is not None]
    n = ours["healthy_runs"]
    if not n or ours["recall"] is None:
        return [("a half with healthy and broken runs", False,
                 f"{n} healthy, {ours['broken_runs']} broken")]
    rivals = [r for r in others if r["false_any"] <= ours["false_any"]
              and r["median_delay"] is not None]
    best = min(rivals, key=lambda r: r["median_delay"], default=None)
    top = max(others, key=lambda r: r["combined"], default=None)
    delay = ours["median_delay"]
    return [
        ("0 critical findings on healthy runs", ours["false_critical"] == 0,
         f"{ours['false_critical']} of {n}"),
        (f"warnings on <= {budget_false_any:.0%} of healthy runs",
         ours["false_any"] <= budget_false_any * n,
         f"{ours['false_any']} of {n} ({ours['false_any'] / n:.1%})"),
        (f"recall >= {min_recall:.0%}", ours["recall"] >= min_recall, f"{ours['recall']}"),
        ("median delay <= the best anchor at equal or fewer false alarms",
         best is None or (delay is not None and delay <= best["median_delay"]),
         f"{delay} vs {best['name']} {best['median_delay']} ({best['false_any']} false alarms)"
         if best else f"{delay}; no anchor has as few false alarms"),
        ("combined score (recall - false-alarm rate) above every anchor",
         top is None or ours["combined"] > top["combined"],
         f"{ours['combined']} vs best anchor {top['name']} {top['combined']}" if top else
         f"{ours['combined']}"),
    ]


def evaluate(logs: dict, half: str, config: SignatureConfig | None = None,
             with_anchors: bool = True) -> tuple[list[dict], dict]:
    """The table on ``half`` ("tune" or "test"), and our findings per run (for reports)."""
    runs = [s for s in corpus.specs() if s.half == half]
    ours, per_run = [], {}
    for s in runs:
        log = logs[s.name]
        a = our_alarms(log, config)
        per_run[s.name] = a
        ours.append((s, onset_index(s, log), [(i, sev) for i, sev, _ in a]))
    table = [row("invariants", ours)]
    if with_anchors:
        for name, rule in anchors.ANCHORS.items():
            table.append(row(name, [(s, onset_index(s, logs[s.name]), rule(logs[s.name]))
                                    for s in runs]))
    return table, per_run
