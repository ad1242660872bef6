"""Reference implementations of the five seed systems, fixed and broken side by side.

One folder per seed system: ``<system>/config.py`` (the config dataclass, fixed and broken
paths behind flags), ``model.py``, ``train.py``, ``cases.py`` (the kill-matrix rows for its SPEC
invariants) and ``golden.py`` (its fixed and broken golden run). ``catalog.py`` gathers the
cases and golden runs; ``data_parallel.py`` is the DDP plumbing the training loops share.
Reference models import only public names of ``invariants``.
"""
