"""Root conftest: every test of this repo runs with seeded RNGs and one torch thread.

The Hypothesis profile is chosen by the invariants pytest plugin
(``$HYPOTHESIS_PROFILE``, default ``ci``; or ``--hypothesis-profile``).
"""
import pytest

from invariants._determinism import set_num_threads


def pytest_configure(config):
    # Every model in this suite is tiny: one intra-op thread per xdist worker is faster
    # than two competing threads on the 2-core CI machine (measured 5-30x on the catalog).
    set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything(seeded_rngs):
    yield


_TEMP_PATTERNS = (".*.invariants-tmp", ".*.json.*.tmp", ".scan-*.png")   # the writers' temp names
_NOT_SEARCHED = {".git", ".venv", ".tox", "__pycache__", "stability_invariants.egg-info"}


def pytest_sessionfinish(session, exitstatus):
    """Nothing is left behind (issue 17): when the session ends (in every xdist worker, and in
    the controller) no rank process it spawned is alive and no temp file of the tool's writers
    lies in the repository; otherwise the session fails, naming them."""
    import multiprocessing
    from pathlib import Path

    root = Path(session.config.rootpath)
    alive = [f"{p.name} (pid {p.pid})" for p in multiprocessing.active_children()]
    files = [str(p.relative_to(root)) for top in root.iterdir()
             if top.name not in _NOT_SEARCHED
             for pattern in _TEMP_PATTERNS
             for p in ([top] if top.is_file() and top.match(pattern) else
                       top.rglob(pattern) if top.is_dir() else [])]
    if alive or files:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = (f"left behind by this session: processes {alive or 'none'}; "
                f"temp files {files or 'none'}")
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
