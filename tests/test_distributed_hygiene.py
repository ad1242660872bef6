"""spawn_group's process hygiene: ranks die with their parent and leave nothing behind, the
store and every rank listen on loopback only, the store's port is retried, a failed shared
group is reported once, and the plugin's ``distributed`` time limit fails a hang, not a
slow test.

Two spawned groups here (a killed parent's, the loopback one); the rest runs in this
process or in pytester subprocesses. The contract is in docs/distributed.md ("Process
hygiene and time").
"""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from invariants import spawn_group
from invariants.distributed import rendezvous
from tests import ddp_workers
from tests.ddp_workers import gone

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


# ------------------------------------------------------------------ a failed group, once
SHARED_GROUP_MODULE = """
    import pytest
    from tests.shared_group import group_value, shared_outcome

    def broken_group():
        raise RuntimeError("a rank of the 2-process gloo group failed (rank 1 first); "
                           "every rank:\\n--- rank1 ---\\nexit code 1 (pid 1)\\nValueError: bad shard")

    @pytest.fixture(scope="session")
    def outcome(tmp_path_factory):
        return shared_outcome(tmp_path_factory, "broken", broken_group)

    @pytest.fixture
    def group(outcome, request, tmp_path_factory):
        return group_value(outcome, request, tmp_path_factory)

    @pytest.mark.parametrize("i", range(6))
    def test_reads_the_group(group, i):
        assert group
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one_process", "two_xdist_workers"])
def test_a_failed_shared_group_is_reported_once_and_the_other_tests_point_to_it(
        pytester, monkeypatch, workers):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_shared=SHARED_GROUP_MODULE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", *workers)
    result.assert_outcomes(errors=1, skipped=5)
    out = result.stdout.str()
    assert out.count("ValueError: bad shard") == 1, out
    result.stdout.fnmatch_lines(["*the shared group 'broken' failed (reported here once*",
                                 "*SKIPPED*the shared group 'broken' failed: see "
                                 "test_shared.py::test_reads_the_group*"])



# ------------------------------------------------------------------ process hygiene
PARENT = """
import sys
sys.path.insert(0, {root!r})
from invariants import spawn_group
from tests import ddp_workers
if __name__ == "__main__":
    spawn_group(ddp_workers.pid_file_worker, 2, {directory!r})
"""
PYTEST_PARENT = """
from invariants import spawn_group
from tests import ddp_workers

def test_a_group_that_runs_until_pytest_is_killed():
    spawn_group(ddp_workers.pid_file_worker, 2, {directory!r})
