"""Owns ``CollapseGuardCallback`` for the Lightning ``Trainer`` (extra ``[lightning]``).

    from invariants import CollapseGuard
    from invariants.integrations.lightning import CollapseGuardCallback

    callback = CollapseGuardCallback(CollapseGuard(mode="stop"))
    lightning.pytorch.Trainer(..., callbacks=[callback]).fit(model, train_loader, val_loader)
    callback.stopped_at, callback.findings

What the guard sees, under its canonical names, at ``trainer.global_step``:

- after every training batch (``on_train_batch_end``): ``loss``, the loss the
  ``training_step`` returned (raw: a NaN is seen even when nothing is logged), else a
  logged ``train_loss``; ``grad_norm``, a logged one (``grad_norm``, Lightning's
  ``grad_2.0_norm_total``) or else the total 2-norm of the gradients the callback takes
  in ``on_before_optimizer_step`` (``grad_norm=False`` turns that off); ``lr``, a logged
  ``lr`` or else the first optimizer's first param group; ``accuracy`` from a logged
  ``train_acc``/``train_accuracy``/``acc``/``accuracy``;
- after every validation (``on_validation_end``, not the sanity check): ``val_loss`` and
  ``val_accuracy`` from ``trainer.callback_metrics`` (``val_loss``, ``val_acc``, ...).

Values stay tensors on their device: the guard buffers them and reads them to the host
every ``guard.sync_every`` updates; the callback also asks the guard to read what it holds
where Lightning logs (every ``trainer.log_every_n_steps`` steps), at the end of each
epoch and validation, and at the end of training.  So a finding stops the run at most
``min(guard.sync_every, log_every_n_steps) - 1`` steps after its step
(``CollapseGuard(..., sync_every=1)`` stops at the step itself, with one host read a step).

**Stopping.**  When the guard asks to stop (``mode="stop"``), the callback sets
``trainer.should_stop = True`` (Lightning ends after the current batch, honouring
``min_steps``/``min_epochs``), records ``stopped_at`` and ``stop_findings`` and logs one
warning.  ``mode="warn"`` only warns; ``mode="raise"`` raises ``CollapseDetected`` out of
``trainer.fit``.  Use one guard per run.  Each rank decides alone.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from invariants._validate import require
from invariants.integrations._common import GuardLink, MetricNames, import_extra, loss_of

try:  # the `lightning` package (the extra); `pytorch_lightning` alone works too
    _pl = import_extra("lightning.pytorch", "lightning", "invariants.integrations.lightning")
except ImportError:
    try:
        import pytorch_lightning as _pl
    except ImportError:
        _pl = import_extra("lightning.pytorch", "lightning", "invariants.integrations.lightning")
Callback = _pl.Callback

__all__ = ["CollapseGuardCallback", "LIGHTNING_METRIC_NAMES"]

logger = logging.getLogger(__name__)

LIGHTNING_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "loss": ("train_loss", "train/loss", "loss", "train_loss_step"),
    "grad_norm": ("grad_norm", "grad_2.0_norm_total", "train/grad_norm"),
    "lr": ("lr", "learning_rate"),
    "accuracy": ("train_acc", "train_accuracy", "train/acc", "acc", "accuracy"),
    "val_loss": ("val_loss", "val/loss", "valid_loss", "validation_loss", "val_loss_epoch"),
    "val_accuracy": ("val_acc", "val_accuracy", "val/acc", "valid_acc", "val_acc_epoch"),
}
"""canonical name -> the names ``self.log`` commonly uses for it (first one present wins)."""

_TRAIN = ("loss", "grad_norm", "lr", "accuracy")
_VAL = ("val_loss", "val_accuracy")


class CollapseGuardCallback(Callback):
    """Feed a ``CollapseGuard`` from a Lightning ``Trainer`` and stop the run on collapse.

    Args:
      guard: the ``CollapseGuard`` (``mode="stop"`` to stop the trainer).
      metric_map: ``{canonical_name: logged_name}`` overriding ``LIGHTNING_METRIC_NAMES``;
        a value ``None`` stops feeding that metric.
      grad_norm: take the gradients' total 2-norm before each optimizer step when no grad
        norm is logged (one fused norm over the gradients, no host read).

    Attributes:
      findings: every finding of the guard so far.
      stopped_at: the global step at which the callback stopped the run, or ``None``.
      stop_findings: the findings that made it stop.
    """

    def __init__(self, guard: Any, *, metric_map: Mapping[str, str | None] | None = None,
                 grad_norm: bool = True):
        self._link = GuardLink(guard, "CollapseGuardCallback", logger)
        self._names = MetricNames(LIGHTNING_METRIC_NAMES, metric_map)
        require(isinstance(grad_norm, bool), "grad_norm", grad_norm, "must be True or False")
        self._grad_norm = grad_norm
        self._raw_loss = "loss" not in (metric_map or {})   # the user named their loss
        self._last_grad_norm: torch.Tensor | None = None

    guard = property(lambda self: self._link.guard)
    findings = property(lambda self: self._link.guard.findings)
    stopped_at = property(lambda self: self._link.stopped_at)
    stop_findings = property(lambda self: self._link.stop_findings)

    # ------------------------------------------------------------------ trainer hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._link.start()
        self._last_grad_norm = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._grad_norm or "grad_norm" not in self._names.names \
                or self._names.pick(trainer.callback_metrics, ("grad_norm",)):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self._last_grad_norm = torch.nn.utils.get_total_norm(grads, 2.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        metrics = self._names.pick(logged, _TRAIN)
        loss = loss_of(outputs) if self._raw_loss else None
        if isinstance(loss, torch.Tensor) and "loss" in self._names.names:
            metrics["loss"] = loss.detach()
        if self._last_grad_norm is not None:
            metrics.setdefault("grad_norm", self._last_grad_norm)
            self._last_grad_norm = None
        if "lr" in self._names.names and "lr" not in metrics and trainer.optimizers:
            metrics["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        step = trainer.global_step
        stop = self._link.feed(step, metrics)
        every = trainer.log_every_n_steps
        if not stop and every and step % every == 0:
            stop = self._link.flush(step)
        if stop:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = self._names.pick(trainer.callback_metrics, _VAL)
        if self._link.feed(trainer.global_step, metrics) or self._flush(trainer):
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

    # ------------------------------------------------------------------ internals
    def _flush(self, trainer) -> bool:
        if self._link.flush(trainer.global_step):
            trainer.should_stop = True
            return True
        return False

    def __repr__(self) -> str:
        return (f"CollapseGuardCallback(guard=CollapseGuard(mode={self.guard.mode!r}), "
                f"findings={len(self.findings)}, stopped_at={self.stopped_at})")
