"""invariants._determinism: seeding, thread counts and deterministic flags, set and restored."""
import os
import random

import numpy as np
import pytest
import torch

from invariants import InvalidArgumentError, deterministic, num_threads, one_thread, seeded
from invariants._determinism import DETERMINISM_FLAGS, seed_all, set_num_threads


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seeded_draws_the_same_and_restores_every_stream():
    seed_all(7)
    with seeded(3) as seed:
        first = _draw()
    after = _draw()
    with seeded(3):
        assert _draw() == first
    seed_all(7)
    with seeded(3):
        pass
    assert _draw() == after, "python, numpy and torch streams continue as if untouched"
    assert seed == 3


def test_seed_all_is_what_seeded_does():
    seed_all(11)
    want = _draw()
    with seeded(11):
        assert _draw() == want


def test_thread_counts_are_set_for_the_block_and_restored():
    saved = torch.get_num_threads()
    try:
        set_num_threads(2)
        with num_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_deterministic_sets_everything_and_restores_everything(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads, flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with deterministic(5, threads=1):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == DETERMINISM_FLAGS["CUBLAS_WORKSPACE_CONFIG"]
        inside = _draw()
    with seeded(5):
        assert _draw() == inside
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == \
        (threads, flag)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_restores_a_callers_cublas_setting(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic(0):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("call", [lambda: set_num_threads(0), lambda: num_threads(True).__enter__(),
                                  lambda: deterministic(0, threads=-1).__enter__()],
                         ids=["set_zero", "bool", "deterministic_negative"])
def test_bad_thread_counts_are_rejected(call):
    saved = torch.get_num_threads()
    with pytest.raises(InvalidArgumentError, match=r"threads=.*: must be an integer >= 1"):
        call()
    assert torch.get_num_threads() == saved
