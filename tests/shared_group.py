"""One spawned group per test session, shared by the tests (and pytest-xdist workers) using it,
and its failure reported ONCE.

``shared_outcome(tmp_path_factory, name, run)`` runs ``run()`` once per session: under
pytest-xdist the workers share it through a file lock and a ``torch.save`` file in the
session's base temp directory (read back with ``torch.load(weights_only=True)``). It never
raises: it returns ``{"ok": True, "value": ...}`` or ``{"ok": False, "error": text}``.

``group_value(outcome, request, name)`` is what a test gets: the value, or, when the group
failed, for the FIRST test that asks (claimed under the same lock) a failure carrying the
group's whole report (every rank's exit code or signal and traceback, from
``spawn_group``), and for every other test a skip that names that first test. One broken
group is one failure, not one per test that reads it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch


def _directory(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # xdist workers' base temps are siblings (popen-gw0, ...): share their parent
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shared_outcome(tmp_path_factory, name: str, run: Callable[[], Any]) -> dict:
    """``run()`` once per session (once across xdist workers); its value or its error."""
    directory = _directory(tmp_path_factory)
    done, failed = directory / f"{name}.pt", directory / f"{name}.failed.json"
    with _locked(directory / f"{name}.lock"):
        if not done.exists() and not failed.exists():
            try:
                value = run()
            except Exception as exc:  # noqa: BLE001 - reported by group_value, once
                failed.write_text(json.dumps({"ok": False, "name": name,
                                              "error": f"{type(exc).__name__}: {exc}"}))
            else:
                torch.save(value, done)
        if failed.exists():
            return json.loads(failed.read_text())
        return {"ok": True, "value": torch.load(done, weights_only=True), "name": name}


def group_value(outcome: dict, request: pytest.FixtureRequest, tmp_path_factory) -> Any:
    """The group's value; if it failed: the whole report for the first test, a skip after."""
    __tracebackhide__ = True
    if outcome["ok"]:
        return outcome["value"]
    name = outcome["name"]
    claim = _directory(tmp_path_factory) / f"{name}.reported-by"
    with _locked(_directory(tmp_path_factory) / f"{name}.lock"):
        first = not claim.exists()
        if first:
            claim.write_text(request.node.nodeid)
        reporter = claim.read_text()
    if first:
        pytest.fail(f"the shared group {name!r} failed (reported here once; every other test "
                    f"that uses it is skipped):\n{outcome['error']}", pytrace=False)
    pytest.skip(f"the shared group {name!r} failed: see {reporter}")


def shared_run_curves(tmp_path_factory, request: pytest.FixtureRequest, run) -> dict:
    """A golden run's CPU curves, executed once per session across xdist workers (every test
    that only reads them shares that one execution; determinism tests execute afresh)."""
    from invariants.golden.run import execute
    outcome = shared_outcome(tmp_path_factory, f"golden_curves_{run.name}_"
                             f"{run.config_sha256[:12]}", lambda: execute(run, "cpu"))
    return {m: (list(s), list(v))
            for m, (s, v) in group_value(outcome, request, tmp_path_factory).items()}
