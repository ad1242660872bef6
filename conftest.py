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
