"""The golden-file contract: schema, atomic writes, refusal rules, stale/missing/mismatch messages,
and every corrupt golden refused on read with one clear line (exit 2)."""
import errno
import json
import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from invariants import (
    GoldenError,
    GoldenRun,
    GoldenTolerance,
    InvalidArgumentError,
    InvariantViolation,
    Tolerance,
    assert_matches_golden,
    device_key,
    read_golden,
    record_golden,
)
from invariants._cli import main
from invariants.golden import run_spread, store
from invariants.golden.store import write_json_atomic


def _quick(name="quick", scale=1.0, config=None, noise=False):
    counter = {"n": 0}

    def fn(seed, device):
        counter["n"] += 1
        x = torch.linspace(0, 1, 6)
        loss = (scale * torch.exp(-3 * x) + 0.01 * torch.rand(6)).tolist()
        if noise:
            loss[2] += counter["n"] * 1e-3  # differs between two seeded runs
        return {"loss": (list(range(0, 60, 10)), loss), "lr": (list(range(0, 60, 10)), [0.1] * 6)}

    return GoldenRun(name=name, fn=fn, config=config or {"scale": 1.0})


@pytest.fixture
def recorded(tmp_path):
    run = _quick()
    path = record_golden(run, tmp_path / "golden")
    return run, tmp_path / "golden", path


def test_record_writes_the_contract(recorded):
    run, golden_dir, path = recorded
    assert path == golden_dir / "quick" / "cpu.json"
    doc = json.loads(path.read_text())
    assert set(doc) == {"schema_version", "run", "metadata", "metrics", "tolerances", "signatures"}
    meta = doc["metadata"]
    for key in ("torch", "python", "numpy", "device", "device_name", "device_capability",
                "num_threads", "seed", "dtype", "determinism", "config_sha256", "command"):
        assert key in meta, key
    assert meta["config_sha256"] == run.config_sha256
    assert doc["metrics"]["loss"]["steps"] == [0, 10, 20, 30, 40, 50]
    assert doc["tolerances"]["loss"] == {"rtol": 1e-5, "atol": 1e-6}


def test_matching_run_passes_and_is_bit_identical(recorded, tmp_path):
    run, golden_dir, path = recorded
    curves = assert_matches_golden(run, golden_dir, output_dir=tmp_path / "out")
    assert curves["loss"][1] == read_golden(path)["metrics"]["loss"]["values"]
    assert not (tmp_path / "out").exists()


def test_mismatch_names_metric_step_values_and_plot(recorded, tmp_path):
    run, golden_dir, _ = recorded
    changed = replace(_quick(scale=1.5), config=run.config)  # the "fix" changed, config did not
    with pytest.raises(InvariantViolation) as info:
        assert_matches_golden(changed, golden_dir, output_dir=tmp_path / "out")
    text = str(info.value)
    assert "golden run 'quick' (cpu) differs" in text
    assert "loss: 6/6 points outside tolerance; worst at step 0: golden" in text
    assert "obtained" in text and "--golden-update -k quick" in text
    obtained = tmp_path / "out" / "quick.cpu.obtained.json"
    plot = tmp_path / "out" / "quick.cpu.obtained.png"
    assert obtained.exists() and plot.exists() and str(plot) in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_golden(obtained)["run"] == "quick"


def test_stale_config_is_not_a_tolerance_failure(recorded, tmp_path):
    run, golden_dir, _ = recorded
    with pytest.raises(InvariantViolation, match=r"stale golden, regenerate: .*not a tolerance failure"):
        assert_matches_golden(replace(run, config={"scale": 2.0}), golden_dir,
                              output_dir=tmp_path / "out")


def test_missing_golden_fails_never_skips(tmp_path):
    with pytest.raises(InvariantViolation, match=r"missing golden .*quick/cpu.json.*never skipped"):
        assert_matches_golden(_quick(), tmp_path / "empty", output_dir=tmp_path / "out")


def test_refuses_non_finite_curves(tmp_path):
    run = GoldenRun("nan-run", lambda s, d: {"loss": ([0, 1], [1.0, math.nan])}, {"a": 1})
    with pytest.raises(GoldenError, match=r"refusing to record a non-finite curve: loss at step 1"):
        record_golden(run, tmp_path)
    assert not (tmp_path / "nan-run").exists()


def _norm_run(kind, peak, signatures=()):
    values = [0.5, 0.8, peak, peak, peak]
    return GoldenRun(f"norm-{kind}", lambda s, d: {"lora_norm": (list(range(5)), values)},
                     {"peak": peak}, kind=kind, signatures=signatures)


