"""``invariants scan`` on the layouts real tools write, without ``--map``: HF Trainer's
``output_dir`` (``trainer_state.json`` ``log_history``, ``checkpoint-N/``, ``runs/``
TensorBoard dirs), Lightning's CSVLogger ``metrics.csv``, W&B CSV exports, and a parent
directory holding several runs (one report each, the worst exit code).

Each layout is tested twice: from a literal fixture written the way the tool writes it
(so the parsing rules are tested without the libraries), and, where ``transformers`` /
``lightning`` are importable, from files the real library writes in the test (tiny
models, CPU, a few steps)."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from invariants._cli import main
from invariants.signatures.readers import find_runs, names, read_log, read_runs


def _run(capsys, *argv):
    code = main(["scan", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# -- the name table ------------------------------------------------------------------------
@pytest.mark.parametrize("key, canonical", [
    ("loss", "loss"), ("train/loss", "loss"), ("train_loss", "loss"), ("train_loss_step", "loss"),
    ("train/grad_norm", "grad_norm"), ("grad_norm", "grad_norm"),
    ("train/learning_rate", "lr"), ("learning_rate", "lr"), ("lr-Adam", "lr"),
    ("lr-AdamW/pg1", "lr"), ("lr-SGD-1", "lr"), ("eval/loss", "val_loss"),
    ("eval_loss", "val_loss"), ("val_loss", "val_loss"), ("val_acc", "val_accuracy"),
    ("train_acc", "accuracy"), ("eval/accuracy", "val_accuracy"), ("val/loss", "val_loss"),
    ("train/entropy", "entropy"), ("train/loss_scale", "loss_scale"),
    ("eval/runtime", None), ("train/epoch", None), ("train_runtime", None), ("epoch", None),
    ("train/loss__MIN", None), ("hp_metric", None), ("eval_samples_per_second", None),
])
def test_known_names(key, canonical):
    hit = names.resolve(key)
    assert (hit[0] if hit else None) == canonical


def test_a_better_name_wins_and_the_other_is_listed(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_loss_epoch,train_loss_step\n0,0,,2.0\n0,1,,1.0\n0,1,1.5,\n")
    data = read_log(path)
    assert list(data.columns["loss"][2]) == [2.0, 1.0]
    assert "train_loss_epoch" in data.ignored and "read loss <- train_loss_step" in data.notes


# -- literal fixtures, as the tools write them ----------------------------------------------
HF_STATE = {  # transformers 4.x/5.x TrainerState.save_to_json: sort_keys, indent=2
    "best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
    "epoch": 2.0, "eval_steps": 2, "global_step": 6, "is_hyper_param_search": False,
    "is_local_process_zero": True, "is_world_process_zero": True,
    "log_history": [
        {"epoch": 0.33, "grad_norm": 1.9, "learning_rate": 5e-05, "loss": 2.3, "step": 1},
        {"epoch": 0.67, "grad_norm": 1.7, "learning_rate": 4.2e-05, "loss": 2.1, "step": 2},
        {"epoch": 0.67, "eval_loss": 2.2, "eval_runtime": 0.01, "eval_samples_per_second": 900.0,
         "eval_steps_per_second": 100.0, "step": 2},
        {"epoch": 1.0, "grad_norm": 1.6, "learning_rate": 3.3e-05, "loss": 1.9, "step": 3},
        {"epoch": 1.33, "grad_norm": 1.5, "learning_rate": 2.5e-05, "loss": 1.8, "step": 4},
        {"epoch": 1.33, "eval_loss": 1.95, "eval_runtime": 0.01, "eval_samples_per_second": 900.0,
         "eval_steps_per_second": 100.0, "step": 4},
        {"epoch": 1.67, "grad_norm": 1.4, "learning_rate": 1.7e-05, "loss": float("nan"),
         "step": 5},
        {"epoch": 2.0, "step": 6, "total_flos": 10.0, "train_loss": 2.0, "train_runtime": 0.5,
         "train_samples_per_second": 96.0, "train_steps_per_second": 12.0},
    ],
    "logging_steps": 1, "max_steps": 6, "num_input_tokens_seen": 0, "num_train_epochs": 2,
    "save_steps": 3, "stateful_callbacks": {}, "total_flos": 10.0, "train_batch_size": 8,
    "trial_name": None, "trial_params": None,
}
LIGHTNING_CSV = textwrap.dedent("""\
    epoch,lr-Adam,step,train_acc,train_loss,val_acc,val_loss
    ,0.001,0,,,,
    0,,9,0.41,2.30,,
    0,,19,0.55,1.90,,
    0,,19,,,0.52,1.95
    1,,29,0.62,1.60,,
    ,0.0005,30,,,,
    1,,39,0.70,nan,,
    1,,39,,,0.31,5.80
    """)
WANDB_CHART = textwrap.dedent('''\
    "Step","brisk-sun-7 - train/loss","brisk-sun-7 - train/loss__MIN","brisk-sun-7 - train/loss__MAX"
    "0","2.31","2.30","2.32"
    "10","1.80","1.79","1.81"
    "20","","",""
    "30","1.20","1.19","1.21"
    ''')
WANDB_TWO_RUNS = textwrap.dedent('''\
    "Step","run-a - train/loss","run-a - train/loss__MIN","run-a - train/loss__MAX","run-b - train/loss","run-b - train/loss__MIN","run-b - train/loss__MAX"
    "0","2.0","2.0","2.0","2.0","2.0","2.0"
    "10","1.5","1.5","1.5","1.6","1.6","1.6"
    "20","1.2","1.2","1.2","NaN","NaN","NaN"
    ''')
WANDB_HISTORY = textwrap.dedent("""\
    _step,_runtime,_timestamp,train/loss,train/grad_norm,train/learning_rate,train/global_step,eval/loss
    0,1.2,1700000000.1,2.3,1.9,5e-05,1,
    1,1.4,1700000000.3,2.1,1.7,4e-05,2,
    2,1.5,1700000000.4,,,,2,2.2
    3,1.7,1700000000.6,1.9,1.6,3e-05,3,
    """)


def _write_hf_output_dir(root):
    (root / "checkpoint-3").mkdir(parents=True)
    (root / "checkpoint-6").mkdir()
    early = dict(HF_STATE, log_history=HF_STATE["log_history"][:4], global_step=3)
    (root / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(early, indent=2,
                                                                          sort_keys=True))
    (root / "checkpoint-6" / "trainer_state.json").write_text(
        json.dumps(HF_STATE, indent=2, sort_keys=True).replace("NaN", "NaN"))
    (root / "config.json").write_text('{"model_type": "tiny"}')
    return root


def test_hf_trainer_state(tmp_path, capsys):
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(HF_STATE, indent=2, sort_keys=True))
    data = read_log(path)
    assert data.format == "trainer_state" and data.step_key == "step" and data.records == 7
    assert sorted(data.columns) == ["grad_norm", "loss", "lr", "val_loss"]
    assert list(data.columns["val_loss"][1]) == [2.0, 4.0]  # eval entries: own records
    assert "train_loss" not in data.ignored, "the closing summary entry is not a logged step"
    code, out, _ = _run(capsys, path, "--json")
    assert code == 1 and ("non_finite", 5) in [(f["signature"], f["step"])
                                                for f in json.loads(out)["findings"]]


def test_hf_output_dir_reads_the_newest_checkpoint(tmp_path, capsys):
    root = _write_hf_output_dir(tmp_path / "out")
    assert find_runs(str(root)) == [(str(root / "checkpoint-6" / "trainer_state.json"),
                                     "trainer_state")]
    code, out, _ = _run(capsys, root, "--json")
    assert code == 1 and json.loads(out)["verdict"] == "collapse"


def test_lightning_csv_logger(tmp_path, capsys):
    path = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text(LIGHTNING_CSV)
    data = read_log(path)
    assert data.step_key == "step"
    assert sorted(data.columns) == ["accuracy", "loss", "lr", "val_accuracy", "val_loss"]
    assert list(data.columns["lr"][1]) == [0.0, 30.0]  # rows carry only some metrics
    assert list(data.columns["val_loss"][1]) == [19.0, 39.0]
    code, out, _ = _run(capsys, tmp_path)
    assert code == 1 and "val_accuracy" in out


@pytest.mark.parametrize("text, steps, loss", [
    (WANDB_CHART, [0, 10, 30], [2.31, 1.80, 1.20]),
    (WANDB_HISTORY, [1, 2, 3], [2.3, 2.1, 1.9]),
], ids=["chart-export", "history-export"])
def test_wandb_exports(text, steps, loss, tmp_path):
    path = tmp_path / "export.csv"
    path.write_text(text)
    data = read_log(path)
    s, v = data.series("loss")
    assert list(s) == steps and list(v) == loss
    assert not any(k in data.columns for k in ("train/loss__MIN", "train/loss__MAX"))


def test_wandb_export_with_two_runs_gives_two_reports(tmp_path, capsys):
    path = tmp_path / "export.csv"
    path.write_text(WANDB_TWO_RUNS)
    code, out, _ = _run(capsys, path, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["verdict"] == "collapse"
    assert [(r["path"].rsplit("#", 1)[1], r["verdict"]) for r in doc["runs"]] == [
        ("run-a", "healthy"), ("run-b", "collapse")]


def test_parent_directory_one_report_per_run_worst_exit(tmp_path, capsys):
    _write_hf_output_dir(tmp_path / "hf")
    (tmp_path / "pl" / "version_0").mkdir(parents=True)
    (tmp_path / "pl" / "version_0" / "metrics.csv").write_text(LIGHTNING_CSV)
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "log.jsonl").write_text('{"step": 0, "loss": 1}\n{"step": 1, "loss": 0.9}\n')
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text('{"step": 0, "loss": 1}\n{"step": 1, "lo')
    code, out, err = _run(capsys, tmp_path, "--json")
    doc = json.loads(out)
    assert code == 2, "the worst run (unreadable) sets the exit code"
    assert list(doc) == ["runs", "verdict"] and doc["verdict"] == "error"
    got = {r["path"].replace(str(tmp_path) + "/", ""): r["verdict"] for r in doc["runs"]}
    assert got == {"bad/log.jsonl": "error", "hf/checkpoint-6/trainer_state.json": "collapse",
                   "ok/log.jsonl": "healthy", "pl/version_0/metrics.csv": "collapse"}
    bad = next(r for r in doc["runs"] if r["verdict"] == "error")
    assert list(bad) == ["path", "verdict", "error"] and "log.jsonl:2: not valid JSON" in bad["error"]
    errors = [ln for ln in err.splitlines() if ln.startswith("invariants scan: error: ")]
    assert len(errors) == 1 and "bad/log.jsonl:2: not valid JSON" in errors[0], err
    assert all(ln.startswith("invariants scan: note: ") for ln in err.splitlines()
               if ln not in errors), err
    (tmp_path / "bad" / "log.jsonl").unlink()
    code, out, _ = _run(capsys, tmp_path)
    assert code == 1 and out.rstrip().endswith("3 runs: 1 healthy, 2 collapse; worst: collapse")


# -- the real libraries ----------------------------------------------------------------------
def _tiny_hf_run(out_dir, lr):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: "
                                       "the literal HF fixtures above still run")
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate")
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, labels=None):
            pred = self.lin(x).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(pred, labels), "logits": pred}

    torch.manual_seed(0)
    xs = torch.randn(32, 4)
    data = [{"x": xs[i], "labels": xs[i].sum()} for i in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=8, per_device_train_batch_size=4, learning_rate=lr,
        logging_steps=1, eval_strategy="steps", eval_steps=4, save_steps=4,
        report_to=["tensorboard"], use_cpu=True,
        seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=data,
                                   eval_dataset=data[:8])
    trainer.train()
    trainer.save_state()
    return out_dir


@pytest.mark.slow
def test_real_hf_trainer_output_dir(tmp_path, capsys):
    out = _tiny_hf_run(tmp_path / "out", lr=1e-2)
    state = read_log(out / "trainer_state.json")
    assert {"loss", "grad_norm", "lr", "val_loss"} <= set(state.columns)
    assert state.records == 8 + 2  # 8 training records, 2 evaluations
    runs = {r.path.replace(str(out) + "/", ""): r for r in read_runs(out)}
    tb_runs = [p for p in runs if p.startswith("runs/")]  # runs/<date>_<host>, HF's default
    assert set(runs) == {"trainer_state.json", *tb_runs} and len(tb_runs) == 1, set(runs)
    tb = runs[tb_runs[0]]
    assert {"loss", "grad_norm", "lr", "val_loss"} <= set(tb.columns)
    np.testing.assert_allclose(tb.series("loss")[1], state.series("loss")[1], rtol=1e-6)
    code, _, _ = _run(capsys, out)
    assert code in (0, 1)


def _tiny_lightning_run(root, lr):
    L = pytest.importorskip("lightning", reason="lightning not installed: the literal "
                            "Lightning fixture above still runs")
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def _loss(self, batch):
            x, y = batch
            logits = self.lin(x)
            return torch.nn.functional.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

        def training_step(self, batch, i):
            loss, acc = self._loss(batch)
            self.log("train_loss", loss)
            self.log("train_acc", acc)
            return loss

        def validation_step(self, batch, i):
            loss, acc = self._loss(batch)
            self.log("val_loss", loss)
            self.log("val_acc", acc)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr)

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    ds = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    dl = torch.utils.data.DataLoader(ds, batch_size=8)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, log_every_n_steps=2,
                        logger=CSVLogger(str(root)), callbacks=[LearningRateMonitor()],
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(Tiny(), dl, dl)
    return root / "lightning_logs" / "version_0" / "metrics.csv"


@pytest.mark.slow
# lightning 2.6's _pytree calls a torch API that torch 2.13 deprecates; not ours to fix
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_real_lightning_csv_logger(tmp_path, capsys):
    path = _tiny_lightning_run(tmp_path, lr=1e-2)
    header = path.read_text().splitlines()[0].split(",")
    assert {"epoch", "step", "train_loss", "val_loss", "val_acc", "lr-Adam"} <= set(header), header
    data = read_log(path)
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(data.columns)
    assert len(data.columns["val_loss"][0]) == 3  # one validation row per epoch
    code, out, _ = _run(capsys, tmp_path)
    assert code in (0, 1) and "metrics.csv" in out
