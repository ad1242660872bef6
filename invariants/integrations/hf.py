"""Owns ``CollapseGuardCallback`` for the Hugging Face ``transformers.Trainer`` (extra ``[hf]``).

    from invariants import CollapseGuard
    from invariants.integrations.hf import CollapseGuardCallback

    callback = CollapseGuardCallback(CollapseGuard(mode="stop"))
    trainer = Trainer(model, args, ..., callbacks=[callback])
    trainer.train()
    callback.stopped_at, callback.findings

What the guard sees, under its canonical names: every record the trainer logs (``on_log``):
``loss``, ``grad_norm``, ``learning_rate`` -> ``lr``, ``eval_loss`` -> ``val_loss``,
``eval_accuracy`` -> ``val_accuracy`` (TRL's ``mean_token_accuracy`` ->
``accuracy``), at ``state.global_step``.  So it sees what ``invariants scan`` would read
from the same run's log, every ``logging_steps``.

**The NaN filter.**  With ``logging_nan_inf_filter=True`` (the default) transformers 5.x
replaces a NaN/Inf micro-batch loss by the mean of the losses logged since the last log
(``Trainer._inner_training_loop``: ``tr_loss += tr_loss / (1 + global_step -
_globalstep_last_logged)``), which is 0.0 once every loss since the last log was NaN: the
logged ``loss`` of a collapsed run is finite, often exactly 0.  The callback therefore also
reads the raw loss: a forward hook on the model takes ``output.loss`` of every training
forward (``module.training``; evaluation is left alone) and adds it to a device-side sum and
non-finite flag, without a host sync.  When the flag is set, the logged ``loss`` is replaced
by the raw mean (NaN or Inf) before the guard sees it.  With the filter on, the trainer
already synchronises on every micro-batch loss (``torch.isnan(tr_loss_step)``), so the flag
is also read at every ``on_step_end`` and a non-finite loss stops the run at the step it
appears, not at the next log; with the filter off no per-step read is added (the logged
loss is then NaN itself).  A custom ``compute_loss`` whose model output carries no
``loss`` is seen through the logged ``loss`` and ``grad_norm`` only (a NaN loss makes the
gradient norm NaN, which the guard reports).

**Stopping.**  When the guard asks to stop (``mode="stop"``: a finding at or above its
``stop_on``), the callback sets ``control.should_training_stop = True`` (the trainer ends
after this step's log/save), records ``stopped_at`` (the global step) and
``stop_findings``, and logs one warning naming them.  ``mode="warn"`` only warns;
``mode="raise"`` raises ``CollapseDetected`` out of ``trainer.train()``.  Use one guard per
run.  Each rank decides alone: under DDP, ranks may stop at different steps.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from invariants.integrations._common import GuardLink, MetricNames, RawLoss, import_extra, loss_of

_transformers = import_extra("transformers", "hf", "invariants.integrations.hf")
TrainerCallback = _transformers.TrainerCallback

__all__ = ["CollapseGuardCallback", "HF_METRIC_NAMES"]

logger = logging.getLogger(__name__)

HF_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "grad_norm": ("grad_norm",),
    "lr": ("learning_rate",),
    "accuracy": ("mean_token_accuracy",),  # TRL's SFTTrainer
    "val_loss": ("eval_loss",),
    "val_accuracy": ("eval_accuracy", "eval_mean_token_accuracy"),
}
"""canonical name -> the names ``Trainer.log`` uses for it (first one present wins)."""


class CollapseGuardCallback(TrainerCallback):
    """Feed a ``CollapseGuard`` from a ``transformers.Trainer`` and stop the run on collapse.

    Args:
      guard: the ``CollapseGuard`` (``mode="stop"`` to stop the trainer).
      metric_map: ``{canonical_name: logged_name}`` overriding ``HF_METRIC_NAMES`` (e.g.
        ``{"val_accuracy": "eval_f1"}``); a value ``None`` stops feeding that metric.

    Attributes:
      findings: every finding of the guard so far.
      stopped_at: the global step at which the callback stopped the run, or ``None``.
      stop_findings: the findings that made it stop.
    """

    def __init__(self, guard: Any, *, metric_map: Mapping[str, str | None] | None = None):
        self._link = GuardLink(guard, "CollapseGuardCallback", logger)
        self._names = MetricNames(HF_METRIC_NAMES, metric_map)
        self._raw = RawLoss()        # raw training losses since the last log
        self._hook = None
        self._per_step = False

    guard = property(lambda self: self._link.guard)
    findings = property(lambda self: self._link.guard.findings)
    stopped_at = property(lambda self: self._link.stopped_at)
    stop_findings = property(lambda self: self._link.stop_findings)

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._link.start()
        self._raw.reset()
        self._per_step = bool(getattr(args, "logging_nan_inf_filter", False))
        self._remove_hook()
        if model is not None:
            self._hook = model.register_forward_hook(self._on_forward)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()
        self._link.flush(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # Only with the NaN filter on: the trainer has just synchronised on this loss anyway.
        if self._per_step and self._raw.flagged():
            self._feed(state.global_step, {"loss": self._raw.mean()}, control)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        metrics = self._names.pick(logs, tuple(self._names.names))
        if "loss" in metrics:  # a training record: the raw losses since the last one
            if self._raw.flagged():
                metrics["loss"] = self._raw.mean()
            self._raw.reset()
        self._feed(state.global_step, metrics, control)
        return control

    # ------------------------------------------------------------------ internals
    def _on_forward(self, module, args, output) -> None:
        if module.training:
            self._raw.add(loss_of(output))

    def _feed(self, step: int, metrics: dict, control) -> None:
        if self._link.feed(step, metrics):
            control.should_training_stop = True

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __repr__(self) -> str:
        return (f"CollapseGuardCallback(guard=CollapseGuard(mode={self.guard.mode!r}), "
                f"findings={len(self.findings)}, stopped_at={self.stopped_at})")