@pytest.mark.parametrize("run,match", [
    (_norm_run("fixed", 2.5), r"the fixed run shows collapse signatures: .*lora_norm_kill"),
    # a warning is a finding too: a fixed run must leave a guard that is switched on silent
    (_norm_run("fixed", 1.2), r"the fixed run shows collapse signatures: .*'warning'"),
    (_norm_run("broken", 0.9, (("lora_norm_kill", "lora_norm"),)),
     r"documented collapse is missing \(as critical findings\): "
     r"\[\('lora_norm_kill', 'lora_norm'\)\]"),
    # a broken run whose documented signature shows only as a warning has not collapsed
    (_norm_run("broken", 1.2, (("lora_norm", "lora_norm"),)),
     r"documented collapse is missing \(as critical findings\): \[\('lora_norm', 'lora_norm'\)\]"),
], ids=["fixed run collapses", "fixed run warns", "broken run shows nothing",
        "broken run only warns"])
def test_refuses_to_record_a_run_that_does_not_behave_as_documented(tmp_path, run, match):
    with pytest.raises(GoldenError, match=r"(?s)refusing to record a golden .*" + match):
        record_golden(run, tmp_path)
    assert not (tmp_path / run.name).exists()


def test_tolerance_table_is_part_of_the_config_hash():
    run = _quick()
    looser = replace(run, tolerances={"loss": GoldenTolerance(rtol=1e-3, atol=0.0)})
    assert looser.config_sha256 != run.config_sha256


def test_golden_tolerance_is_the_one_tolerance_type():
    assert GoldenTolerance is Tolerance
    assert GoldenTolerance(rtol=1e-5, atol=1e-6) == Tolerance(1e-5, 1e-6, eps=0.0)
    assert _quick().tolerance("loss") == Tolerance(rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match=r"rtol=-1: must be a finite number >= 0"):
        GoldenTolerance(rtol=-1, atol=0.0)
    with pytest.raises(InvalidArgumentError, match=r"atol=nan: must be a finite number >= 0"):
        GoldenTolerance(rtol=0.0, atol=math.nan)


def test_refuses_curves_that_differ_between_seeded_runs(tmp_path):
    with pytest.raises(GoldenError, match=r"differs between two seeded runs \(loss at step 20"):
        record_golden(_quick(noise=True), tmp_path)


def test_update_rewrites_only_the_current_device_key(recorded):
    run, golden_dir, path = recorded
    other = golden_dir / "quick" / "cuda-sm90.json"
    other.write_text('{"sentinel": true}\n')
    record_golden(replace(run, config={"scale": 1.0, "v": 2}), golden_dir, "cpu")
    assert other.read_text() == '{"sentinel": true}\n'
    assert json.loads(path.read_text())["metadata"]["config"] == {"scale": 1.0, "v": 2}


def test_atomic_write_refuses_non_finite_json_before_touching_the_file(tmp_path):
    target = tmp_path / "g.json"
    write_json_atomic(target, {"ok": 1})
    with pytest.raises(GoldenError, match=r"g.json: refusing to write a non-finite number"):
        write_json_atomic(target, {"bad": math.nan})  # allow_nan=False, before any temp file
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]


def test_atomic_write_goes_through_a_temp_file_and_rename(tmp_path, monkeypatch):
    """A crash between writing and renaming leaves the old golden whole (no in-place write)."""
    target = tmp_path / "g.json"
    write_json_atomic(target, {"ok": 1})
    seen = []

    def crash(src, dst):
        assert Path(src).parent == Path(dst).parent and Path(src).name != Path(dst).name
        assert json.loads(Path(src).read_text()) == {"new": 2}  # fully written before rename
        seen.append(src)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(GoldenError, match=r"g.json: cannot write \(Input/output error\); the old "
                                          r"file is unchanged"):
        write_json_atomic(target, {"new": 2})
    assert seen, "the write never reached the rename"
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]


# ---------------------------------------------------------------------------------------------
# Corrupt goldens. Each row corrupts a golden that matched (``corrupt(path, doc, monkeypatch)``)
# and must be refused on read with one GoldenError line naming the file and the problem:
# through ``read_golden`` and through ``invariants golden`` with a user's runs module (exit 2,
# one line on stderr, never a traceback, never exit 1, which means "mismatch").

