"""Golden runs: short deterministic training runs recorded as JSON curves and compared.

One concern per module:

* ``run``: ``GoldenRun``, executing a run deterministically, memoising its curves,
  device keys, finding runs by name (``load_runs``), judging a run's behaviour;
* ``store``: the file schema, atomic JSON writes, reading with validation, recording;
* ``compare``: tolerances (``GoldenTolerance`` is ``invariants.Tolerance``), mismatches,
  the plot, ``assert_matches_golden``, and the spread/deviation measures;
* ``ranks``: executing runs on spawned gloo ranks and checking that the ranks agree;
* ``cli``: the ``invariants golden`` subcommand.

Users import the public names from ``invariants``; this package's ``__all__`` is what
``invariants`` re-exports. Nothing here imports a reference model: the runs module is a
name, imported when a command or a spawned rank needs it.
"""
from invariants.golden.compare import (GoldenTolerance, assert_matches_golden, compare_curves,
                                       distributed_deviations, run_spread)
from invariants.golden.ranks import (assert_ranks_logged_same_curves, execute_distributed,
                                     execute_distributed_jobs)
from invariants.golden.run import (GoldenError, GoldenRun, device_key, execute_memoized,
                                   findings_of, mechanism_problems)
from invariants.golden.store import read_golden, record_golden

__all__ = [
    "GoldenError",
    "GoldenRun",
    "GoldenTolerance",
    "assert_matches_golden",
    "assert_ranks_logged_same_curves",
    "compare_curves",
    "device_key",
    "distributed_deviations",
    "execute_distributed",
    "execute_distributed_jobs",
    "execute_memoized",
    "findings_of",
    "mechanism_problems",
    "read_golden",
    "record_golden",
    "run_spread",
]
