"""The pytest plugin, tested with pytester in a throw-away project."""
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestAssertRewriteWarning")


def test_markers_are_registered(pytester):
    result = pytester.runpytest("--markers")
    for marker in ("golden:", "slow:", "gpu:", "distributed:"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{marker}*"])


def test_option_group_is_named(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["stability invariants:", "*--golden-update*",
                                 "*--golden-dir*", "*--device*"])


def test_gpu_tests_skip_cleanly_without_cuda(pytester, monkeypatch):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.gpu
        def test_needs_cuda():
            raise AssertionError("must not run without CUDA")

        def test_cpu():
            assert sum([1, 1]) == 2
    """)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = pytester.runpytest_inprocess("-rs", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*needs CUDA: torch.cuda.is_available() is False*"])


def test_device_fixture_and_cuda_request(pytester, monkeypatch):
    pytester.makepyfile("""
        def test_device(device):
            assert device.type == "cuda"
    """)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = pytester.runpytest_inprocess("--device", "cuda", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*--device cuda given but torch.cuda.is_available() is False*"])


def test_default_profile_is_ci_and_env_selects(pytester, monkeypatch):
    pytester.makepyfile("""
        import os
        from hypothesis import settings

        def test_profile():
            want = os.environ.get("WANT_EXAMPLES")
            assert settings.default.max_examples == int(want)
    """)
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    monkeypatch.setenv("WANT_EXAMPLES", "100")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "dev")
    monkeypatch.setenv("WANT_EXAMPLES", "20")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "thorough")
    monkeypatch.setenv("WANT_EXAMPLES", "1000")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_unknown_profile_is_a_clear_error(pytester, monkeypatch):
    pytester.makepyfile("def test_x():\n    pass\n")
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "fastest")
    result = pytester.runpytest_subprocess()
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*HYPOTHESIS_PROFILE='fastest': unknown profile*"])


def test_seeded_rngs_fixture_is_deterministic(pytester):
    pytester.makepyfile("""
        import torch
        draws = []

        def test_a(seeded_rngs):
            draws.append(torch.rand(3))

        def test_b(seeded_rngs):
            draws.append(torch.rand(3))
            assert torch.equal(draws[0], draws[1])
    """)
    pytester.runpytest_inprocess().assert_outcomes(passed=2)


def test_distributed_marker_turns_a_hang_into_a_failure(pytester):
    pytester.makepyfile("""
        import time
        import pytest

        @pytest.mark.distributed(timeout=0.5)
        def test_hangs():
            time.sleep(5)

        @pytest.mark.distributed
        def test_quick():
            assert sum([1, 1]) == 2
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*TimeoutError*test_hangs: distributed test exceeded 0.5s*"])
