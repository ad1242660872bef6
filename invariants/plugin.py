"""pytest plugin of the harness, registered through the ``pytest11`` entry point.

Options live in one group (``invariants``); their names are constants so tests
and docs cannot drift. Markers: ``golden`` (a golden training run), ``slow``,
``gpu`` (skipped cleanly without CUDA), ``distributed`` (spawns processes).
Unless ``--hypothesis-profile`` is given, the profile comes from
``$HYPOTHESIS_PROFILE``, else ``ci`` (see invariants/_profiles.py). Fixtures:
``device``, ``seeded_rngs`` (seeding through ``invariants._determinism``) and ``golden``
(compare with, or ``--golden-update``, the stored curves; ``invariants.golden``).
"""
from __future__ import annotations

import signal

import pytest

DISTRIBUTED_TIMEOUT_S = 30.0

GROUP = "invariants"
OPT_GOLDEN_UPDATE = "--golden-update"
OPT_GOLDEN_DIR = "--golden-dir"
OPT_DEVICE = "--device"
OPT_GOLDEN_OUTPUT = "--golden-output"

MARKERS = {
    "golden": "a short deterministic training run compared with its stored golden curve",
    "slow": "takes more than a few seconds",
    "gpu": "needs CUDA; skipped cleanly when torch.cuda.is_available() is False",
    "distributed": "spawns a torch.distributed (gloo) process group on loopback; fails after "
                   "distributed(timeout=S) seconds (default 30) instead of hanging",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, "stability invariants")
    group.addoption(OPT_GOLDEN_UPDATE, action="store_true", default=False,
                    help="rewrite the golden curves of the current device key instead of "
                         "comparing with them")
    group.addoption(OPT_GOLDEN_DIR, default=None, metavar="DIR",
                    help="directory of golden/<run>/<device-key>.json (default: ./golden "
                         "under the rootdir)")
    group.addoption(OPT_GOLDEN_OUTPUT, default=None, metavar="DIR",
                    help="where mismatching runs write <run>.<device>.obtained.json and a PNG "
                         "plot (default: ./golden-obtained under the rootdir)")
    group.addoption(OPT_DEVICE, default="cpu", choices=("cpu", "cuda"),
                    help="device for golden runs and device-aware fixtures (default: cpu)")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    from invariants._profiles import load_profile
    try:
        chosen = config.getoption("hypothesis_profile")
    except ValueError:  # hypothesis's plugin not loaded
        chosen = None
    if chosen is None:
        load_profile()


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not _cuda_available():
        pytest.skip("needs CUDA: torch.cuda.is_available() is False on this machine")


@pytest.fixture
def device(request: pytest.FixtureRequest):
    """The torch.device chosen with --device; skips the test if CUDA is asked for but absent."""
    import torch
    name = request.config.getoption(OPT_DEVICE)
    if name == "cuda" and not _cuda_available():
        pytest.skip("--device cuda given but torch.cuda.is_available() is False")
    return torch.device(name)


@pytest.fixture
def seeded_rngs():
    """Seed python, numpy and torch RNGs with 0 for the test; restore their states after."""
    from invariants._determinism import seeded
    with seeded(0) as seed:
        yield seed


class GoldenSession:
    """What the ``golden`` fixture returns: compare a run with its golden, or rewrite it."""

    def __init__(self, golden_dir, output_dir, device, update: bool):
        self.golden_dir, self.output_dir = golden_dir, output_dir
        self.device, self.update = device, update

    def check(self, run):
        """Return the run's curves after comparing (or, with --golden-update, recording) them.

        With --golden-update only ``golden/<run>/<this device key>.json`` is rewritten;
        other device keys are never touched.
        """
        __tracebackhide__ = True
        from invariants.golden.compare import assert_matches_golden
        from invariants.golden.run import execute_memoized
        from invariants.golden.store import record
        if self.update:
            path, curves = record(run, self.golden_dir, self.device)
            print(f"golden updated: {path}")
            return curves
        return assert_matches_golden(run, self.golden_dir, device=self.device,
                                     output_dir=self.output_dir,
                                     curves=execute_memoized(run, self.device))


@pytest.fixture
def golden(request: pytest.FixtureRequest, device) -> GoldenSession:
    """Compare golden runs with ``golden/<run>/<device-key>.json`` (see --golden-update)."""
    from pathlib import Path
    config = request.config
    golden_dir = Path(config.getoption(OPT_GOLDEN_DIR) or config.rootpath / "golden")
    output = Path(config.getoption(OPT_GOLDEN_OUTPUT) or config.rootpath / "golden-obtained")
    return GoldenSession(golden_dir, output, device, config.getoption(OPT_GOLDEN_UPDATE))


@pytest.fixture(autouse=True)
def _distributed_time_limit(request: pytest.FixtureRequest):
    """Tests marked ``distributed`` fail after ``timeout`` seconds instead of hanging.

    A rank waiting in a collective that another rank never reaches blocks forever; the
    alarm turns that into a ``TimeoutError`` in the test (spawn_group then reaps the
    ranks). ``@pytest.mark.distributed(timeout=60)`` changes the limit. Main thread on
    POSIX only (SIGALRM); elsewhere the marker's limit is not enforced here.
    """
    marker = request.node.get_closest_marker("distributed")
    if marker is None or not hasattr(signal, "SIGALRM"):
        yield
        return
    limit = float(marker.kwargs.get("timeout", DISTRIBUTED_TIMEOUT_S))

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.nodeid}: distributed test exceeded {limit:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