USER_RUNS_MODULE = "golden_files_user_runs"
USER_RUNS = """
import torch
from invariants import GoldenRun


def _curves(seed, device):
    steps = list(range(0, 60, 10))
    loss = (torch.exp(-3 * torch.linspace(0, 1, 6)) + 0.01 * torch.rand(6)).tolist()
    return {"loss": (steps, loss), "lora_norm": (steps, [0.5, 0.52, 0.55, 0.56, 0.58, 0.6])}


RUNS = (GoldenRun(name="user-quick", fn=_curves, config={"v": 1}),)
"""


def _edit(change):
    """A corruption that edits the parsed golden and writes it back as JSON."""
    def corrupt(path, doc, monkeypatch):
        change(doc)
        path.write_text(json.dumps(doc))
    return corrupt


def _raw(data):
    """A corruption that replaces the file's bytes (``data(doc)`` or ``data``)."""
    def corrupt(path, doc, monkeypatch):
        path.write_bytes(data(doc) if callable(data) else data)
    return corrupt


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(doc):
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value(node[keys[-1]]) if callable(value) else value
    return _edit(change)


def _directory(path, doc, monkeypatch):
    path.unlink()
    path.mkdir()


def _fifo(path, doc, monkeypatch):
    path.unlink()
    os.mkfifo(path)  # a read would block forever: refused from its type, before opening


def _unreadable(path, doc, monkeypatch):
    path.chmod(0)


def _permission_denied_simulated(path, doc, monkeypatch):
    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))
    monkeypatch.setattr(store, "open", denied, raising=False)  # store's own open() only


def _pickled(doc):
    import pickle
    return pickle.dumps(doc, protocol=4)


def _NONE(values):  # upper case: it reads as a value in the table below
    return [None] * len(values)


_ROOT_SKIP = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root bypasses permission bits (CAP_DAC_OVERRIDE), so chmod 000 cannot make a file "
           "unreadable to root; the 'permission denied (simulated)' row checks the message")

