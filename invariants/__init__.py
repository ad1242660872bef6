"""invariants — property-based checks that training-stability fixes still hold.

Import everything from here; the underscored modules are private. Each family
module declares its public names in ``__all__``; this file re-exports exactly
those, and ``__all__`` below is their sorted union (a test keeps it so).
"""
from invariants import _profiles  # noqa: F401  (registers the ci/dev/thorough profiles)
from invariants._catalog import *  # noqa: F401,F403
from invariants._errors import *  # noqa: F401,F403
from invariants._lora import *  # noqa: F401,F403
from invariants._profiles import *  # noqa: F401,F403
from invariants._strategies import *  # noqa: F401,F403
from invariants._tolerances import *  # noqa: F401,F403

from invariants import (_catalog, _errors, _lora, _strategies,  # noqa: E402
                        _tolerances)

__all__ = sorted(
    {*_catalog.__all__, *_errors.__all__, *_lora.__all__, *_profiles.__all__,
     *_strategies.__all__, *_tolerances.__all__}
)
__version__ = "0.1.0"
