"""Spawning a gloo process group on loopback and watching it: ``spawn_group``, the parent's side.

``spawn_group(fn, world_size, ...)`` starts ``world_size`` spawned processes (``rank.entry``),
each in one gloo group whose store this process serves on 127.0.0.1 (``rendezvous``), runs
``fn(rank, world_size, *args)`` with one torch thread and returns every rank's result (sent
back as ``torch.save`` bytes over a pipe, read with ``torch.load(weights_only=True)``).

It watches the ranks instead of timing them: a rank's heartbeat carries its CPU time, and
the group is **hung** when no rank made progress (``progress.CpuProgress``) for
``hang_after`` seconds; a busy machine slows the ranks but does not stop them. ``timeout``
is an optional overall backstop (for a rank spinning forever). When a rank fails, the
others get ``FAILURE_GRACE_S`` to fail on their own (their gloo errors name the lost peer)
before they are stopped. Either way the error reports EVERY rank once: its exit code or
signal, the traceback it died with, or the stacks of all its threads (faulthandler, asked
for with SIGUSR1 before a rank is killed), and the processes are always killed and reaped.
"""
from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
import pickle
import signal
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable

import torch

from invariants._validate import require, require_positive
from invariants.distributed import rank as rank_side
from invariants.distributed.progress import CpuProgress, note_progress, process_cpu_s
from invariants.distributed.rendezvous import start_store

__all__ = ["GroupFailed", "GroupHung", "RankReport", "also_die_with", "spawn_group"]

HANG_AFTER_S = 120.0
FAILURE_GRACE_S = 10.0
STACK_WAIT_S = 1.0
POLL_S = 0.25
_DAY_S = 86400.0


_also_watched: list[int] = []


def also_die_with(pid: int) -> None:
    """Ranks spawned from now on also exit when process ``pid`` dies, not only their parent.

    The pytest plugin registers pytest-xdist's controller here from each worker: killing
    ``pytest -n N`` then ends every rank within a heartbeat, instead of when the worker
    notices (after its current test).
    """
    require(isinstance(pid, int) and not isinstance(pid, bool) and pid > 0, "pid", pid,
            "must be a process id (an integer > 0)")
    if pid not in _also_watched:
        _also_watched.append(pid)


class GroupFailed(RuntimeError):
    """A rank of a spawned group failed; ``ranks`` holds every rank's ``RankReport``."""

    def __init__(self, message: str, ranks: list[RankReport]):
        super().__init__(message)
        self.ranks = ranks


class GroupHung(TimeoutError):
    """No rank made progress for ``hang_after`` s, or the group ran past ``timeout``."""

    def __init__(self, message: str, ranks: list[RankReport]):
        super().__init__(message)
        self.ranks = ranks


@dataclass
class RankReport:
    """What is known of one rank at the end: how it ended and what it said."""

    rank: int
    pid: int | None
    exitcode: int | None = None     # None: not reaped; negative: killed by that signal
    stopped: str = ""               # why spawn_group stopped it ("": it ended by itself)
    traceback: str = ""             # the exception it sent before exiting
    stack: str = ""                 # faulthandler output: a fatal signal, or on request
    cpu_s: float | None = None      # CPU seconds at its last heartbeat
    beats: int = 0
    sent_result: bool = False

    def status(self) -> str:
        """One line: exit code or signal, pid, CPU, heartbeats, and why it was stopped."""
        if self.exitcode is None:
            how = "still running (could not be reaped)"
        elif self.exitcode >= 0:
            how = f"exit code {self.exitcode}"
        else:
            try:
                how = f"killed by signal {signal.Signals(-self.exitcode).name}"
            except ValueError:
                how = f"killed by signal {-self.exitcode}"
        facts = [f"pid {self.pid}"] + ([f"{self.cpu_s:.2f} s CPU"] if self.cpu_s is not None
                                        else []) + [f"heartbeats: {self.beats}"]
        if self.sent_result:
            facts.append("result sent")
        stopped = f"; stopped by spawn_group: {self.stopped}" if self.stopped else ""
        return f"{how} ({', '.join(facts)}){stopped}"

    def describe(self) -> str:
        """``--- rank<r> ---``, the status line, then its traceback and/or stacks."""
        parts = [f"--- rank{self.rank} ---", self.status()]
        if self.traceback:
            parts.append(self.traceback.rstrip())
        if self.stack:
            parts.append("stack of every thread (faulthandler):\n" + self.stack.rstrip())
        if self.traceback or self.stack or self.exitcode in (0, None):
            return "\n".join(parts)
        if self.stopped:
            parts.append("no stack: it did not answer spawn_group's request (SIGUSR1) before "
                         "it was killed (it was already exiting, or not yet running Python)")
        elif self.exitcode < 0:
            parts.append("no Python traceback: a signal killed it before it could report "
                         "(SIGKILL: the out-of-memory killer or another process?)")
        else:
            parts.append("no Python traceback: it exited without raising (os._exit), or "
                         "before spawn_group's entry ran (see the rank's stderr)")
        return "\n".join(parts)


