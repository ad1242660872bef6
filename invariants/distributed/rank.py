"""What runs inside each rank that ``spawn_group`` starts: ``entry`` and its heartbeat.

A rank talks to its parent over two pipes and writes no file:

* ``messages`` carries framed byte messages, never pickles: ``B`` + the rank's CPU seconds
  outside the heartbeat thread (every ``BEAT_S``, from a daemon thread: the parent judges
  progress from them, ``invariants.distributed.progress``), ``R`` + the result as
  ``torch.save`` bytes (the parent reads it with ``torch.load(weights_only=True)``), ``E`` +
  the monotonic time it failed (the clock is system-wide: the parent orders the ranks'
  failures by it) + the traceback of the exception it died of.
* ``faults`` is a raw stream for ``faulthandler``: every thread's Python stack when the rank
  dies of a fatal signal (SIGSEGV, SIGABRT: "terminate called without an active
  exception"), and on SIGUSR1, which the parent sends before it stops a hung rank.

A rank dies with its parent: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the kernel
kill it the moment the parent dies, even while it is blocked in C++ (a gloo wait) or holds
the GIL; the heartbeat thread also checks ``os.getppid()`` every beat (other POSIX systems)
and exits when the parent is gone or its pipe is closed, or when a process registered with
``spawn.also_die_with`` (pytest-xdist's controller) is gone. With nothing written to disk,
nothing is left behind either.
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import io
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from invariants._determinism import set_num_threads
from invariants.distributed.rendezvous import join_group

__all__: list[str] = []  # internals of spawn_group

BEAT_S = 0.5
PARENT_GONE_EXIT = 75   # EX_TEMPFAIL; nobody reads it (the parent is gone)
BEAT, RESULT, ERROR = b"B", b"R", b"E"
_PR_SET_PDEATHSIG = 1
_keep: list[Any] = []   # the fault pipe must stay open for faulthandler's descriptor


def die_with_parent(parent_pid: int) -> None:
    """Be killed by the kernel when the parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl: the signal will never come
        os._exit(PARENT_GONE_EXIT)


class _Channel:
    """Framed messages to the parent; one writer at a time (the heartbeat and the rank)."""

    def __init__(self, connection):
        self.connection, self.lock = connection, threading.Lock()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self.lock:
            self.connection.send_bytes(kind + payload)


def alive(pid: int) -> bool:
    """Process ``pid`` exists and is not a zombie (Linux: its ``/proc`` state)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def _heartbeat(channel: _Channel, parent_pid: int, watched: tuple[int, ...]) -> None:
    while True:
        if os.getppid() != parent_pid or not all(alive(pid) for pid in watched):
            os._exit(PARENT_GONE_EXIT)
        cpu = time.process_time() - time.thread_time()  # every thread but this one
        try:
            channel.send(BEAT, struct.pack("!d", cpu))
        except OSError:  # the parent closed its end: it is gone
            os._exit(PARENT_GONE_EXIT)
        time.sleep(BEAT_S)


def entry(rank: int, world_size: int, port: int, payload: bytes, messages, faults,
          parent_pid: int, watched: tuple[int, ...], timeout_s: float) -> None:
    """The spawned process's target: join the group, run ``fn``, send the result or error.

    ``payload`` is ``pickle.dumps((fn, args))`` made by the parent, unpickled here inside
    the ``try`` so that an import error of ``fn``'s module is reported like any other.
    Exits 0 after sending the result, 1 after sending the traceback.
    """
    die_with_parent(parent_pid)
    _keep.append(faults)
    faulthandler.enable(file=faults.fileno(), all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=faults.fileno(), all_threads=True)
    channel = _Channel(messages)
    threading.Thread(target=_heartbeat, args=(channel, parent_pid, watched), daemon=True,
                     name="invariants-heartbeat").start()
    set_num_threads(1)
    code = 0
    try:
        fn, args = pickle.loads(payload)
        join_group(rank, world_size, port, timeout_s)
        result = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(result, buffer)
        channel.send(RESULT, buffer.getvalue())
    except BaseException:  # noqa: BLE001 - reported to the parent, then exit 1
        code = 1
        with contextlib.suppress(OSError):
            channel.send(ERROR, struct.pack("!d", time.monotonic())
                         + traceback.format_exc().encode("utf-8", "replace"))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    sys.exit(code)
