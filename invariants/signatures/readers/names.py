"""Owns the metric names real tools write and how they map to the canonical names.

``resolve(key)`` gives ``(canonical, rank)`` for a column/tag/key name, or ``None``:
rank 0 is the canonical name itself, then the explicit aliases in the order of
``ALIASES`` (HF Trainer, Lightning, W&B), then the generic rules (``train/X``,
``train_X`` -> ``X``; ``eval/X``, ``eval_X``, ``val/X``, ``validation/X`` ->
``val_X``; Lightning's ``lr-<Optimizer>`` and ``<name>_step``).  When a log has
several names for one canonical metric the lowest rank wins and the others are
listed as ignored (e.g. Lightning's ``train_loss_step`` beats ``train_loss_epoch``).

W&B chart exports name columns ``<run> - <metric>`` and add ``<metric>__MIN`` /
``__MAX`` band columns: ``split_run`` takes the run prefix off, band columns are
never metrics.
"""
from __future__ import annotations

import re

from invariants.signatures.config import CANONICAL_METRICS

# step columns in order of preference when the first record has several
STEP_KEYS = ("step", "global_step", "train/global_step", "trainer/global_step", "Step", "_step",
             "epoch")

# canonical -> names real tools write, best first (HF Trainer, Lightning, W&B exports)
ALIASES: dict[str, tuple[str, ...]] = {
    "loss": ("train/loss", "train_loss", "train_loss_step", "train/loss_step", "training_loss",
             "train_loss_epoch", "train/loss_epoch"),
    "val_loss": ("eval_loss", "eval/loss", "val/loss", "valid_loss", "validation_loss",
                 "validation/loss", "val_loss_epoch", "test_loss"),
    "accuracy": ("train_acc", "train/accuracy", "train/acc", "train_accuracy", "acc",
                 "train_acc_step", "train_acc_epoch"),
    "val_accuracy": ("val_acc", "eval_accuracy", "eval/accuracy", "val/accuracy", "val/acc",
                     "eval_acc", "valid_acc", "validation_accuracy", "val_acc_epoch"),
    "grad_norm": ("train/grad_norm", "grad_2.0_norm_total", "grad_norm_total", "gradient_norm"),
    "lr": ("learning_rate", "train/learning_rate", "lr-Adam", "lr-AdamW", "lr-SGD",
           "train/lr", "trainer/learning_rate"),
    "loss_scale": ("train/loss_scale", "scaler/scale", "grad_scale"),
    "entropy": ("train/entropy", "policy_entropy"),
}
_GENERIC = [  # (pattern, template); tried after the explicit aliases, in this order
    (re.compile(r"^(?:train|training)[/_](?P<m>.+?)(?:_step)?$"), "{m}"),
    (re.compile(r"^(?:eval|val|valid|validation)[/_](?P<m>.+?)(?:_epoch)?$"), "val_{m}"),
    (re.compile(r"^lr-[A-Za-z0-9_.]+(?:-\d+)?(?:/pg1)?$"), "lr"),  # Lightning LearningRateMonitor
    (re.compile(r"^(?P<m>.+?)_(?:step|epoch)$"), "{m}"),
]
_EXPLICIT = {alias: (canon, 1 + i) for canon, names in ALIASES.items()
             for i, alias in enumerate(names)}
_GENERIC_RANK = 100
BAND_SUFFIXES = ("__MIN", "__MAX")


def split_run(key: str) -> tuple[str, str]:
    """``"run-7 - train/loss"`` -> ``("run-7", "train/loss")``; other keys -> ``("", key)``."""
    run, sep, metric = key.rpartition(" - ")
    return (run, metric) if sep and run and metric else ("", key)


def is_band(key: str) -> bool:
    return key.endswith(BAND_SUFFIXES)


def resolve(key: str) -> tuple[str, int] | None:
    """The canonical metric a column named ``key`` holds, with its rank (lower wins)."""
    if key in CANONICAL_METRICS:
        return key, 0
    if is_band(key):
        return None
    hit = _EXPLICIT.get(key)
    if hit is not None:
        return hit
    for k, (pattern, template) in enumerate(_GENERIC):
        m = pattern.match(key)
        if m is None:
            continue
        name = template.format(**m.groupdict())
        name = {"val_acc": "val_accuracy", "acc": "accuracy", "learning_rate": "lr",
                "val_learning_rate": "lr"}.get(name, name)
        if name in CANONICAL_METRICS:
            return name, _GENERIC_RANK + k
    return None