class _Rank:
    """The parent's view of one rank: its process, pipes, report and progress."""

    def __init__(self, rank: int, process, messages, faults):
        self.process, self.messages, self.faults = process, messages, faults
        self.report = RankReport(rank, process.pid)
        self.result: bytes | None = None
        self.progress = CpuProgress()
        self.kernel_progress = CpuProgress()
        self.ended_at: float | None = None   # when this process saw it ended
        self.failed_at: float | None = None  # when it raised (its own clock reading)

    def pump(self, now: float) -> bool:
        """Read what the rank sent; True if it made progress."""
        progressed = False
        exited = self.process.exitcode is not None  # before reading: then all is readable
        while self.messages is not None and self.messages.poll(0):
            try:
                message = self.messages.recv_bytes()
            except (EOFError, OSError):
                self.messages.close()
                self.messages = None
                break
            kind, body = message[:1], message[1:]
            if kind == rank_side.BEAT:
                self.report.beats += 1
                (cpu,) = struct.unpack("!d", body)
                self.report.cpu_s = cpu
                progressed |= self.progress.update(now, cpu)
            elif kind == rank_side.RESULT:
                self.result = body
                self.report.sent_result = True
            elif kind == rank_side.ERROR:
                (self.failed_at,) = struct.unpack("!d", body[:8])
                self.report.traceback = body[8:].decode("utf-8", "replace")
        while self.faults is not None and self.faults.poll(0):
            chunk = os.read(self.faults.fileno(), 65536)
            if not chunk:
                self.faults.close()
                self.faults = None
                break
            self.report.stack += chunk.decode("utf-8", "replace")
        if exited:
            # Everything it wrote is in the pipes now (a write to a full pipe would still be
            # blocking it) and has just been read: close them rather than wait for an EOF
            # that a forked grandchild holding the descriptors would delay.
            self.close()
        else:
            # What the kernel counts covers the phases without heartbeats: starting up
            # (importing torch) and exiting (finalising it, ~0.5 s of CPU after the result).
            cpu = process_cpu_s(self.process.pid)
            if cpu is not None:
                progressed |= self.kernel_progress.update(now, cpu)
            elif self.report.beats == 0:  # no /proc: a starting rank counts as progressing
                progressed = True
        return progressed

    def close(self) -> None:
        for connection in (self.messages, self.faults):
            if connection is not None:
                connection.close()
        self.messages = self.faults = None

    @property
    def ended(self) -> bool:
        """Exited, and everything it sent has been read."""
        return self.process.exitcode is not None and self.messages is None

    def waitables(self) -> list:
        return [c for c in (self.messages, self.faults) if c is not None] + \
            ([self.process.sentinel] if self.process.exitcode is None else [])


def _failure_time(r: _Rank) -> float:
    """When a rank failed: when it raised, else when this process saw it gone."""
    return min(t for t in (r.failed_at, r.ended_at, math.inf) if t is not None)


def _watch(ranks: list[_Rank], world_size: int, timeout: float | None,
           hang_after: float) -> tuple[str, str]:
    """Until every rank ended (``("done", "")``) or the group must be stopped: ``("failed" |
    "hung" | "limit", why)``."""
    started = last = time.monotonic()
    while True:
        waitables = [w for r in ranks for w in r.waitables()]
        if waitables:
            wait(waitables, timeout=POLL_S)
        now = time.monotonic()
        for r in ranks:
            if r.pump(now):
                last = now
                note_progress(now)
            if r.ended and r.ended_at is None:
                r.ended_at = now
        # judge this pass's snapshot (ended_at), never ``r.ended`` again: a rank can exit
        # between the loop above and here, and would count as ended without an ended_at
        # (seen once in the reliability series: a TypeError instead of the group's report)
        if all(r.ended_at is not None for r in ranks):
            return "done", ""
        failed = sorted((r for r in ranks
                         if r.ended_at is not None and r.process.exitcode != 0),
                        key=_failure_time)
        if failed and now - failed[0].ended_at > FAILURE_GRACE_S:
            return "failed", (f"rank {failed[0].report.rank} failed and this rank had not ended "
                              f"{FAILURE_GRACE_S:g}s later")
        if now - last > hang_after:
            return "hung", (f"the {world_size}-process gloo group hung: no rank made progress "
                            f"(used CPU) for {hang_after:g}s")
        if timeout is not None and now - started > timeout:
            return "limit", (f"the {world_size}-process gloo group did not finish in "
                             f"{timeout:g}s (the hard limit `timeout`; its ranks were still "
                             "making progress)")


