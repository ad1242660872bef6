"""The fixes users put in their own training code, under one public name.

    from invariants.fixes import clamp_frobenius, NormGovernor, CollapseGuard

Seed 000's per-sample Frobenius clamp and LoRA-norm governor, and the live ``CollapseGuard``.
These are implementations, not checks: the checks (``invariants.assert_*``) never depend on
them being used, and nothing here imports a reference model.
"""
from invariants.fixes.frobenius import clamp_frobenius, frobenius_norms
from invariants.fixes.governor import GOVERNOR_LEVELS, GovernorDecision, NormGovernor
from invariants.signatures.guard import CollapseGuard

__all__ = [
    "CollapseGuard",
    "GOVERNOR_LEVELS",
    "GovernorDecision",
    "NormGovernor",
    "clamp_frobenius",
    "frobenius_norms",
]
