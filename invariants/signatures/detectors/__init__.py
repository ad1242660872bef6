"""The signature detectors, one family per module.

Every signature SPEC.md names (seed sections and "Generic collapse signatures")
is one detector class.  Each class states its rule once, in its docstring, and
implements it twice with the *same floating-point operations in the same order*;
the two forms sit side by side in the family's module, the state class right
after its detector:

- ``scan(view, ctx)`` takes a metric's whole series as numpy arrays and finds the
  first observation that triggers the rule (``VectorisedScanner`` /
  ``scan_series``; used by ``invariants scan``).
- ``stream()`` returns a small ``_XState`` whose ``push(step, x, last)`` takes one
  observation (constant memory per metric: a few floats, and ring buffers whose
  size is a config constant, never the length of the run).  ``StreamingScanner``
  feeds records to these states; ``CollapseGuard`` wraps it.

Running sums are numpy's sequential ``cumsum`` in one form and ``+=`` in the
other, running extrema are ``minimum.accumulate`` / ``min``, rolling medians and maxima
are exact selections (min/max networks / ``sorted``), and the two EMA
recursions of ZClip are ``itertools.accumulate`` over the same Python
expression, so both drivers give bit-identical findings (tests/test_signatures*.py
checks this with Hypothesis).

- ``base``: ``Detector``, ``_State``, the vectorised inputs (``_View``,
  ``_Context``) and the shared numerics (smoothing, noise, regime segments),
  each vectorised helper beside its streaming twin.
- ``threshold``: level rules (``Threshold`` ladders) and ``NonFinite``.
- ``loss``: ``LossSpike`` (spread rule), ``LossJump`` (ratio, short logs), ``Divergence``
  (CUSUM of the level in noise units; warning, then critical once it held).
- ``grad_norm``: ``GradNormSpike`` (ZClip z-score with a local-noise test and the spread rule).
- ``accuracy``: ``AccuracyDrop``.  ``plateau``: ``Plateau``.  ``overfit``: ``OverfitGap``.
- ``background``: ``BackgroundCollapse``.  ``encoder``: ``EncoderShare``.
- ``samples``: LM-sample statistics and ``SampleDetector``.
"""
