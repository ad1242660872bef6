"""Owns the LM-sample rules (seed 002): ``SampleStatistics`` / ``sample_statistics``
(distinct-n, seq-rep-n, longest run) and ``SampleDetector`` (mode collapse,
repetition, seq-repetition) with its streaming state.
"""
from __future__ import annotations

from dataclasses import dataclass

from invariants._validate import require
from invariants.signatures.config import SignatureConfig
from invariants.signatures.detectors.base import Detector, _State
from invariants.signatures.findings import Finding, _g, _step_out


@dataclass(frozen=True)
class SampleStatistics:
    """Statistics of one generated text (``sample``).

    Units are whitespace tokens; a text that is one whitespace token (``"::::"``)
    is split into characters.  ``distinct_1`` = unique units / units;
    ``seq_rep`` = 1 - unique n-grams / n-grams (Welleck et al. 2019);
    ``longest_run`` = longest run of one unit repeated back to back.
    """

    units: int
    distinct_1: float
    distinct_2: float
    seq_rep: float
    longest_run: int


def sample_statistics(text: str, *, n: int = 4) -> SampleStatistics:
    """Compute ``SampleStatistics`` of ``text`` (seq-rep over ``n``-grams)."""
    require(isinstance(text, str), "text", text, "must be a str")
    require(isinstance(n, int) and n >= 1, "n", n, "must be an integer >= 1")
    units: list[str] = text.split()
    if len(units) == 1 and len(units[0]) > 1:
        units = list(units[0])
    m = len(units)
    if m == 0:
        return SampleStatistics(0, 1.0, 1.0, 0.0, 0)
    d1 = len(set(units)) / m
    bigrams = list(zip(units, units[1:]))
    d2 = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    grams = [tuple(units[i:i + n]) for i in range(m - n + 1)]
    rep = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    run = best = 1
    for a, b in zip(units, units[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return SampleStatistics(m, d1, d2, rep, best)


class SampleDetector(Detector):
    """Mode collapse (distinct-1 <= 0.1 over >= 8 units), repetition (a run >= 3),
    seq-rep-n >= 0.44; each reported at the first sample that shows it."""

    def __init__(self, metric: str, cfg: SignatureConfig):
        super().__init__(metric, cfg)

    def _check(self, step, text) -> list[Finding]:
        c = self.cfg
        st_ = sample_statistics(text, n=c.seq_rep_n)
        out = []
        short = text if len(text) <= 40 else text[:37] + "..."
        if st_.units >= c.mode_collapse_min_units and st_.distinct_1 <= c.mode_collapse_distinct:
            out.append(self._named("mode_collapse", "critical", step, st_.distinct_1,
                                   c.mode_collapse_distinct,
                                   f"sample {short!r} is mode-collapsed: distinct-1 "
                                   f"{_g(st_.distinct_1)} <= {_g(c.mode_collapse_distinct)} over "
                                   f"{st_.units} units"))
        if st_.longest_run >= c.repetition_run:
            out.append(self._named("repetition", "warning", step, float(st_.longest_run),
                                   float(c.repetition_run),
                                   f"sample {short!r} repeats one token {st_.longest_run} times "
                                   f"in a row (>= {c.repetition_run})"))
        if st_.seq_rep >= c.seq_rep_max and st_.units > c.seq_rep_n:
            out.append(self._named("seq_repetition", "warning", step, st_.seq_rep, c.seq_rep_max,
                                   f"sample {short!r} has seq-rep-{c.seq_rep_n} "
                                   f"{_g(st_.seq_rep)} >= {_g(c.seq_rep_max)}"))
        return [f for f in out if f.signature not in c.disabled]

    def _named(self, sig, sev, step, value, thr, msg):
        return Finding(sig, self.metric, self.cfg.sev(sig, sev), _step_out(step), float(value),
                       float(thr), msg)

    def scan(self, view, ctx):
        seen: dict[tuple, Finding] = {}
        for step, text in zip(view.step, view.x):
            for f in self._check(step, text):
                seen.setdefault((f.signature, f.severity), f)
            if len(seen) == 3:
                break
        return list(seen.values())

    def stream(self):
        return _SampleState(self)


class _SampleState(_State):
    __slots__ = ("det",)

    def __init__(self, det):
        self.det = det
        self.done = False

    def push(self, step, x, last):
        return self.det._check(step, x) or None
