"""Reference implementations of the five seed systems, fixed and broken side by side.

Each module holds a config dataclass, the model, and ``cases()``: the kill-matrix
rows for its SPEC invariants. ``catalog.py`` gathers them.
"""