def _stop(ranks: list[_Rank], reason: str | None) -> None:
    """Ask the live ranks for their stacks (if there is a reason to), kill and reap all."""
    alive = [r for r in ranks if r.process.exitcode is None]
    if alive and reason is not None and hasattr(signal, "SIGUSR1"):
        for r in alive:
            with contextlib.suppress(OSError):
                os.kill(r.process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + STACK_WAIT_S
        while time.monotonic() < deadline and not all(r.report.stack for r in alive):
            wait([r.faults for r in alive if r.faults is not None], timeout=0.1)
            for r in alive:
                r.pump(time.monotonic())
        time.sleep(0.1)  # the rest of a dump that is still being written
    for r in alive:
        r.report.stopped = reason or "it had not ended when the others did"
        with contextlib.suppress(OSError):
            r.process.kill()
    for r in ranks:
        r.process.join(10)
        r.pump(time.monotonic())
        r.close()
        r.report.exitcode = r.process.exitcode


def spawn_group(fn: Callable[..., Any], world_size: int = 2, *args: Any,
                timeout: float | None = None, hang_after: float = HANG_AFTER_S) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    ``fn`` must be a module-level function (it is pickled by name for ``spawn``).
    ``hang_after``: seconds without progress from any rank after which the group is hung.
    ``timeout``: an optional overall limit in seconds (a backstop; None: none).

    Raises:
      GroupFailed: (a RuntimeError) when a rank failed, reporting every rank.
      GroupHung: (a TimeoutError) when the group hung or ran past ``timeout``, with every
        live rank's stacks; every process was killed.
    """
    require(callable(fn), "fn", fn, "must be a module-level callable")
    require(isinstance(world_size, int) and not isinstance(world_size, bool)
            and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
    if timeout is not None:
        require_positive("timeout", timeout)
    require_positive("hang_after", hang_after)
    try:
        payload = pickle.dumps((fn, args))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        require(False, "fn, args", (fn, args), f"must be picklable for a spawned process ({exc})")
    ctx = multiprocessing.get_context("spawn")
    store_timeout = timeout if timeout is not None else _DAY_S
    store, port = start_store(store_timeout)
    ranks: list[_Rank] = []
    outcome, why = "interrupted", "the caller was interrupted"
    try:
        for r in range(world_size):
            messages, messages_w = ctx.Pipe(duplex=False)
            faults, faults_w = ctx.Pipe(duplex=False)
            process = ctx.Process(target=rank_side.entry, name=f"invariants-rank{r}",
                                  args=(r, world_size, port, payload, messages_w, faults_w,
                                        os.getpid(), tuple(_also_watched), store_timeout))
            try:
                process.start()
            finally:
                messages_w.close()
                faults_w.close()
            ranks.append(_Rank(r, process, messages, faults))
        outcome, why = _watch(ranks, world_size, timeout, hang_after)
    except BaseException as exc:  # interrupted (the plugin's time limit, Ctrl-C): reap, note
        _stop(ranks, why)
        with contextlib.suppress(AttributeError):
            exc.add_note("the spawned ranks, stopped and killed:\n"
                         + "\n".join(r.report.describe() for r in ranks))
        raise
    else:
        _stop(ranks, {"hung": "the group hung", "limit": "the group ran past `timeout`"}
              .get(outcome, why) or None)
    finally:
        del store  # closes the loopback listener, after every rank is gone
    reports = [r.report for r in ranks]
    if outcome in ("hung", "limit"):
        raise GroupHung(f"{why}; every process was stopped (its stacks below) and killed:\n"
                        + "\n".join(rep.describe() for rep in reports), reports)
    bad = sorted((r for r in ranks if r.report.exitcode != 0 or r.result is None),
                 key=lambda r: (r.report.stopped != "", _failure_time(r)))
    if bad:
        first = bad[0].report.rank
        order = sorted(reports, key=lambda rep: rep.rank != first)
        raise GroupFailed(f"a rank of the {world_size}-process gloo group failed (rank {first} "
                          "first); every rank:\n" + "\n".join(rep.describe() for rep in order),
                          reports)
    return [torch.load(io.BytesIO(r.result), weights_only=True) for r in ranks]
