"""Owns the two exception types of the harness (argument checks live in ``_validate``).

``InvariantViolation`` means the subject under test broke a documented
invariant.  ``InvalidArgumentError`` means the *caller* passed something the
check cannot judge (NaN where finite values are required, a negative tolerance,
mismatched shapes); it always echoes ``name=value`` so the fix is obvious.
"""
from __future__ import annotations

__all__ = ["InvalidArgumentError", "InvariantViolation"]


class InvariantViolation(AssertionError):
    """A documented invariant does not hold for the subject.

    Attributes:
      spec_id: the SPEC.md id (``"L1"``, ``"H3"``...) or ``None``.
    """

    def __init__(self, message: str, *, spec_id: str | None = None):
        super().__init__(message)
        self.spec_id = spec_id


class InvalidArgumentError(ValueError):
    """The arguments given to a check, strategy or tool are invalid."""
