"""pytest plugin of the harness, registered through the ``pytest11`` entry point.

Options live in one group (``invariants``); their names are constants so tests
and docs cannot drift. Markers: ``golden`` (a golden training run), ``slow``,
``gpu`` (skipped cleanly without CUDA), ``distributed`` (spawns processes).
Hypothesis settings are left alone unless the suite opts in with the ini option
``invariants_profile = ci`` (or ``dev``/``thorough``): then, unless ``--hypothesis-profile``
is given, ``$HYPOTHESIS_PROFILE`` picks one of ours when it names one, and a profile we do
not know is left to Hypothesis (see invariants/_profiles.py). Fixtures:
``device``, ``seeded_rngs`` (seeding through ``invariants._determinism``) and ``golden``
(compare with, or ``--golden-update``, the stored curves; ``invariants.golden``).
"""
from __future__ import annotations

import signal

import pytest

DISTRIBUTED_TIMEOUT_S = 180.0  # seconds WITHOUT PROGRESS; > spawn_group's hang_after (120)

GROUP = "invariants"
OPT_GOLDEN_UPDATE = "--golden-update"
OPT_GOLDEN_DIR = "--golden-dir"
OPT_DEVICE = "--device"
OPT_GOLDEN_OUTPUT = "--golden-output"
INI_PROFILE = "invariants_profile"

MARKERS = {
    "golden": "a short deterministic training run compared with its stored golden curve",
    "slow": "takes more than a few seconds",
    "gpu": "needs CUDA; skipped cleanly when torch.cuda.is_available() is False",
    "distributed": "spawns a torch.distributed (gloo) process group on loopback; fails after "
                   "distributed(timeout=S) seconds without progress (default 180) instead of "
                   "hanging; a slow test that makes progress is never failed",
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
    parser.addini(INI_PROFILE, default="",
                  help="opt in to the harness's Hypothesis profiles: ci, dev or thorough "
                       "(overridden by $HYPOTHESIS_PROFILE when it names one of them); unset: "
                       "the plugin never changes Hypothesis settings")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    _load_opted_in_profile(config)
    _ranks_die_with_the_controller()


def _ranks_die_with_the_controller() -> None:
    """In a pytest-xdist worker: spawned ranks also exit when the controller (``pytest -n``,
    this worker's parent) dies, not only when this worker does (it would notice only after
    its current test)."""
    import os
    if os.environ.get("PYTEST_XDIST_WORKER") and os.getppid() > 1:
        from invariants.distributed.spawn import also_die_with
        also_die_with(os.getppid())


def _load_opted_in_profile(config: pytest.Config) -> str | None:
    """The profile this suite asked for, loaded; ``None`` when nothing was touched.

    A suite that did not opt in keeps its own Hypothesis setup; ``--hypothesis-profile``
    always wins; ``$HYPOTHESIS_PROFILE`` naming a profile we do not know is Hypothesis's (or
    the suite's) business, never an error here."""
    import os

    opted = str(config.getini(INI_PROFILE) or "").strip()
    if not opted:
        return None
    from invariants._assertions import use_exact_tensor_printing
    use_exact_tensor_printing()   # the suite opted in: counterexample tensors replay exactly
    try:
        if config.getoption("hypothesis_profile") is not None:
            return None
    except ValueError:  # hypothesis's plugin not loaded
        pass
    from invariants._profiles import is_ours, load_profile
    env = os.environ.get("HYPOTHESIS_PROFILE")
    if env and not is_ours(env):
        return None
    if not is_ours(opted):
        raise pytest.UsageError(f"{INI_PROFILE}={opted!r}: unknown profile; choose one of "
                                "ci, dev, thorough (or leave it unset)")
    return load_profile(env or opted)


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

    def check(self, run, curves=None):
        """Return the run's curves after comparing (or, with --golden-update, recording) them.

        ``curves``: the run's curves if the caller already has them (e.g. shared by pytest-xdist
        workers); by default the run is executed (once per process). With --golden-update the
        run is executed afresh and only ``golden/<run>/<this device key>.json`` is rewritten;
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
                                     curves=execute_memoized(run, self.device)
                                     if curves is None else curves)


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
    """Tests marked ``distributed`` fail after ``timeout`` seconds WITHOUT PROGRESS.

    Progress (``invariants.distributed.progress``): this process used CPU, or a rank of a
    group it spawned did (``spawn_group`` notes every heartbeat that shows progress). A
    rank waiting in a collective that another rank never reaches blocks forever and uses
    no CPU; the alarm turns that into a ``TimeoutError`` in the test (spawn_group then
    reaps the ranks). A slow test on a busy machine keeps making progress and is never
    failed for being slow. The default (``DISTRIBUTED_TIMEOUT_S``) is longer than
    ``spawn_group``'s own hang detector, so a hung group is reported by spawn_group, with
    every rank's stacks; ``@pytest.mark.distributed(timeout=60)`` changes it. Main thread
    on POSIX only (SIGALRM); elsewhere the marker's limit is not enforced here.
    """
    marker = request.node.get_closest_marker("distributed")
    if marker is None or not hasattr(signal, "SIGALRM"):
        yield
        return
    import time

    from invariants._validate import require_positive
    from invariants.distributed.progress import CpuProgress, last_progress
    limit = marker.kwargs.get("timeout", DISTRIBUTED_TIMEOUT_S)
    require_positive("distributed(timeout)", limit)
    check_every = min(limit, 1.0)
    own = CpuProgress()
    state = {"last": time.monotonic()}
    own.update(state["last"], time.process_time())

    def expire(signum, frame):
        now = time.monotonic()
        if own.update(now, time.process_time()):
            state["last"] = now
        idle = now - max(state["last"], last_progress())
        if idle < limit:
            signal.setitimer(signal.ITIMER_REAL, min(check_every, limit - idle))
            return
        raise TimeoutError(f"{request.node.nodeid}: distributed test exceeded {limit:g}s "
                           "without progress (neither this process nor a rank it spawned "
                           "used CPU)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, check_every)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
