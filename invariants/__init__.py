"""invariants — property-based checks that training-stability fixes still hold.

Import everything from here; the underscored modules are private. Each family
module declares its public names in ``__all__``; this file re-exports exactly
those, and ``__all__`` below is their sorted union (a test keeps it so).
"""
from invariants import _profiles  # noqa: F401  (registers the ci/dev/thorough profiles)
from invariants._catalog import *  # noqa: F401,F403
from invariants._checkpoint import *  # noqa: F401,F403
from invariants._context import *  # noqa: F401,F403
from invariants._distributed import *  # noqa: F401,F403
from invariants._errors import *  # noqa: F401,F403
from invariants._golden import *  # noqa: F401,F403
from invariants._guard import *  # noqa: F401,F403
from invariants._hyperlora import *  # noqa: F401,F403
from invariants._lora import *  # noqa: F401,F403
from invariants._pipeline import *  # noqa: F401,F403
from invariants._profiles import *  # noqa: F401,F403
from invariants._scan import *  # noqa: F401,F403
from invariants._signatures import *  # noqa: F401,F403
from invariants._staging import *  # noqa: F401,F403
from invariants._strategies import *  # noqa: F401,F403
from invariants._tolerances import *  # noqa: F401,F403

from invariants import (  # noqa: E402
    _catalog, _checkpoint, _context, _distributed, _errors, _golden, _guard, _hyperlora, _lora, _pipeline, _profiles, _scan, _signatures, _staging, _strategies, _tolerances,
)

_FAMILIES = (_catalog, _checkpoint, _context, _distributed, _errors, _golden, _guard, _hyperlora, _lora, _pipeline, _profiles, _scan, _signatures, _staging, _strategies, _tolerances)
__all__ = sorted({name for family in _FAMILIES for name in family.__all__})
__version__ = "0.1.0"