"""
# who is killed with -9: the command that started the group (the ranks are its children,
# or, under pytest-xdist, its worker's children)
KILLED_PARENTS = {
    "python running spawn_group": lambda d, bt: ["parent.py", PARENT],
    "pytest -n 1 (its xdist controller)": lambda d, bt: [
        "test_parent.py", PYTEST_PARENT, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider",
        f"--basetemp={bt}"],
}


@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("case", list(KILLED_PARENTS))
def test_ranks_die_with_their_parent_and_leave_nothing_behind(tmp_path, case):
    """kill -9 of the process running spawn_group, or of pytest's main process above an
    xdist worker running it: the ranks are gone within seconds, and nothing of theirs or
    spawn_group's is left in the temp directory."""
    pids, tmp = tmp_path / "pids", tmp_path / "tmp"
    pids.mkdir(), tmp.mkdir()
    name, source, *pytest_args = KILLED_PARENTS[case](pids, tmp_path / "basetemp")
    (tmp_path / name).write_text(source.format(root=str(ROOT), directory=str(pids)))
    command = [sys.executable] + (pytest_args + [name] if pytest_args else [name])
    output = tmp_path / "output.txt"
    with open(output, "w") as out:
        parent = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.glob("rank*.pid"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        ranks = [int(p.read_text()) for p in sorted(pids.glob("rank*.pid"))]
        assert not any(gone(pid) for pid in ranks)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    killed = time.monotonic()
    while not all(gone(pid) for pid in ranks) and time.monotonic() - killed < 5:
        time.sleep(0.05)
    assert all(gone(pid) for pid in ranks), f"ranks {ranks} outlived {case}"
    assert list(tmp.iterdir()) == [], "files left behind"


@pytest.mark.skipif(not LINUX, reason="reads /proc/net/tcp")
def test_the_store_and_every_rank_listen_on_loopback_only():
    """Rank 0's store used to listen on every interface (``*:<port>``): now the parent serves
    it on 127.0.0.1, and the ranks' gloo sockets are bound to the loopback interface."""
    rank0, _ = spawn_group(ddp_workers.listeners_worker, 2)
    listening = rank0["listening"]
    owners = {pid for pid, _, _ in listening}
    assert rank0["parent"] == os.getpid() and rank0["parent"] in owners, listening  # the store
    assert set(rank0["ranks"]) <= owners, listening                              # gloo
    assert all(address in ("127.0.0.1", "::1") for _, address, _ in listening), listening
    assert rank0["gloo_ifname"] == rendezvous.loopback_interface()


def _address_in_use(times: int, error: Exception):
    real, calls = rendezvous._server_store, []

    def server_store(sock, timeout_s):
        calls.append(sock.getsockname()[1])
        if len(calls) <= times:
            raise error
        return real(sock, timeout_s)
    return server_store, calls


# failures before the store starts -> the outcome (None: started), attempts made
PORT_RETRIES = {
    "first port free": (0, None, 1),
    "two ports taken": (2, None, 3),
    "every port taken": (3, r"could not start the rendezvous store on 127\.0\.0\.1 after 3 "
                            r"attempts, each on a fresh port: RuntimeError: .*Address already "
                            r"in use", 3),
    "EADDRINUSE as OSError": (1, None, 2),
}


@pytest.mark.parametrize("case", list(PORT_RETRIES))
def test_the_store_port_is_retried_when_it_is_taken(monkeypatch, case):
    times, failure, attempts = PORT_RETRIES[case]
    error = OSError(errno.EADDRINUSE, "Address already in use") if "OSError" in case else \
        RuntimeError("The server socket has failed to listen: Address already in use")
    server_store, calls = _address_in_use(times, error)
    monkeypatch.setattr(rendezvous, "_server_store", server_store)
    if failure:
        with pytest.raises(RuntimeError, match=failure):
            rendezvous.start_store(5.0)
    else:
        store, port = rendezvous.start_store(5.0)
        store.set("k", "v")
        assert port == calls[-1] and store.get("k") == b"v"
        del store
    assert len(calls) == attempts


def test_a_store_error_other_than_address_in_use_is_not_retried(monkeypatch):
    server_store, calls = _address_in_use(5, RuntimeError("permission denied"))
    monkeypatch.setattr(rendezvous, "_server_store", server_store)
    with pytest.raises(RuntimeError, match="permission denied"):
        rendezvous.start_store(5.0)
    assert len(calls) == 1


# the plugin's distributed(timeout=S): S seconds WITHOUT PROGRESS -> the test's outcome
PLUGIN_LIMIT = """
    import time
    import pytest
    from invariants.distributed.progress import note_progress
    from tests.ddp_workers import burn_cpu

    # limits of 2 s: one second of a starved process (a loaded CI runner) is not a hang
    @pytest.mark.distributed(timeout=2)
    def test_sleeps():
        time.sleep(6)

    @pytest.mark.distributed(timeout=2)
    def test_computes_for_longer_than_the_limit():
        burn_cpu(3.0)

    @pytest.mark.distributed(timeout=2)
    def test_waits_for_a_group_that_makes_progress():
        for _ in range(16):   # what spawn_group does for each heartbeat that shows progress
            time.sleep(0.25)
            note_progress()
"""


def test_the_plugin_time_limit_fails_a_hang_not_a_slow_test(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_limit=PLUGIN_LIMIT)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*TimeoutError*test_sleeps: distributed test exceeded 2s "
                                 "without progress*"])


FAILING_RUNS = '''
from invariants import GoldenRun


def _boom(seed, device):
    raise RuntimeError("rank blew up on purpose")


RUNS = (GoldenRun(name="boom-fixed", fn=_boom, config={"boom": 1}),)
'''


@pytest.mark.distributed(timeout=120)
def test_a_failed_golden_group_is_one_clear_report_not_a_traceback(tmp_path, monkeypatch,
                                                                   capsys):
    from invariants._cli import main
    (tmp_path / "boom_runs.py").write_text(FAILING_RUNS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    code = main(["golden", "--runs", "boom_runs", "--world-size", "2"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("invariants golden: the world-size-2 group did not complete"), err
    assert "rank blew up on purpose" in err and "--- rank0 ---" in err and "--- rank1 ---" in err, err
