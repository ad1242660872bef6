"""Owns the seed-000 LoRA-norm governor (``NormGovernor``): warn/critical/kill levels, an EMA early
stop, and the clamp it enforces at ``critical``; and ``GovernorDecision``, which a tensor norm
leaves pending (no host-device sync per step). Its invariant (H7) lives in
``_hyperlora_training``.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_positive, require_scalar_tensor,
                                  require_sync_every)
from invariants.fixes.frobenius import clamp_frobenius
from invariants.signatures.guard import DEFAULT_SYNC_EVERY

__all__ = [
    "GOVERNOR_LEVELS",
    "GovernorDecision",
    "NormGovernor",
]

GOVERNOR_LEVELS = ("ok", "warn", "critical", "kill")


# ------------------------------------------------------------- governor (H7)
_FIELDS = ("norm", "level", "ema", "early_stop", "action")


class GovernorDecision:
    """What the governor decided for one observed norm (read-only).

    ``action`` is ``"stop"`` (kill level or EMA early stop), ``"clamp"`` (level
    critical or worse and the governor enforces the clamp) or ``"none"``.

    A decision returned for a *tensor* norm is pending: ``step`` is known at once, the
    other fields are computed on the host the first time one of them is read (one host
    read for every decision pending at the governor, in step order) or when the governor
    syncs (every ``sync_every`` tensor updates, or ``NormGovernor.sync()``).
    """

    __slots__ = ("step", "_values", "_owner")

    def __init__(self, step: int, norm: float, level: str, ema: float, early_stop: bool,
                 action: str):
        self.step = step
        self._values: tuple | None = (norm, level, ema, early_stop, action)
        self._owner: NormGovernor | None = None

    @classmethod
    def _pending(cls, step: int, owner: "NormGovernor") -> "GovernorDecision":
        d = cls.__new__(cls)
        d.step, d._values, d._owner = step, None, owner
        return d

    def _get(self) -> tuple:
        if self._values is None:
            self._owner.sync()  # fills self._values (and those of every earlier pending one)
        return self._values

    norm = property(lambda self: self._get()[0])
    level = property(lambda self: self._get()[1])
    ema = property(lambda self: self._get()[2])
    early_stop = property(lambda self: self._get()[3])
    action = property(lambda self: self._get()[4])

    @property
    def acts(self) -> bool:
        return self.action != "none"

    def _key(self) -> tuple:
        return (self.step, *self._get())

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return "GovernorDecision(" + ", ".join(
            f"{n}={v!r}" for n, v in zip(("step",) + _FIELDS, self._key())) + ")"


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
      sync_every: how many tensor norms ``update`` may hold before it reads them to the
        host at once (the same default as ``CollapseGuard``, see docs/signatures.md).

    No host-device sync per step: ``decide`` and ``clamp`` never read a value, and
    ``update(tensor)`` keeps a device-side copy of the norm and returns a pending
    ``GovernorDecision``. The norms are read (one transfer) when a pending decision is
    read, every ``sync_every`` tensor updates, on ``sync()``, or before a Python-number
    update; decisions are then computed on the host in step order with the same float64
    arithmetic, so they are bit-identical to ``update(float(norm))``.

    Raises:
      InvalidArgumentError: thresholds not finite, not > 0 or not ordered.
    """

    def __init__(self, *, warn: float = 1.0, critical: float = 1.5, kill: float = 2.0,
                 early_stop_ema: float | None = 1.5, ema_decay: float = 0.5,
                 max_norm: float = 1.0, enforce_clamp: bool = True,
                 sync_every: int = DEFAULT_SYNC_EVERY):
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
        require_sync_every(sync_every)
        self.sync_every = sync_every
        self._pending: list[GovernorDecision] = []
        self._pending_norms: list[torch.Tensor] = []
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
        """Forget the EMA and the step count (pending decisions are resolved first)."""
        self.sync()
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
        """Observe one step's norm; return the decision.

        A Python number is decided at once. A one-element real tensor is not read: the
        decision is pending until one of its fields is read (see the class docstring).

        Raises:
          InvalidArgumentError: a complex, bool, meta or multi-element tensor.
        """
        if isinstance(norm, torch.Tensor):
            require_scalar_tensor("norm", norm)
            if self._pending_norms and norm.device != self._pending_norms[0].device:
                self.sync()  # one device per batch of pending norms
            # a float64 copy on the norm's device: exact, and immune to later in-place edits
            self._pending_norms.append(norm.detach().reshape(()).to(torch.float64, copy=True))
            decision = GovernorDecision._pending(self._step, self)
            self._pending.append(decision)
            self._step += 1
            if len(self._pending) >= self.sync_every:
                self.sync()
            return decision
        self.sync()
        values = self._observe(float(norm))
        decision = GovernorDecision(self._step, *values)
        self._step += 1
        return decision

    def sync(self) -> None:
        """Read every pending tensor norm (one host transfer) and decide them in step order."""
        if not self._pending:
            return
        pending, norms = self._pending, self._pending_norms
        self._pending, self._pending_norms = [], []
        for decision, value in zip(pending, torch.stack(norms).tolist()):
            decision._values, decision._owner = self._observe(value), None

    def _observe(self, value: float) -> tuple:
        """The host-side decision for one norm (advances the EMA): the float64 arithmetic
        every decision goes through, whatever the input type."""
        # the same comparisons as ``decide`` on a float64 tensor, in Python (no tensor read)
        level = ((value > self.warn) + (value > self.critical) + (value > self.kill)
                 if math.isfinite(value) else 3)
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
        return value, GOVERNOR_LEVELS[level], ema, early, action

    def replay(self, norms: Iterable[float]) -> list[GovernorDecision]:
        """Reset, then ``update`` on every norm in order (offline, e.g. a logged run)."""
        self.reset()
        return [self.update(n) for n in norms]
