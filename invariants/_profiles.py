"""Hypothesis profiles: ``ci`` (the gate), ``dev`` (fast local loop), ``thorough`` (nightly).

They are registered under namespaced names (``invariants.ci``, ``invariants.dev``,
``invariants.thorough``) so importing the package never replaces a profile a team registered
under its own ``ci``; the short names are what ``load_profile``, ``$HYPOTHESIS_PROFILE`` and the
plugin's opt-in (``invariants_profile`` in the pytest ini) accept.

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
NAMESPACE = "invariants."


def registered_name(profile: str) -> str:
    """``ci`` -> ``invariants.ci`` (a namespaced name passes through)."""
    return profile if profile.startswith(NAMESPACE) else NAMESPACE + profile


def is_ours(profile: str | None) -> bool:
    return bool(profile) and (profile in PROFILES or (
        profile.startswith(NAMESPACE) and profile[len(NAMESPACE):] in PROFILES))

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
# No "explain" phase in ci/dev: it re-runs a failing property many times to report which
# lines only failing inputs reach (measured ~2 s per caught broken variant); the shrunk
# counterexample and the reproduce blob are kept. `thorough` keeps every phase.
_FAST_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

settings.register_profile(registered_name("ci"), max_examples=100, derandomize=True, deadline=None,
                          print_blob=True, database=None, suppress_health_check=_SLOW_OK,
                          phases=_FAST_PHASES)
settings.register_profile(registered_name("dev"), max_examples=20, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK, phases=_FAST_PHASES)
settings.register_profile(registered_name("thorough"), max_examples=1000, derandomize=False, deadline=None,
                          print_blob=True, suppress_health_check=_SLOW_OK)


def load_profile(name: str | None = None) -> str:
    """Load ``name``, else ``$HYPOTHESIS_PROFILE``, else ``ci``; return the short name loaded.

    For the harness's own tools (``invariants check``, bench). The pytest plugin loads a
    profile only when a suite opts in (``invariants_profile`` ini option)."""
    chosen = name or os.environ.get("HYPOTHESIS_PROFILE") or "ci"
    if not is_ours(chosen):
        from invariants._errors import InvalidArgumentError
        raise InvalidArgumentError(
            f"HYPOTHESIS_PROFILE={chosen!r}: unknown profile; choose one of {PROFILES}")
    settings.load_profile(registered_name(chosen))
    from invariants._assertions import use_exact_tensor_printing
    use_exact_tensor_printing()   # counterexample tensors that replay exactly (opt-in, here)
    return chosen.removeprefix(NAMESPACE)
