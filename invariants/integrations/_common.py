"""Owns what the trainer callbacks share: checking their arguments, mapping a trainer's
metric names to the guard's canonical ones, feeding a ``CollapseGuard`` and deciding
(once) that a run must stop, and accumulating the raw training loss between feeds
without a host sync.

Nothing here imports a trainer library; ``hf.py`` and ``lightning.py`` do.
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Mapping, Sequence

import torch

from invariants._errors import InvalidArgumentError
from invariants._validate import require
from invariants.signatures.config import CANONICAL_METRICS
from invariants.signatures.findings import Finding
from invariants.signatures.guard import CollapseGuard

__all__: list[str] = []  # private: hf.py and lightning.py build on it

_RANK = {"warning": 0, "critical": 1}


def import_extra(module: str, extra: str, owner: str) -> Any:
    """Import ``module`` or raise one ImportError saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{owner} needs {module.split('.')[0]}, which is not importable ({exc}); install "
            f"it with: pip install 'stability-invariants[{extra}]'") from None


class MetricNames:
    """``{canonical: (trainer names, first found wins)}``, with the user's overrides.

    A user's ``metric_map={"loss": "train/my_loss"}`` replaces every default name
    of ``loss``; a canonical name the user maps to ``None`` is not fed at all.
    """

    def __init__(self, defaults: Mapping[str, Sequence[str]],
                 metric_map: Mapping[str, str | None] | None):
        require(metric_map is None or isinstance(metric_map, Mapping), "metric_map", metric_map,
                "must be a mapping {canonical_name: trainer_name} or None")
        names = {canon: tuple(theirs) for canon, theirs in defaults.items()}
        for canon, theirs in (metric_map or {}).items():
            require(canon in CANONICAL_METRICS and canon != "sample", "metric_map", canon,
                    f"keys must be numeric canonical metric names: "
                    f"{', '.join(m for m in CANONICAL_METRICS if m != 'sample')}")
            require(theirs is None or (isinstance(theirs, str) and theirs), f"metric_map[{canon!r}]",
                    theirs, "must be the trainer's metric name (a non-empty str) or None")
            names[canon] = () if theirs is None else (theirs,)
        self.names = {canon: theirs for canon, theirs in names.items() if theirs}

    def pick(self, logged: Mapping[str, Any], canon: Sequence[str]) -> dict[str, Any]:
        """The values of ``logged`` for the canonical names ``canon`` (those present)."""
        out = {}
        for c in canon:
            for theirs in self.names.get(c, ()):
                if theirs in logged:
                    out[c] = logged[theirs]
                    break
        return out


class RawLoss:
    """Sum, count and a non-finite flag of the raw per-batch losses since the last read.

    ``add`` is a few tensor ops on the loss's device and never synchronises with the host;
    ``flagged``/``mean`` do (call them where the trainer synchronises anyway).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None
        self.count = 0

    def add(self, loss: Any) -> None:
        if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or loss.numel() == 0:
            return
        loss = loss.detach()
        value = loss.float().mean()
        bad = ~torch.isfinite(loss).all()
        if self._sum is None:
            self._sum, self._bad = value, bad
        else:
            self._sum = self._sum + value
            self._bad = self._bad | bad
        self.count += 1

    def flagged(self) -> bool:
        """Whether some raw loss since the last reset was NaN or ±Inf (one host sync)."""
        return self._bad is not None and bool(self._bad)

    def mean(self) -> float:
        return math.nan if self._sum is None else float(self._sum) / self.count


def loss_of(output: Any) -> Any:
    """The loss a model (HF ``ModelOutput``/dict) or a training step (tensor/dict) returned."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    return getattr(output, "loss", None)


class GuardLink:
    """One callback's hold on a guard: feeds it, records findings, decides to stop once."""

    def __init__(self, guard: Any, owner: str, logger: logging.Logger):
        require(isinstance(guard, CollapseGuard), "guard", guard,
                "must be an invariants.CollapseGuard (e.g. CollapseGuard(mode='stop'))")
        self.guard = guard
        self.owner = owner
        self.logger = logger
        self.stopped_at: int | float | None = None
        self.stop_findings: list[Finding] = []

    def start(self) -> None:
        """Refuse a guard that already stopped another run (its findings would stop this one)."""
        if self.guard.should_stop:
            raise InvalidArgumentError(
                f"guard={self.guard!r:.60}: it already asked to stop a run "
                f"({len(self.guard.findings)} findings); give each trainer a fresh CollapseGuard")

    def feed(self, step: int | float, metrics: Mapping[str, Any]) -> bool:
        """Feed one record (tensor values are buffered by the guard, not read here);
        True when the run must stop now (at most once per run)."""
        if not metrics:
            return False
        return self._decide(step, self.guard.update(step, metrics))

    def flush(self, step: int | float) -> bool:
        """Read what the guard buffered (where the trainer synchronises anyway)."""
        return self._decide(step, self.guard.flush())

    def _decide(self, step: int | float, new: list[Finding]) -> bool:
        if self.stopped_at is not None or not self.guard.should_stop:
            return False
        self.stopped_at = step
        rank = _RANK[self.guard.stop_on]
        self.stop_findings = [f for f in new if _RANK[f.severity] >= rank] or \
            [f for f in self.guard.findings if _RANK[f.severity] >= rank]
        self.logger.warning(
            "%s: stopping training at step %s: %s", self.owner, step,
            "; ".join(f"[{f.severity}] {f.signature} on {f.metric} at step {f.step}: {f.message}"
                      for f in self.stop_findings))
        return True
