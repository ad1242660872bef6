"""The trainer callbacks (invariants.integrations): real transformers and Lightning trainers
on CPU, tiny models built from configs, nothing downloaded.

One table per trainer feeds one shared body: a healthy run must reach its last step with
no critical finding; a run whose loss turns NaN at a known step (a weight poisoned by a
test callback, or a NaN batch) or that diverges (LR 1e3) must be stopped the trainer's way
within a step or two, with the finding on the right metric.  The HF rows include the
trainer's NaN filter (``logging_nan_inf_filter``, on by default), which logs a NaN loss as
0.0: the row asserts the logged loss is finite *and* that the callback still reports the
non-finite loss.  Import hygiene runs in fresh interpreters.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from invariants import CollapseGuard, CollapseWarning, InvalidArgumentError, SignatureConfig

HAS_HF = importlib.util.find_spec("transformers") is not None
HAS_PL = importlib.util.find_spec("lightning") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs the [hf] extra (transformers)")
needs_pl = pytest.mark.skipif(not HAS_PL, reason="needs the [lightning] extra (lightning)")


class RecordingGuard(CollapseGuard):
    """A CollapseGuard that also keeps what it was fed (for the name-mapping assertions)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fed: list[tuple[float, dict]] = []

    def update(self, step, metrics):
        self.fed.append((step, {k: float(v) for k, v in metrics.items()}))
        return super().update(step, metrics)

    def names(self) -> set[str]:
        return {k for _, m in self.fed for k in m}


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


# ------------------------------------------------------------------ import hygiene
def test_import_invariants_imports_no_trainer_library():
    proc = _run_python("""
        import sys
        import invariants, invariants.integrations
        print(sorted(m for m in ("transformers", "lightning", "pytorch_lightning", "peft")
                     if m in sys.modules))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import invariants imported {proc.stdout.strip()}"


@pytest.mark.parametrize("module, blocked, extra", [
    ("invariants.integrations.hf", ("transformers",), "hf"),
    ("invariants.integrations.lightning", ("lightning", "pytorch_lightning"), "lightning"),
], ids=["hf", "lightning"])
def test_missing_library_names_the_extra(module, blocked, extra):
    proc = _run_python(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None      # as if it were not installed
        try:
            import {module}
        except ImportError as exc:
            print(type(exc).__name__, exc)
        else:
            print("imported")
    """)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith(f"ImportError {module} needs {blocked[0]}, which is not importable"), out
    assert out.endswith(f"install it with: pip install 'stability-invariants[{extra}]'"), out


# ------------------------------------------------------------------ argument checks
def _callback_classes():
    out = []
    if HAS_HF:
        out.append(pytest.param("hf", id="hf"))
    if HAS_PL:
        out.append(pytest.param("lightning", id="lightning"))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="needs [hf] or [lightning]"))]


def _callback_class(which):
    return importlib.import_module(f"invariants.integrations.{which}").CollapseGuardCallback


@pytest.mark.parametrize("which", _callback_classes())
@pytest.mark.parametrize("kwargs, message", [
    ({"guard": "stop"}, "guard='stop': must be an invariants.CollapseGuard"),
    ({"metric_map": {"train_loss": "loss"}}, "metric_map='train_loss': keys must be numeric canonical"),
    ({"metric_map": {"sample": "text"}}, "metric_map='sample': keys must be numeric canonical"),
    ({"metric_map": {"loss": 3}}, "metric_map['loss']=3: must be the trainer's metric name"),
    ({"metric_map": ["loss"]}, "metric_map=['loss']: must be a mapping"),
], ids=["guard-not-a-guard", "map-key-unknown", "map-key-sample", "map-value-int", "map-not-mapping"])
def test_bad_arguments_name_the_argument(which, kwargs, message):
    cls = _callback_class(which)
    kwargs = {"guard": CollapseGuard(mode="stop"), **kwargs}
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        cls(kwargs.pop("guard"), **kwargs)


@pytest.mark.parametrize("which", _callback_classes())
def test_a_guard_that_already_stopped_a_run_is_refused(which):
    guard = CollapseGuard(mode="stop")
    with pytest.warns(CollapseWarning, match="non_finite"):
        guard.update(0, {"loss": math.nan})
    assert guard.should_stop
    callback = _callback_class(which)(guard)
    start = callback.on_train_begin if which == "hf" else callback.on_train_start
    with pytest.raises(InvalidArgumentError, match="already asked to stop a run"):
        start(None, None, None) if which == "hf" else start(None, None)


@needs_pl
def test_lightning_grad_norm_flag_must_be_bool():
    with pytest.raises(InvalidArgumentError, match="grad_norm='yes': must be True or False"):
        _callback_class("lightning")(CollapseGuard(), grad_norm="yes")