CORRUPT_GOLDENS = [
    # what makes a comparison vacuous (NaN tolerance: all-null values matched with exit 0)
    ("all-null loss", _set("metrics", "loss", "values", _NONE),
     r"metrics\['loss'\]\.values\[0\]=None: must be a finite number, got null"),
    ("all-null lora_norm", _set("metrics", "lora_norm", "values", _NONE),
     r"metrics\['lora_norm'\]\.values\[0\]=None: must be a finite number, got null"),
    ("one null value", _set("metrics", "loss", "values", lambda v: v[:3] + [None] + v[4:]),
     r"metrics\['loss'\]\.values\[3\]=None: must be a finite number"),
    ("no metrics", _set("metrics", {}), r"metrics=\{\}: must be a non-empty object"),
    ("empty curve", _set("metrics", "loss", {"steps": [], "values": []}),
     r"metrics\['loss'\]\.steps=\[\]: must not be empty"),
    ("ragged curve", _set("metrics", "loss", "values", lambda v: v[:-1]),
     r"metrics\['loss'\]='6 steps, 5 values': must have as many values as steps"),
    ("steps repeat", _set("metrics", "loss", "steps", lambda s: [0, 10, 10, 30, 40, 50]),
     r"metrics\['loss'\]\.steps\[2\]=10: must be greater than the step before it"),
    ("steps decrease", _set("metrics", "loss", "steps", lambda s: s[::-1]),
     r"metrics\['loss'\]\.steps\[1\]=40: must be greater"),
    ("step a string", _set("metrics", "loss", "steps", lambda s: ["0"] + s[1:]),
     r"metrics\['loss'\]\.steps\[0\]='0': must be a finite number, got string"),
    ("list for a number", _set("metrics", "loss", "values", lambda v: [[1, 2]] + v[1:]),
     r"values\[0\]=\[1, 2\]: must be a finite number, got array"),
    ("object for a number", _set("metrics", "loss", "values", lambda v: [{"a": 1}] + v[1:]),
     r"values\[0\]=\{'a': 1\}: must be a finite number, got object"),
    ("10**400 for a number", _raw(lambda doc: json.dumps(doc).replace(
        json.dumps(doc["metrics"]["loss"]["values"][0]), "1" + "0" * 400, 1).encode()),
     r"values\[0\]=1000.*: is an integer too large for a float \(401 digits\)"),
    ("1e400 for a number", _raw(lambda doc: json.dumps(doc).replace(
        json.dumps(doc["metrics"]["loss"]["values"][0]), "1e400", 1).encode()),
     r"values\[0\]=inf: must be finite"),
    ("NaN value", _raw(lambda doc: json.dumps(doc).replace(
        json.dumps(doc["metrics"]["loss"]["values"][0]), "NaN", 1).encode()),
     r"corrupt golden JSON: non-finite constant NaN \(goldens are finite\)"),
    ("boolean value", _set("metrics", "loss", "values", lambda v: [True] + v[1:]),
     r"values\[0\]=True: must be a finite number, got boolean"),
    ("text and numbers mixed", _set("metrics", "loss", "values", lambda v: ["a"] + v[1:]),
     r"values\[1\]=0\.\d+: must be a string like the metric's first value"),
    ("unknown curve key", _set("metrics", "loss", "weights", [1]),
     (r"metrics\['loss'\]=.*: must have exactly the keys \['steps', 'values'\] \(unknown "
      r"\['weights'\]\)")),
    ("schema_version true", _set("schema_version", True),
     r"schema_version=True: must be the integer 1, got boolean"),
    ("schema_version 1.0", _set("schema_version", 1.0),
     r"schema_version=1\.0: must be the integer 1, got number"),
    ("schema_version 0", _set("schema_version", 0), r"schema_version=0: is invalid"),
    ("future schema", _set("schema_version", 99), r"schema_version=99: is from the future"),
    ("missing key", _edit(lambda doc: doc.pop("tolerances")), r"missing key 'tolerances'"),
    ("unknown key", _set("extra", 1), r"unknown key 'extra'"),
    ("run empty", _set("run", ""), r"run='': must be a non-empty string"),
    ("metadata a list", _set("metadata", []), r"metadata=\[\]: must be an object, got array"),
    ("config hash missing", _edit(lambda doc: doc["metadata"].pop("config_sha256")),
     r"metadata\.config_sha256=None: must be the run config's SHA-256"),
    ("negative tolerance", _set("tolerances", "loss", "atol", -1e-6),
     r"tolerances\['loss'\]\.atol=-1e-06: must be >= 0"),
    ("tolerance a string", _set("tolerances", "loss", "rtol", "1e-5"),
     r"tolerances\['loss'\]\.rtol='1e-5': must be a finite number, got string"),
    ("tolerance missing for a metric", _edit(lambda doc: doc["tolerances"].pop("loss")),
     r"tolerances=\['lora_norm'\]: must name exactly the golden's metrics \(missing \['loss'\]"),
    ("signatures an object", _set("signatures", {}),
     r"signatures=\{\}: must be an array of findings, got object"),
    ("signature not an object", _set("signatures", ["divergence"]),
     r"signatures\[0\]='divergence': must be an object"),
    ("signature missing step", _set("signatures", [
        {"signature": "divergence", "metric": "loss", "severity": "critical"}]),
     r"signatures\[0\]=.*: must have exactly the keys .* \(missing \['step'\]\)"),
    ("signature severity", _set("signatures", [
        {"signature": "divergence", "metric": "loss", "severity": "fatal", "step": 10}]),
     r"signatures\[0\]\.severity='fatal': must be one of \['warning', 'critical'\]"),
    ("signature step null", _set("signatures", [
        {"signature": "divergence", "metric": "loss", "severity": "critical", "step": None}]),
     r"signatures\[0\]\.step=None: must be a finite number, got null"),
    ("signature unknown metric", _set("signatures", [
        {"signature": "divergence", "metric": "val_loss", "severity": "critical", "step": 10}]),
     r"signatures\[0\]\.metric='val_loss': is not a metric of this golden"),
    ("truncated", _raw(lambda doc: json.dumps(doc, indent=1)[:200].encode()),
     r"cpu.json:\d+:\d+: corrupt golden JSON"),
    ("not an object", _raw(b"[1, 2]"), r"golden must be a JSON object, got array"),
    ("empty file", _raw(b""), r"cpu.json:1:1: corrupt golden JSON: Expecting value"),
    ("pickle renamed cpu.json", _raw(_pickled),
     r"looks like a Python pickle \(protocol 4\), not JSON; .*nothing is ever unpickled"),
    ("non-UTF-8 bytes", _raw(b'{"run": "\xff\xfe"}'),
     r"not UTF-8 text \(byte 0xff at offset 9\)"),
    ("deep nesting", _raw(b"[" * 100_000 + b"]" * 100_000),
     r"JSON nested too deeply to read"),
    ("huge integer over the digit limit", _raw(b'{"schema_version": ' + b"9" * 5000 + b"}"),
     r"corrupt golden JSON: Exceeds the limit"),
    ("cpu.json a directory", _directory, r"cpu.json: is a directory, not a golden file"),
    ("cpu.json a FIFO", _fifo, r"cpu.json: is a FIFO \(named pipe\), not a golden file"),
    pytest.param("permission denied", _unreadable,
                 r"cpu.json: cannot read the golden file \(Permission denied\)",
                 marks=_ROOT_SKIP, id="permission denied"),
    ("permission denied (simulated)", _permission_denied_simulated,
     r"cpu.json: cannot read the golden file \(Permission denied\)"),
]


