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


def _profile_env(monkeypatch, env, want) -> None:
    if env is None:
        monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    else:
        monkeypatch.setenv("HYPOTHESIS_PROFILE", env)
    monkeypatch.setenv("WANT_EXAMPLES", str(want))


PROFILE_PROBE = """
    import os
    from hypothesis import settings

    def test_profile():
        assert settings.default.max_examples == int(os.environ["WANT_EXAMPLES"])
"""


@pytest.mark.parametrize("env, want", [(None, 100), ("dev", 20), ("thorough", 1000),
                                       ("invariants.dev", 20)])
def test_an_opted_in_suite_gets_ci_and_env_selects(pytester, monkeypatch, env, want):
    pytester.makeini("[pytest]\ninvariants_profile = ci\n")
    pytester.makepyfile(PROFILE_PROBE)
    _profile_env(monkeypatch, env, want)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


TEAM_CONFTEST = """
    from hypothesis import settings
    settings.register_profile("ci", max_examples=17, derandomize=False)
    settings.register_profile("theirs", max_examples=13)
    settings.load_profile("ci")
"""


@pytest.mark.parametrize("env, want", [(None, 17), ("ci", 17), ("theirs", 17)])
def test_a_suite_that_did_not_opt_in_keeps_its_own_hypothesis_setup(pytester, monkeypatch,
                                                                    env, want):
    """A team loads its own 'ci' profile in its conftest: installing the harness (and
    importing invariants, which registers namespaced profiles) must not replace it, and
    $HYPOTHESIS_PROFILE naming their profile must not crash pytest."""
    pytester.makeconftest(TEAM_CONFTEST + "    import invariants  # noqa: F401\n")
    pytester.makepyfile(PROFILE_PROBE)
    _profile_env(monkeypatch, env, want)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_an_opted_in_suite_leaves_a_profile_it_does_not_know_to_hypothesis(pytester,
                                                                          monkeypatch):
    pytester.makeini("[pytest]\ninvariants_profile = ci\n")
    pytester.makeconftest(TEAM_CONFTEST)
    pytester.makepyfile(PROFILE_PROBE)
    _profile_env(monkeypatch, "theirs", 17)   # their conftest's 'ci', untouched by us
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_an_unknown_opt_in_value_is_a_clear_usage_error(pytester):
    pytester.makeini("[pytest]\ninvariants_profile = fastest\n")
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invariants_profile='fastest': unknown profile*"])
    assert "Traceback" not in result.stderr.str()


def test_the_cli_refuses_an_unknown_profile_with_exit_2(monkeypatch, capsys):
    from invariants._cli import main
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "fastest")
    assert main(["check", "-q", "--system", "lora_init"]) == 2
    assert "HYPOTHESIS_PROFILE='fastest': unknown profile" in capsys.readouterr().err


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


@pytest.mark.parametrize("ini, printed, not_printed", [
    (None, "t=tensor([0.1000])", "t=torch.tensor("),   # importing invariants alone: no change
    ("[pytest]\ninvariants_profile = dev\n", "t=torch.tensor([0.1], dtype=torch.float32)", None),
], ids=["not_opted_in", "opted_in"])
def test_exact_tensor_printing_only_in_a_suite_that_opted_in(pytester, ini, printed, not_printed):
    """Hypothesis's printer is process-global: a subprocess per suite keeps ours out of it."""
    if ini:
        pytester.makeini(ini)
    pytester.makepyfile("""
        import torch
        from hypothesis import given, strategies as st

        import invariants

        @given(st.just(torch.tensor([0.1])))
        def test_fails(t):
            assert t.sum() > 1
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert printed in out, out
    assert not_printed is None or not_printed not in out, out
