"""Owns ``EncoderShare`` (the encoder's share of the gradient norm too high or too
low; seed 004) and its streaming state.
"""
from __future__ import annotations

import numpy as np

from invariants.signatures.config import SignatureConfig
from invariants.signatures.detectors.base import Detector, _first, _State
from invariants.signatures.findings import _g


class EncoderShare(Detector):
    """share = ``grad_norm_encoder`` / last finite ``grad_norm`` (> 0): > high or < low."""

    def __init__(self, signature: str, metric: str, cfg: SignatureConfig, high: bool):
        super().__init__(metric, cfg)
        self.signature = signature
        self.high = high
        self.bound = cfg.encoder_share_high if high else cfg.encoder_share_low

    def _f(self, step, share):
        what = ("the encoder dominates the gradient" if self.high
                else "the encoder is starving")
        return self.finding("warning", step, share, self.bound,
                            f"encoder gradient share {_g(share)} {'>' if self.high else '<'} "
                            f"{_g(self.bound)}: {what} (seed 004)")

    def scan(self, view, ctx):
        tot, ok = ctx.last_before("grad_norm", view.pos)
        ok &= tot > 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            share = view.x / tot
        j = _first(ok & ((share > self.bound) if self.high else (share < self.bound)))
        return [self._f(view.step[j], share[j])] if j >= 0 else []

    def stream(self):
        return _EncoderShareState(self)


class _EncoderShareState(_State):
    __slots__ = ("det", "high", "bound")

    def __init__(self, det):
        self.det = det
        self.high = det.high
        self.bound = det.bound
        self.done = False

    def push(self, step, x, last):
        tot = last.get("grad_norm")
        if tot is None or not tot > 0.0:
            return None
        share = x / tot
        if (share > self.bound) if self.high else (share < self.bound):
            self.done = True
            return [self.det._f(step, share)]
        return None
