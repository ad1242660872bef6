"""Root conftest: every test of this repo runs with seeded RNGs.

The Hypothesis profile is chosen by the invariants pytest plugin
(``$HYPOTHESIS_PROFILE``, default ``ci``; or ``--hypothesis-profile``).
"""
import pytest


@pytest.fixture(autouse=True)
def _seed_everything(seeded_rngs):
    yield
