"""Public face of the harness's argument checks, for code outside the library.

Reference models and users' own modules validate their arguments with the same
``name=value: problem`` voice as the checks (``InvalidArgumentError``, a ``ValueError``):

    from invariants.validation import require, require_positive
    require_positive("lr", lr)

The implementations live in ``invariants._validate`` (their one owner).
"""
from invariants._errors import InvalidArgumentError
from invariants._validate import (finite_number, require, require_finite, require_in_unit_interval,
                                  require_max_norm, require_min_delta, require_non_negative,
                                  require_patience, require_positive, require_tensor)

__all__ = [
    "InvalidArgumentError",
    "finite_number",
    "require",
    "require_finite",
    "require_in_unit_interval",
    "require_max_norm",
    "require_min_delta",
    "require_non_negative",
    "require_patience",
    "require_positive",
    "require_tensor",
]
