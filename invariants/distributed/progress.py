"""What "making progress" means for a spawned group and for a distributed test: the one rule.

A process makes progress when it uses CPU: it computes, imports, pickles, reduces. A process
blocked in a collective that its peers never reach, in a sleep, on a lock or in a deadlock
uses (almost) none: measured with torch 2.13, a gloo rank waiting in ``barrier()`` uses
2-3 ms of CPU a second, all of it in gloo's ``gloo_tcp_loop`` thread. ``CpuProgress``
turns a series of CPU readings into progress marks: at least ``PROGRESS_CPU_S`` of CPU
within ``PROGRESS_WINDOW_S`` (1 % of a core), so a waiting rank's background trickle
(15 ms in a window) never counts, and a rank that gets a small share of a busy machine
(a quarter of a core under load 8 on 2 cores: 1.25 s in a window) always does.

A slow machine slows every process down but leaves each of them using CPU; a hang stops
them. That is why hang detection here is "no progress for N seconds", never a speed limit.
A rank spinning in a busy loop counts as progress: the callers' optional hard limits are
the backstop for that.

``note_progress`` / ``last_progress`` are the process-wide clock: ``spawn_group`` notes
every progress mark of its ranks, and the pytest plugin's ``distributed`` time limit
(``invariants.plugin``) reads it, so a test whose group is slow but alive never times out.
"""
from __future__ import annotations

import os
import time

__all__: list[str] = []  # internals of spawn_group and the pytest plugin

PROGRESS_CPU_S = 0.05
PROGRESS_WINDOW_S = 5.0

_last_progress = time.monotonic()


def note_progress(now: float | None = None) -> None:
    """Record that something this process watches made progress (monotonic ``now``)."""
    global _last_progress
    _last_progress = max(_last_progress, time.monotonic() if now is None else now)


def last_progress() -> float:
    """The monotonic time of the latest ``note_progress`` in this process."""
    return _last_progress


class CpuProgress:
    """Progress marks from a series of ``(monotonic time, CPU seconds)`` readings.

    ``update(now, cpu)`` is True when ``cpu`` advanced by at least ``cpu_s`` since the
    anchor, which is the reading of the last mark or, after ``window_s`` without one, the
    reading that closed the window (so a slow trickle never adds up to a mark). The first
    reading is a mark: the process has started.
    """

    def __init__(self, cpu_s: float = PROGRESS_CPU_S, window_s: float = PROGRESS_WINDOW_S):
        self.cpu_s, self.window_s = cpu_s, window_s
        self.anchor: tuple[float, float] | None = None
        self.cpu: float | None = None

    def update(self, now: float, cpu: float) -> bool:
        self.cpu = cpu
        if self.anchor is None or cpu - self.anchor[1] >= self.cpu_s:
            self.anchor = (now, cpu)
            return True
        if now - self.anchor[0] >= self.window_s:
            self.anchor = (now, cpu)
        return False


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` from ``/proc``; None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) * _TICK_S
    except (OSError, ValueError, IndexError):
        return None
