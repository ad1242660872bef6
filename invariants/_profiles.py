"""Hypothesis profiles: ``ci`` (the gate), ``dev`` (fast local loop), ``thorough`` (nightly).

``ci`` is derandomized so a PR gate gives the same verdict on every run and
every machine; it is the default whenever ``HYPOTHESIS_PROFILE`` is unset, also
outside CI, so a local run reproduces the gate.  ``thorough`` is random and ten
times larger, for nightly runs that look for new counterexamples (its finds go
to the local example database, which is never committed).
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

__all__ = ["PROFILES", "load_profile"]

PROFILES = ("ci", "dev", "thorough")
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
# No "explain" phase in ci/dev: it re-runs a failing property many times to report which
# lines only failing inputs reach (measured ~2 s per caught broken variant); the shrunk
# counterexample and the reproduce blob are kept. `thorough` keeps every phase.
_FAST_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None,
                          print_blob=True, database=None, suppress_health_check=_SLOW_OK,
                          phases=_FAST_PHASES)
settings.register_profile("dev", max_examples=20, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK, phases=_FAST_PHASES)
settings.register_profile("thorough", max_examples=1000, derandomize=False, deadline=None,
                          print_blob=True, suppress_health_check=_SLOW_OK)


def load_profile(name: str | None = None) -> str:
    """Load ``name``, else ``$HYPOTHESIS_PROFILE``, else ``ci``; return the name loaded."""
    chosen = name or os.environ.get("HYPOTHESIS_PROFILE") or "ci"
    if chosen not in PROFILES:
        from invariants._errors import InvalidArgumentError
        raise InvalidArgumentError(
            f"HYPOTHESIS_PROFILE={chosen!r}: unknown profile; choose one of {PROFILES}")
    settings.load_profile(chosen)
    return chosen
