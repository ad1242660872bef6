"""Owns the seed-000 LoRA-norm governor (``NormGovernor``): warn/critical/kill levels, an EMA early
stop, and the clamp it enforces at ``critical``. Its invariant (H7) lives in
``_hyperlora_training``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_positive)
from invariants.fixes.frobenius import clamp_frobenius

__all__ = [
    "GOVERNOR_LEVELS",
    "GovernorDecision",
    "NormGovernor",
]

GOVERNOR_LEVELS = ("ok", "warn", "critical", "kill")


# ------------------------------------------------------------- governor (H7)
@dataclass(frozen=True)
class GovernorDecision:
    """What the governor decided for one observed norm.

    ``action`` is ``"stop"`` (kill level or EMA early stop), ``"clamp"`` (level
    critical or worse and the governor enforces the clamp) or ``"none"``.
    """

    step: int
    norm: float
    level: str
    ema: float
    early_stop: bool
    action: str

    @property
    def acts(self) -> bool:
        return self.action != "none"


class NormGovernor:
    """The LoRA-norm governor of seed 000, as a component that acts.

    Levels: ``ok`` (norm <= warn), ``warn`` (> warn), ``critical`` (> critical),
    ``kill`` (> kill or non-finite). Levels are monotone in the norm by
    construction (a sum of three step functions over ordered thresholds).
    EMA: ``ema_0 = norm_0``, ``ema_t = d·ema_{t-1} + (1−d)·norm_t``; early stop
    when ``ema_t > early_stop_ema`` (seed §3.3: 1.5).
    Actions: at ``critical`` the governor enforces ``clamp_frobenius(·, max_norm)``
    on the deltas it is given; at ``kill`` or early stop it asks to stop.

    Args:
      warn, critical, kill: thresholds, 0 < warn < critical < kill
        (seed "FIXES APPLIED": 1.0 / 1.5 / 2.0; pre-fix 2.0 / 5.0 / 10.0).
      early_stop_ema: EMA threshold (> 0) or ``None`` to disable early stop.
      ema_decay: d in [0, 1). The seed gives none; 0.5 per epoch (half-life
        one epoch) stops at epoch 41 on the seed's timeline (docs).
      max_norm: τ of the enforced clamp (> 0).
      enforce_clamp: False for a monitor-only governor.

    Raises:
      InvalidArgumentError: thresholds not finite, not > 0 or not ordered.
    """

    def __init__(self, *, warn: float = 1.0, critical: float = 1.5, kill: float = 2.0,
                 early_stop_ema: float | None = 1.5, ema_decay: float = 0.5,
                 max_norm: float = 1.0, enforce_clamp: bool = True):
        for name, value in (("warn", warn), ("critical", critical), ("kill", kill)):
            require_positive(name, value)
        if not warn < critical < kill:
            raise InvalidArgumentError(
                f"Cannot have warn={warn:g}, critical={critical:g}, kill={kill:g}: "
                "thresholds must satisfy 0 < warn < critical < kill")
        if early_stop_ema is not None:
            require_positive("early_stop_ema", early_stop_ema)
        require(isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0,
                "ema_decay", ema_decay, "must lie in [0, 1)")
        require_positive("max_norm", max_norm)
        self.warn, self.critical, self.kill = float(warn), float(critical), float(kill)
        self.early_stop_ema = None if early_stop_ema is None else float(early_stop_ema)
        self.ema_decay = float(ema_decay)
        self.max_norm = float(max_norm)
        self.enforce_clamp = bool(enforce_clamp)
        self.reset()

    @classmethod
    def monitor_only(cls) -> "NormGovernor":
        """The seed's pre-fix governor (§1.3): warn 2.0 / critical 5.0 / kill 10.0, no clamp, no EMA stop."""
        return cls(warn=2.0, critical=5.0, kill=10.0, early_stop_ema=None, enforce_clamp=False)

    def __repr__(self) -> str:
        return (f"NormGovernor(warn={self.warn:g}, critical={self.critical:g}, kill={self.kill:g}, "
                f"early_stop_ema={self.early_stop_ema}, ema_decay={self.ema_decay:g}, "
                f"max_norm={self.max_norm:g}, enforce_clamp={self.enforce_clamp})")

    def reset(self) -> None:
        self._step = 0
        self._ema: float | None = None

    def decide(self, norms: torch.Tensor | float) -> torch.Tensor:
        """Levels (0 ok, 1 warn, 2 critical, 3 kill) for a tensor of norms; same shape, int64.

        Vectorised and sync-free: use it on the hot path. Non-finite norms are ``kill``.
        """
        n = torch.as_tensor(norms).detach()
        level = (n > self.warn).long() + (n > self.critical).long() + (n > self.kill).long()
        return torch.where(torch.isfinite(n), level, torch.full_like(level, 3))

    def clamp(self, delta: torch.Tensor) -> torch.Tensor:
        """Enforce ``‖ΔW_i‖F <= max_norm`` (identity when the governor does not enforce)."""
        return clamp_frobenius(delta, self.max_norm) if self.enforce_clamp else delta

    def update(self, norm: torch.Tensor | float) -> GovernorDecision:
        """Observe one step's norm; return the decision (one host sync for a tensor)."""
        value = float(norm)
        level = int(self.decide(torch.tensor(value, dtype=torch.float64)))
        if math.isfinite(value):
            self._ema = value if self._ema is None else \
                self.ema_decay * self._ema + (1.0 - self.ema_decay) * value
        ema = math.nan if self._ema is None else self._ema
        early = self.early_stop_ema is not None and (ema > self.early_stop_ema
                                                     or not math.isfinite(value))
        if level == 3 or early:
            action = "stop"
        elif level >= 2 and self.enforce_clamp:
            action = "clamp"
        else:
            action = "none"
        decision = GovernorDecision(self._step, value, GOVERNOR_LEVELS[level], ema, early, action)
        self._step += 1
        return decision

    def replay(self, norms: Iterable[float]) -> list[GovernorDecision]:
        """Reset, then ``update`` on every norm in order (offline, e.g. a logged run)."""
        self.reset()
        return [self.update(n) for n in norms]
