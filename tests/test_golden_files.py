"""The golden-file contract: schema, atomic writes, refusal rules, stale/missing/mismatch messages."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from invariants import (GoldenError, GoldenRun, GoldenTolerance, InvalidArgumentError,
                        InvariantViolation, Tolerance, assert_matches_golden, device_key,
                        read_golden, record_golden)
from invariants.golden import run_spread
from invariants._cli import main
from invariants.golden import store
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


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "g.json"
    write_json_atomic(target, {"ok": 1})
    with pytest.raises(ValueError):
        write_json_atomic(target, {"bad": math.nan})  # allow_nan=False refuses mid-write
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]


def test_atomic_write_goes_through_a_temp_file_and_rename(tmp_path, monkeypatch):
    """A crash between writing and renaming leaves the old golden whole (no in-place write)."""
    target = tmp_path / "g.json"
    write_json_atomic(target, {"ok": 1})

    def crash(src, dst):
        assert Path(src).parent == Path(dst).parent and Path(src).name != Path(dst).name
        assert json.loads(Path(src).read_text()) == {"new": 2}  # fully written before rename
        raise OSError("power cut")

    monkeypatch.setattr(store.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write_json_atomic(target, {"new": 2})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BAD_GOLDENS = [
    ("truncated", '{"schema_version": 1,\n "run": "quick",\n "metrics": {', r"g.json:3:\d+: corrupt golden JSON"),
    ("not an object", "[1, 2]", r"must be a JSON object, got list"),
    ("future schema", json.dumps({"schema_version": 99, "run": "quick", "metadata": {},
                                  "metrics": {}, "tolerances": {}, "signatures": []}),
     r"schema_version=99 is from the future"),
    ("missing key", json.dumps({"schema_version": 1, "run": "quick"}), r"missing key 'metadata'"),
    ("NaN value", '{"schema_version": 1, "run": "q", "metadata": {}, "metrics": {"loss": '
                  '{"steps": [0], "values": [NaN]}}, "tolerances": {}, "signatures": []}',
     r"non-finite constant NaN"),
    ("ragged curve", json.dumps({"schema_version": 1, "run": "quick", "metadata": {},
                                 "metrics": {"loss": {"steps": [0, 1], "values": [1.0]}},
                                 "tolerances": {}, "signatures": []}), r"metric 'loss' must be"),
]


@pytest.mark.parametrize("text,match", [(t, m) for _, t, m in BAD_GOLDENS],
                         ids=[n for n, _, _ in BAD_GOLDENS])
def test_bad_golden_files_are_clear_errors(tmp_path, text, match):
    with pytest.raises(GoldenError, match=match):
        read_golden(_write(tmp_path / "g.json", text))


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