# ------------------------------------------------------------------ HF Trainer
LR_SPIKE_AT = 24  # after the detectors' warm-up (a blow-up in the first points is a warning)
# a finite blow-up is critical once its divergence has held `divergence_persist` points (the
# severity ladder), flagged within ~8 points of the fault: the run must last that long
_PERSIST = SignatureConfig().divergence_persist
HF_STEPS = LR_SPIKE_AT + 8 + _PERSIST + 8
BLOW_UP_STOP = (LR_SPIKE_AT + 2, LR_SPIKE_AT + 8 + _PERSIST)
BLOW_UP = {("divergence", "loss"), ("non_finite", "loss")}   # whichever the detectors see first
# id, TrainingArguments overrides, the fault (what, at step k: it acts from global step
# k + 1 on), guard mode, expected stop window (None: runs to the end), the (signature,
# metric) pairs of which one must be found (None: no critical finding).  The LR blow-up is
# visible from step k + 2 (the first update at LR 1e3 is step k + 1); the divergence rule
# needs a few points of it (its level is a rolling median).
HF_CASES = [
    ("healthy", {}, None, "stop", None, None),
    ("nan-filtered", {}, ("nan", 5), "stop", (6, 6), ("non_finite", "loss")),
    ("nan-unfiltered", {"logging_nan_inf_filter": False}, ("nan", 5), "stop", (6, 6),
     ("non_finite", "loss")),
    ("nan-between-logs", {"logging_steps": 50}, ("nan", 5), "stop", (6, 6),
     ("non_finite", "loss")),
    ("lr-1e3", {}, ("lr", LR_SPIKE_AT), "stop", BLOW_UP_STOP, BLOW_UP),
    ("nan-warn-mode", {}, ("nan", 5), "warn", None, ("non_finite", "loss")),
]


def _hf_run(tmp_path, overrides, fault, guard):
    from transformers import (GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments)
    from invariants.integrations.hf import CollapseGuardCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class Fault(TrainerCallback):  # one embedding row turns NaN, or the LR jumps to 1e3
        def on_step_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
            if fault is None or state.global_step != fault[1]:
                return
            if fault[0] == "nan":
                with torch.no_grad():
                    model.transformer.wte.weight[0].fill_(math.nan)
            else:
                lr_scheduler.base_lrs = [1e3 for _ in lr_scheduler.base_lrs]
                for group in lr_scheduler.optimizer.param_groups:
                    group["lr"] = 1e3

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                       n_positions=16))
    args = TrainingArguments(**{
        "output_dir": str(tmp_path / "hf"), "report_to": "none", "use_cpu": True, "seed": 0,
        "max_steps": HF_STEPS, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
        "lr_scheduler_type": "constant", "logging_steps": 1, "eval_strategy": "steps",
        "eval_steps": 16, "save_strategy": "no",
        "disable_tqdm": True, "dataloader_num_workers": 0, **overrides})
    callback = CollapseGuardCallback(guard)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(64, 0),
                      eval_dataset=Tokens(16, 1),
                      callbacks=[callback, Fault()])
    trainer.remove_callback(PrinterCallback)  # keep the test output quiet
    trainer.train()
    return trainer, callback


def _assert_outcome(callback, last_step, max_steps, stop, expected, caplog):
    found = {(f.signature, f.metric) for f in callback.findings}
    critical = [f for f in callback.findings if f.severity == "critical"]
    stops = [r.getMessage() for r in caplog.records if "stopping training" in r.getMessage()]
    if expected is None:
        assert not critical, f"a healthy run got critical findings: {critical}"
    else:
        expected = expected if isinstance(expected, set) else {expected}
        assert expected & found, f"expected one of {sorted(expected)} among the findings, " \
            f"got {sorted(found)}"
    if stop is None:
        assert last_step == max_steps, f"the run stopped at {last_step} of {max_steps}"
        assert callback.stopped_at is None and not stops
        return
    lo, hi = stop
    assert lo <= callback.stopped_at <= hi, \
        f"stopped at step {callback.stopped_at}, expected within [{lo}, {hi}]; {sorted(found)}"
    assert last_step == callback.stopped_at, \
        f"the trainer ran on to step {last_step} after the callback stopped it at {callback.stopped_at}"
    assert callback.stop_findings and all(f.severity == "critical" for f in callback.stop_findings)
    assert len(stops) == 1, f"expected one stop message, got {stops}"
    assert stops[0].startswith(f"CollapseGuardCallback: stopping training at step {callback.stopped_at}: "
                               f"[critical] {callback.stop_findings[0].signature} on "), stops[0]


@needs_hf
@pytest.mark.parametrize("overrides, fault, mode, stop, expected",
                         [c[1:] for c in HF_CASES], ids=[c[0] for c in HF_CASES])
