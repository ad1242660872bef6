"""Logs written from the seeds' own numbers, shared by the signature, guard and scan tests."""
from __future__ import annotations

import numpy as np

# seed 002: epoch 7 within-epoch trajectory (step, loss), quoted verbatim
EPOCH7 = [(24590, 0.1273), (25540, 0.1177), (26940, 0.1207), (29140, 0.1452), (29540, 0.1464)]
# seed 002: epochs 1-6, loss at the start and end of each epoch (2,700 steps per epoch, epoch 1
# ends at step 2,700 per the best_model.pt metadata)
EPOCHS_1_6 = [(3.7607, 0.6848), (0.3366, 0.3083), (0.3616, 0.3148), (0.3175, 0.2240),
              (0.1626, 0.1548), (0.1897, 0.1590)]
MODE_COLLAPSE = "::::::::::::::::::::::::::::::::::::::::::::::::::"
TOKEN_SOUP = [
    "If If If not / / / / distance customers was was was scored",
    "30101010101010 did did meters 120] of of of of",
]
HEALTHY_SAMPLES = ["8 apples", "42", "Paris", "The capital of France is Paris.",
                   "A store with 15 apples that sells 7 has 8 left."]


def rlan_timeline() -> list[tuple[int, dict]]:
    """Seed 000 §1.1, epochs 1-61 (11-20 are not in the table and not logged).

    Ranges in the table ("71%->95%") are interpolated linearly over their epochs;
    attention sharpness 0.97 -> 0.03 over 41-50 is from §1.2.
    """
    out = []
    for e in range(1, 62):
        if 11 <= e <= 20:
            continue
        if e <= 10:
            f = (e - 1) / 9
            r = dict(accuracy=0.71 + 0.24 * f, loss=0.53 - 0.47 * f, lora_norm=0.5,
                     nan_batches=15, entropy=0.38 - 0.29 * f, attention_sharpness=0.97)
        elif e <= 30:
            r = dict(accuracy=0.95, loss=0.06, lora_norm=0.793, nan_batches=31, entropy=0.1,
                     attention_sharpness=0.97)
        elif e <= 40:
            r = dict(accuracy=0.96, loss=0.05, lora_norm=1.453, nan_batches=44, entropy=0.09,
                     attention_sharpness=0.97)
        elif e <= 50:
            f = (e - 40) / 10
            r = dict(accuracy=0.96 - 0.47 * f, loss=0.05 + 1.32 * f, lora_norm=1.714,
                     nan_batches=60, entropy=0.09 + 5.11 * f, attention_sharpness=0.97 - 0.94 * f)
        else:
            r = dict(accuracy=0.48, loss=1.35, lora_norm=1.646, nan_batches=100, entropy=5.0,
                     attention_sharpness=0.03)
        out.append((e, r))
    return out


def phase1_epoch_log() -> list[tuple[int, dict]]:
    """Seed 002: start/end loss of epochs 1-6, then the five epoch-7 points."""
    out = []
    for k, (start, end) in enumerate(EPOCHS_1_6):
        out.append((k * 2700 + 50, {"loss": start}))
        out.append(((k + 1) * 2700, {"loss": end}))
    out += [(s, {"loss": v}) for s, v in EPOCH7]
    return out


def phase1_epoch7_dense(seed: int, noise: float = 0.02, every: int = 10) -> dict:
    """Epoch 7 logged every ``every`` steps: the five quoted points joined linearly, with
    ``noise`` relative Gaussian noise (batch-to-batch), as ``{metric: (steps, values)}``."""
    rng = np.random.default_rng(seed)
    knots, vals = zip(*EPOCH7)
    steps = np.arange(knots[0], knots[-1] + 1, every, dtype=np.float64)
    loss = np.interp(steps, knots, vals) * (1.0 + noise * rng.standard_normal(len(steps)))
    return {"loss": (steps, loss)}


def healthy_run(seed: int, noise: float, n: int, every: int, irregular: bool) -> dict:
    """Smooth decaying/rising curves with ``noise`` relative noise; sparse or uneven steps.

    loss, grad_norm decay; accuracy rises; val_loss is evaluated 10-20 times and is
    still improving; lora_norm grows inside the seed's healthy 0.3-0.8 band.
    """
    rng = np.random.default_rng(seed)
    if irregular:
        steps = np.cumsum(rng.integers(1, 2 * every + 1, n)).astype(np.float64)
    else:
        steps = np.arange(n, dtype=np.float64) * every
    t = (steps - steps[0]) / max(steps[-1] - steps[0], 1.0)
    tau = rng.uniform(0.3, 1.0)
    a, c = rng.uniform(0.5, 5.0), rng.uniform(0.05, 1.0)

    def noisy(y, scale=noise):
        return y * (1.0 + scale * rng.standard_normal(len(y)))

    curve = c + a * np.exp(-t / tau)
    k = max(n // rng.integers(10, 21), 1)
    vi = np.arange(k - 1, n, k)
    return {
        "loss": (steps, noisy(curve)),
        "grad_norm": (steps, noisy(0.5 + 2.0 * np.exp(-t / tau))),
        "accuracy": (steps, np.clip(noisy(0.9 - 0.6 * np.exp(-t / tau)), 0.0, 1.0)),
        "val_loss": (steps[vi], noisy(curve[vi], noise / 4)),
        "lora_norm": (steps, 0.3 + 0.5 * (1.0 - np.exp(-t / tau))),
        "entropy": (steps, noisy(0.1 + 0.3 * np.exp(-t / tau))),
    }


def records_of(series: dict) -> list[tuple[float, dict]]:
    """``{metric: (steps, values)}`` -> records, one per distinct step, in step order."""
    by_step: dict[float, dict] = {}
    for m, (steps, values) in series.items():
        for s, v in zip(steps, values):
            by_step.setdefault(float(s), {})[m] = v if isinstance(v, str) else float(v)
    return [(s, by_step[s]) for s in sorted(by_step)]
