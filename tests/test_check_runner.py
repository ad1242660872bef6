"""`invariants check`'s runner (``run_cases``): worker processes change nothing but the time.

Outcomes, counterexamples and their order are the same with one process and with forked
workers; a worker that dies costs only its case (an error outcome), never the run; the garbage
collector's freeze is undone; ``--jobs`` is validated like every other argument.
"""
from __future__ import annotations

import gc
import json
import os
import re
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from invariants import Case, InvariantViolation
from invariants._catalog import _why_not_fork, run_cases
from invariants._cli import main
from invariants._profiles import load_profile

FORK_REFUSED = _why_not_fork()
needs_fork = pytest.mark.skipif(FORK_REFUSED is not None,
                                reason=f"forked workers are refused here: {FORK_REFUSED}")


def _pid_check(subject) -> None:
    """Caught: the violation names the process that ran the case, so tests can see where."""
    raise InvariantViolation(f"ran in pid {os.getpid()} on {subject()}")


def _property_check(subject) -> None:
    """A real Hypothesis property: fails for n >= subject(); its shrunk example is n=subject()."""
    limit = subject()

    @given(n=st.integers(0, 1000))
    def prop(n):
        if n >= limit:
            raise InvariantViolation(f"n={n} >= {limit}")
    prop()


def _sleep_then_hold(subject) -> None:
    time.sleep(subject())


def _die(subject) -> None:
    os._exit(subject())  # a worker killed mid-case (segfault, OOM killer)


def _case(inv: str, variant: str, expected: str, subject, check) -> Case:
    return Case("toy", inv, variant, expected, subject, check)


def _toy_catalog() -> list[Case]:
    return [_case("T1", "fixed", "holds", lambda: 0.3, _sleep_then_hold),   # slow first
            _case("T1", "broken:pid", "caught", lambda: "x", _pid_check),
            _case("T2", "broken:limit_7", "caught", lambda: 7, _property_check),
            _case("T2", "fixed", "holds", lambda: 2000, _property_check),
            _case("T3", "broken:limit_0", "caught", lambda: 0, _property_check),
            _case("T3", "broken:pid", "caught", lambda: "y", _pid_check)]


def _summary(outcomes) -> list[tuple]:
    """What the output shows of each outcome (the pid is the one thing allowed to differ)."""
    return [(o.case.id, o.outcome, o.ok, re.sub(r"pid \d+", "pid N", o.counterexample or ""))
            for o in outcomes]


@pytest.fixture(autouse=True)
def _ci_profile():
    load_profile("ci")


@pytest.mark.parametrize("jobs", [1, 2, 3, 10])
def test_outcomes_and_their_order_do_not_depend_on_jobs(jobs):
    serial = run_cases(_toy_catalog(), jobs=1)
    assert _summary(run_cases(_toy_catalog(), jobs=jobs)) == _summary(serial)
    assert [o.outcome for o in serial] == ["holds", "caught", "caught", "holds", "caught",
                                           "caught"]
    assert "n=7" in serial[2].counterexample and "n=0" in serial[4].counterexample


@needs_fork
def test_jobs_run_cases_in_worker_processes_and_one_job_in_this_one():
    parent = f"pid {os.getpid()} "

    def pids(outcomes):
        return {o.counterexample for o in outcomes if "pid" in (o.counterexample or "")}

    assert all(parent in p for p in pids(run_cases(_toy_catalog(), jobs=1)))
    assert not any(parent in p for p in pids(run_cases(_toy_catalog(), jobs=2)))


def test_on_outcome_is_called_in_catalog_order_even_when_a_later_case_finishes_first():
    seen = []
    run_cases(_toy_catalog(), jobs=2, on_outcome=lambda o: seen.append(o.case.id))
    assert seen == [c.id for c in _toy_catalog()]


@needs_fork
def test_a_dying_worker_costs_its_case_only():
    cases = _toy_catalog()
    cases.insert(2, _case("T9", "fixed", "holds", lambda: 3, _die))
    outcomes = run_cases(cases, jobs=2)
    died = outcomes[2]
    assert (died.outcome, died.ok) == ("error", False)
    assert "worker process running this case died (exit code 3)" in died.detail
    rest = outcomes[:2] + outcomes[3:]
    assert _summary(rest) == _summary(run_cases(_toy_catalog(), jobs=1))


@needs_fork
def test_when_every_worker_dies_the_rest_are_errors_not_silence():
    cases = [_case("T9", "fixed", "holds", lambda: 4, _die),
             _case("T9", "broken:b", "caught", lambda: 4, _die),
             _case("T8", "fixed", "holds", lambda: 0.0, _sleep_then_hold)]
    outcomes = run_cases(cases, jobs=2)  # each worker takes one dying case: none is left
    assert [o.outcome for o in outcomes] == ["error", "error", "error"]
    assert "not run: every worker process died" in outcomes[2].detail


def test_other_threads_mean_no_fork(monkeypatch):
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        assert _why_not_fork() == "the process runs other threads"
        parent = f"pid {os.getpid()} "
        outcomes = run_cases(_toy_catalog(), jobs=2)  # falls back to this process
        assert parent in outcomes[1].counterexample
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_gc_freeze_is_undone_unless_the_caller_froze_first(jobs):
    assert gc.get_freeze_count() == 0
    run_cases(_toy_catalog(), jobs=jobs)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        run_cases(_toy_catalog(), jobs=jobs)
        assert gc.get_freeze_count() >= mine  # the caller's freeze is left in place
    finally:
        gc.unfreeze()


def test_check_prints_the_same_json_with_one_and_two_jobs(capsys):
    argv = ["check", "--system", "lora_init", "--invariant", "L4", "--json"]
    assert main(argv + ["--jobs", "1"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(argv + ["--jobs", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == one


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_bad_jobs_exit_2_before_anything_runs(jobs, capsys):
    assert main(["check", "--jobs", jobs, "--catalog", "no_such_module_xyz"]) == 2
    err = capsys.readouterr().err
    assert f"--jobs={jobs}: must be an integer >= 1" in err and "--catalog" not in err


AUTO_JOBS = [  # (--jobs, --threads, cases, usable CPUs) -> workers
    ((None, 1, 75, 2), 2),     # the 2-core machine, whole catalog
    ((None, 1, 75, 64), 4),    # capped: the slowest cases bound the gain
    ((None, 2, 75, 4), 2),     # threads share the CPUs
    ((None, 4, 75, 2), 1),     # more threads than CPUs: still one process
    ((None, 1, 3, 8), 1),      # fewer than two cases a worker: not worth a fork
    ((None, 1, 4, 8), 2),
    ((3, 1, 2, 1), 3),         # asked for: honoured (run_cases caps it at the cases)
]


@pytest.mark.parametrize("args,want", AUTO_JOBS, ids=[str(a) for a, _ in AUTO_JOBS])
def test_jobs_default(monkeypatch, args, want):
    from invariants import _cli
    jobs, threads, n_cases, cpus = args
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert _cli._jobs(jobs, threads, n_cases) == want