def test_hf_callback(tmp_path, caplog, overrides, fault, mode, stop, expected):
    guard = RecordingGuard(mode=mode)
    with caplog.at_level(logging.WARNING, logger="invariants.integrations.hf"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, callback = _hf_run(tmp_path, overrides, fault, guard)
    _assert_outcome(callback, trainer.state.global_step, HF_STEPS, stop, expected, caplog)
    assert any(issubclass(w.category, CollapseWarning) for w in caught) == bool(callback.findings)
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    if fault and fault[0] == "nan" and overrides.get("logging_nan_inf_filter", True) \
            and overrides.get("logging_steps", 1) == 1:
        # The trainer's filter hides the NaN from the log; the callback saw it anyway.
        assert math.isfinite(dict(logged)[fault[1] + 1]), logged
    if expected is None:  # the guard got the logged values under the canonical names
        assert guard.names() == {"loss", "grad_norm", "lr", "val_loss"}, guard.names()
        assert [(s, m["loss"]) for s, m in guard.fed if "loss" in m] == logged
        # evaluations every 16 steps, and HF's evaluation at the last step
        evals = sorted({*range(16, HF_STEPS + 1, 16), HF_STEPS})
        assert [s for s, m in guard.fed if "val_loss" in m] == evals


# ------------------------------------------------------------------ Lightning Trainer
PL_STEPS = HF_STEPS  # as long as the HF run: a finite blow-up must have time to persist
assert PL_STEPS % 4 == 0, "validation runs every 4 steps (one epoch)"
# id, module options, guard options, expected stop window, expected (signature, metric).
# Batches of 64 from 256 points: 4 optimizer steps an epoch, validation after each epoch.
PL_CASES = [
    ("healthy", {}, {}, None, None),
    ("nan-batch-logged", {"nan_from": 10}, {}, (11, 11), ("non_finite", "loss")),
    ("nan-batch-not-logged", {"nan_from": 10, "log_loss": False}, {}, (11, 11),
     ("non_finite", "loss")),
    ("nan-batch-buffered", {"nan_from": 10}, {"sync_every": 16}, (11, 15),
     ("non_finite", "loss")),
    ("lr-1e3", {"lr_spike_at": LR_SPIKE_AT}, {}, BLOW_UP_STOP, BLOW_UP),
    ("nan-warn-mode", {"nan_from": 10}, {"mode": "warn"}, None, ("non_finite", "loss")),
]


def _pl_run(tmp_path, module_options, guard):
    import lightning.pytorch as L
    from invariants.integrations.lightning import CollapseGuardCallback

    class Regression(L.LightningModule):
        def __init__(self, nan_from=None, lr_spike_at=None, log_loss=True):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, 1))
            self.nan_from, self.lr_spike_at, self.log_loss = nan_from, lr_spike_at, log_loss

        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == self.lr_spike_at:   # the fault: the LR jumps to 1e3
                for group in self.optimizers().optimizer.param_groups:
                    group["lr"] = 1e3

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.nan_from is not None and self.global_step >= self.nan_from:
                x = x * math.nan                      # the fault: a NaN batch from step k
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if self.log_loss:
                self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def loader(n, seed):
        x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
        y = 0.5 * x.sum(1, keepdim=True)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    torch.manual_seed(0)
    callback = CollapseGuardCallback(guard)
    trainer = L.Trainer(max_steps=PL_STEPS, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=5,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[callback])
    trainer.fit(Regression(**module_options), loader(256, 0), loader(64, 1))
    return trainer, callback


@needs_pl
@pytest.mark.parametrize("module_options, guard_options, stop, expected",
                         [c[1:] for c in PL_CASES], ids=[c[0] for c in PL_CASES])
def test_lightning_callback(tmp_path, caplog, module_options, guard_options, stop, expected):
    guard = RecordingGuard(**{"mode": "stop", "sync_every": 1, **guard_options})
    with caplog.at_level(logging.WARNING, logger="invariants.integrations.lightning"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, callback = _pl_run(tmp_path, module_options, guard)
    _assert_outcome(callback, trainer.global_step, PL_STEPS, stop, expected, caplog)
    assert any(issubclass(w.category, CollapseWarning) for w in caught) == bool(callback.findings)
    if expected is None:
        assert guard.names() == {"loss", "grad_norm", "lr", "val_loss"}, guard.names()
        train_steps = [s for s, m in guard.fed if "loss" in m]
        assert train_steps == list(range(1, PL_STEPS + 1)), train_steps
        assert [s for s, m in guard.fed if "val_loss" in m] == list(range(4, PL_STEPS + 1, 4))
        assert all(m["lr"] == 0.05 and m["grad_norm"] > 0 for _, m in guard.fed if "lr" in m)