def _row_id(row):
    return row.id if hasattr(row, "id") else row[0]


@pytest.fixture
def user_runs(tmp_path, monkeypatch):
    """A user's own runs module (not reference_models), importable by name, and its golden."""
    (tmp_path / f"{USER_RUNS_MODULE}.py").write_text(USER_RUNS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, USER_RUNS_MODULE, raising=False)
    golden_dir = tmp_path / "golden"
    assert main(["golden", "--runs", USER_RUNS_MODULE, "--golden-dir", str(golden_dir),
                 "--update"]) == 0
    return golden_dir, golden_dir / "user-quick" / "cpu.json"


def _golden_cli(golden_dir, tmp_path, *extra):
    return main(["golden", "--runs", USER_RUNS_MODULE, "--golden-dir", str(golden_dir),
                 "--output", str(tmp_path / "out"), *extra])


def test_user_golden_matches_before_corruption(user_runs, tmp_path, capsys):
    """The baseline of the table below: untouched, the same golden matches (exit 0)."""
    golden_dir, path = user_runs
    capsys.readouterr()
    assert _golden_cli(golden_dir, tmp_path) == 0
    assert "user-quick (cpu): matches golden" in capsys.readouterr().out
    assert read_golden(path)["run"] == "user-quick"


@pytest.mark.parametrize("name,corrupt,match", CORRUPT_GOLDENS,
                         ids=[_row_id(r) for r in CORRUPT_GOLDENS])
def test_corrupt_golden_is_one_clear_line_exit_2(name, corrupt, match, user_runs, tmp_path,
                                                 capsys, monkeypatch):
    golden_dir, path = user_runs
    corrupt(path, json.loads(path.read_text()), monkeypatch)
    capsys.readouterr()
    code = _golden_cli(golden_dir, tmp_path)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)  # 1 would mean "mismatch": a corrupt golden is not one
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"invariants golden: error: {path}"), err
    assert re.search(match, err), err
    with pytest.raises(GoldenError, match=match):  # the library (and pytest plugin) path
        read_golden(path)
    assert not (tmp_path / "out").exists()  # a corrupt golden is not a mismatch: no .obtained


@pytest.mark.parametrize("name,corrupt,match", [r for r in CORRUPT_GOLDENS if _row_id(r) in (
    "all-null loss", "all-null lora_norm", "pickle renamed cpu.json", "cpu.json a directory")],
    ids=["all-null loss", "all-null lora_norm", "pickle", "directory"])
def test_corrupt_golden_fails_the_assertion_the_plugin_calls(name, corrupt, match, user_runs,
                                                              tmp_path, monkeypatch):
    """``pytest -m golden`` compares through ``assert_matches_golden``: the same refusal."""
    golden_dir, path = user_runs
    corrupt(path, json.loads(path.read_text()), monkeypatch)
    run = sys.modules[USER_RUNS_MODULE].RUNS[0]
    with pytest.raises(GoldenError, match=match):
        assert_matches_golden(run, golden_dir, output_dir=tmp_path / "out")


def test_a_nan_golden_value_is_a_mismatch_even_unvalidated():
    """Defence in depth behind validation: a NaN golden (NaN allowed tolerance) never passes."""
    from invariants.golden.compare import Mismatch, compare_curves
    problems = compare_curves({"loss": ([0, 1], [1.0, 2.0])},
                              {"loss": {"steps": [0, 1], "values": [math.nan, math.nan]}},
                              lambda m: Tolerance(rtol=1e-5, atol=1e-6))
    assert len(problems) == 1 and isinstance(problems[0], Mismatch)
    assert (problems[0].count, problems[0].total) == (2, 2)


DISK_FULL = [("os.write", "write"), ("os.fsync", "fsync"), ("os.replace", "replace")]


