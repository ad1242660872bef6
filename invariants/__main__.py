"""Owns ``python -m invariants``: the same command as the ``invariants`` console script."""
import sys

from invariants._cli import main

sys.exit(main())
