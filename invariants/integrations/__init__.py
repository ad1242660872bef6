"""Trainer integrations: ``CollapseGuard`` as a callback of the trainers users already run.

- ``invariants.integrations.hf.CollapseGuardCallback``: a ``transformers.TrainerCallback``
  (extra ``[hf]``: ``pip install 'stability-invariants[hf]'``).
- ``invariants.integrations.lightning.CollapseGuardCallback``: a Lightning ``Callback``
  (extra ``[lightning]``: ``pip install 'stability-invariants[lightning]'``).

This package imports neither library: ``import invariants`` (and ``import
invariants.integrations``) never pulls in transformers or Lightning; importing a submodule
without its library raises one ``ImportError`` naming the extra to install.  What the two
share (argument checks, metric-name mapping, feeding the guard, the stop decision) is in
``_common``.
"""
__all__: list[str] = []