@pytest.mark.parametrize("where", [w for _, w in DISK_FULL], ids=[n for n, _ in DISK_FULL])
def test_full_disk_during_update_keeps_the_old_golden_and_no_temp_file(where, user_runs, tmp_path,
                                                                       capsys, monkeypatch):
    golden_dir, path = user_runs
    doc = json.loads(path.read_text())
    doc["metadata"]["note"] = "the old golden"  # still valid; an update would rewrite it
    path.write_text(json.dumps(doc))
    old = path.read_bytes()
    calls = []

    def full(*args, **kwargs):
        calls.append(where)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(os, where, full)
        code = _golden_cli(golden_dir, tmp_path, "--update")
    out, err = capsys.readouterr()
    assert calls, f"the update never called os.{where}"
    assert code == 2 and out == "" and err.count("\n") == 1, (code, out, err)
    assert err == (f"invariants golden: error: {path}: cannot write (No space left on device); "
                   "the old file is unchanged\n")
    assert path.read_bytes() == old
    assert os.listdir(path.parent) == ["cpu.json"]  # no temp file left behind


def test_golden_for_another_run_is_refused(recorded, tmp_path):
    run, golden_dir, _ = recorded
    renamed = replace(run, name="other")
    (golden_dir / "other").mkdir()
    (golden_dir / "quick" / "cpu.json").rename(golden_dir / "other" / "cpu.json")
    with pytest.raises(GoldenError, match=r"golden is for run 'quick', expected 'other'"):
        assert_matches_golden(renamed, golden_dir, output_dir=tmp_path / "out")


def test_cli_unknown_run_and_cuda_without_gpu(capsys, monkeypatch):
    assert main(["golden", "--run", "no-such-run"]) == 2
    assert "--run='no-such-run': unknown golden run; known runs:" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["golden", "--device", "cuda"]) == 2
    assert "--device=cuda: torch.cuda.is_available() is False" in capsys.readouterr().err


def test_cli_runs_module_that_cannot_be_used(capsys):
    assert main(["golden", "--runs", "no_such_runs_module_xyz"]) == 2
    assert ("--runs='no_such_runs_module_xyz': cannot import it (No module named "
            "'no_such_runs_module_xyz')") in capsys.readouterr().err
    assert main(["golden", "--runs", "json"]) == 2
    assert "--runs='json': the module defines no RUNS" in capsys.readouterr().err


def test_run_spread_is_zero_for_a_deterministic_run():
    spread = run_spread(_quick(), 3)
    assert spread == {"loss": {"max_abs_spread": 0.0, "max_rel_spread": 0.0},
                      "lr": {"max_abs_spread": 0.0, "max_rel_spread": 0.0}}


def test_device_key_cpu():
    assert device_key("cpu") == "cpu"


@pytest.mark.gpu
def test_device_key_cuda():
    major, minor = torch.cuda.get_device_capability()
    assert device_key("cuda") == f"cuda-sm{major}{minor}"


SWEEP_ROWS = [
    # (rows as (run, problems?) per seed, holds?)
    ([("a-fixed", False)] * 5 + [("a-broken", False)] * 5, True),
    ([("a-fixed", False)] * 5 + [("a-broken", False)] * 4 + [("a-broken", True)], True),
    ([("a-fixed", False)] * 5 + [("a-broken", False)] * 3 + [("a-broken", True)] * 2, False),
    ([("a-fixed", False)] * 4 + [("a-fixed", True)] + [("a-broken", False)] * 5, False),
]


@pytest.mark.parametrize("rows, holds", SWEEP_ROWS, ids=["clean", "broken-4-of-5",
                                                          "broken-3-of-5", "fixed-4-of-5"])
def test_sweep_verdict_fixed_every_seed_broken_four_of_five(rows, holds):
    from invariants.golden.cli import sweep_holds
    assert sweep_holds([{"run": r, "problems": ["x"] if bad else []} for r, bad in rows]) is holds


def test_sweep_json_contract(capsys):
    """One cheap run on two seeds: the {"runs": [{run, seed, device, verdict, findings}]} shape."""
    import json

    from invariants._cli import main
    rc = main(["golden", "--run", "staged_modules-broken", "--sweep", "2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [(r["run"], r["seed"], r["device"]) for r in doc["runs"]] == [
        ("staged_modules-broken", 0, "cpu"), ("staged_modules-broken", 1, "cpu")]
    for row in doc["runs"]:
        assert row["verdict"] == "collapse" and not row["problems"]
        assert {"signature", "metric", "severity", "step", "value", "threshold", "message"} <= \
            set(row["findings"][0])
        assert any(f["signature"] == "background_collapse" and f["severity"] == "critical"
                   for f in row["findings"])
