"""``invariants scan``: formats, the --json contract, exit codes, --plot, --map, bad input."""
import csv
import json
import math
import os

import pytest

from invariants._cli import main
from tests.test_signatures_logs import MODE_COLLAPSE, TOKEN_SOUP, rlan_timeline

FINDING_KEYS = ["signature", "metric", "severity", "step", "value", "threshold", "message"]


def _run(capsys, *argv):
    code = main(["scan", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _jsonl(path, records, key="epoch"):
    with open(path, "w") as fh:
        for step, metrics in records:
            fh.write(json.dumps({key: step, **metrics}) + "\n")
    return path


def _csv(path, records, key="epoch"):
    cols = sorted({k for _, m in records for k in m})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([key, *cols])
        for step, m in records:
            w.writerow([step, *("" if k not in m else m[k] for k in cols)])
    return path


def _tensorboard(path, records, rename=None):
    from torch.utils.tensorboard import SummaryWriter
    rename = rename or {}
    w = SummaryWriter(str(path))
    for step, m in records:
        for k, v in m.items():
            if isinstance(v, str):
                w.add_text(rename.get(k, k), v, step)
            else:
                w.add_scalar(rename.get(k, k), v, step)
    w.close()
    return path


@pytest.fixture(scope="module")
def rlan_json(tmp_path_factory):
    return None, _jsonl(tmp_path_factory.mktemp("rlan") / "rlan.jsonl", rlan_timeline())


def test_rlan_json_contract(rlan_json, capsys):
    _, path = rlan_json
    code, out, err = _run(capsys, path, "--json")
    assert code == 1 and err == ""
    doc = json.loads(out)
    assert list(doc) == ["verdict", "findings"] and doc["verdict"] == "collapse"
    for f in doc["findings"]:
        assert list(f) == FINDING_KEYS
        assert f["severity"] in ("warning", "critical")
    first_critical = min(f["step"] for f in doc["findings"] if f["severity"] == "critical")
    assert first_critical == 41
    assert {"signature": "lora_norm", "severity": "warning", "step": 31} .items() <= \
        next(f for f in doc["findings"] if f["signature"] == "lora_norm").items()


@pytest.mark.parametrize("fmt", ["csv", "tensorboard"])
def test_formats_give_the_same_findings(fmt, tmp_path, capsys):
    records = rlan_timeline()
    _, expected, _ = _run(capsys, _jsonl(tmp_path / "a.jsonl", records), "--json")
    if fmt == "csv":
        path = _csv(tmp_path / "a.csv", records)
    else:  # TensorBoard stores float32: compare verdict and (signature, step), not the floats
        path = _tensorboard(tmp_path / "tb", records)
    code, out, err = _run(capsys, path, "--json")
    assert code == 1, err
    got, want = json.loads(out), json.loads(expected)
    if fmt == "csv":
        assert got == want
    else:
        key = lambda d: [(f["signature"], f["metric"], f["severity"], f["step"]) for f in d["findings"]]
        assert got["verdict"] == want["verdict"] and key(got) == key(want)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "null", '"nan"', '"inf"', '"-inf"',
                                  '"NaN"'])
def test_jsonl_non_finite_spellings(text, tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 10, "loss": 0.9}\n'
                    f'{{"step": 20, "loss": {text}}}\n')
    code, out, _ = _run(capsys, path, "--json")
    doc = json.loads(out)
    assert code == 1
    assert [(f["signature"], f["step"]) for f in doc["findings"]] == [("non_finite", 20)]
    assert doc["findings"][0]["value"] in ("nan", "inf", "-inf") and \
        doc["findings"][0]["threshold"] is None


def test_healthy_log_exits_0_and_says_healthy(tmp_path, capsys):
    records = [(s, {"loss": 2.0 / (1 + s / 100), "accuracy": 0.9 - 0.5 / (1 + s / 100)})
               for s in range(0, 2000, 10)]
    path = _jsonl(tmp_path / "ok.jsonl", records, key="step")
    code, out, _ = _run(capsys, path)
    assert code == 0 and "HEALTHY" in out
    code, out, _ = _run(capsys, path, "--json")
    assert json.loads(out) == {"verdict": "healthy", "findings": []}


def test_warning_only_exits_0(tmp_path, capsys):
    path = _jsonl(tmp_path / "w.jsonl", [(1, {"lora_norm": 0.5}), (2, {"lora_norm": 1.2})])
    code, out, _ = _run(capsys, path, "--json")
    assert code == 0 and json.loads(out)["verdict"] == "warning"


def test_sparse_records_samples_and_mid_run_metrics(tmp_path, capsys):
    path = tmp_path / "sparse.jsonl"
    lines = [{"step": 0, "loss": 3.0}, {"step": 7, "loss": 2.5, "sample": TOKEN_SOUP[0]},
             {"step": 30}, {"step": 31, "val_loss": 2.6, "loss": 2.4},
             {"step": 100, "loss": 2.0, "sample": MODE_COLLAPSE}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    code, out, _ = _run(capsys, path, "--json")
    sigs = [(f["signature"], f["step"]) for f in json.loads(out)["findings"]]
    assert code == 1
    assert ("repetition", 7) in sigs and ("mode_collapse", 100) in sigs


def test_human_report(tmp_path, capsys, rlan_json):
    _, path = rlan_json
    code, out, _ = _run(capsys, path)
    lines = out.splitlines()
    assert code == 1
    assert lines[1].startswith("metrics: accuracy (51), attention_sharpness (51)")
    # the loss rise is a divergence warning from epoch 45 (16 more epochs in this log, under
    # the 20 points a critical divergence must hold); the norm runaway and the NaN batches
    # are the collapse at epoch 41 (ties sort by name)
    assert lines[2] == "COLLAPSE: 4 critical, 4 warning(s)"
    assert lines[3] == "first critical: lora_norm on lora_norm at epoch 41"
    assert any("lora_norm=1.453 > 1 (warn threshold, seed 000)" in ln for ln in lines)


def test_map_renames_columns(tmp_path, capsys):
    path = _jsonl(tmp_path / "m.jsonl", [(0, {"my_loss": 1.0, "other": 1}),
                                         (1, {"my_loss": math.nan, "other": 2})], key="step")
    code, out, _ = _run(capsys, path, "--map", "loss=my_loss")
    assert code == 1 and "non_finite" in out and "ignored (not canonical, not mapped): other" in out
    assert "note: read loss <- my_loss" in out


def test_plot_is_written_atomically(tmp_path, capsys, rlan_json):
    _, path = rlan_json
    png = tmp_path / "out" / "plot.png"
    png.parent.mkdir()
    code, out, _ = _run(capsys, path, "--plot", png)
    assert code == 1 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(png.parent) == ["plot.png"]  # no temp file left behind


def _fail_midway(target, *args, **kwargs):
    """A savefig that dies after writing half a file (disk full, killed process)."""
    if hasattr(target, "write"):
        target.write(b"\x89PNG half")
    else:
        with open(target, "wb") as fh:
            fh.write(b"\x89PNG half")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["savefig", "replace"])
def test_plot_failure_midway_leaves_the_old_plot_and_no_temp_file(where, tmp_path, capsys,
                                                                  rlan_json, monkeypatch):
    """Atomic means: the old plot.png survives a failed write untouched, and no temp file stays."""
    from matplotlib.figure import Figure
    _, path = rlan_json
    png = tmp_path / "plot.png"
    png.write_bytes(b"old plot")
    if where == "savefig":
        monkeypatch.setattr(Figure, "savefig", lambda self, target, *a, **k: _fail_midway(target))
    else:
        def replace(src, dst):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(os, "replace", replace)
    code, out, err = _run(capsys, path, "--plot", png)
    assert code == 2, err
    assert f"--plot='{png}': cannot write the plot" in err and "Traceback" not in err
    assert png.read_bytes() == b"old plot"
    assert os.listdir(tmp_path) == ["plot.png"]


def _bad_cases():
    return [
        ("empty", "log.jsonl", "", [], r"log.jsonl: empty log: no records"),
        ("blank-lines", "log.jsonl", "\n\n  \n", [], r"empty log"),
        ("truncated-line", "log.jsonl", '{"step": 0, "loss": 1.0}\n{"step": 1, "lo', [],
         r"log.jsonl:2: not valid JSON .* a truncated line\?"),
        ("not-object", "log.jsonl", '{"step": 0, "loss": 1}\n[1, 2]\n', [],
         r"log.jsonl:2: expected a JSON object per line, got list"),
        ("no-step-key", "log.jsonl", '{"loss": 1.0}\n', [],
         r"log.jsonl:1: no 'step' or 'epoch' key"),
        ("step-missing-later", "log.jsonl", '{"step": 0, "loss": 1}\n{"loss": 2}\n', [],
         r"log.jsonl:2: no 'step' key"),
        ("non-numeric", "log.jsonl", '{"step": 0, "loss": 1}\n{"step": 1, "loss": "high"}\n', [],
         r"log.jsonl:2: loss='high': not a number"),
        ("bool", "log.jsonl", '{"step": 0, "loss": true}\n', [], r"log.jsonl:1: loss=True: not a number"),
        ("step-nan", "log.jsonl", '{"step": NaN, "loss": 1}\n', [], r"log.jsonl:1: step=nan: must be finite"),
        ("no-known-metric", "log.jsonl", '{"step": 0, "foo": 1}\n', [],
         r"log.jsonl: no known metric in 1 records \(ignored: foo\)"),
        ("unknown-map-target", "log.jsonl", '{"step": 0, "l": 1}\n', ["--map", "lossy=l"],
         r"--map lossy=l: 'lossy' is not a known metric"),
        ("map-source-missing", "log.jsonl", '{"step": 0, "loss": 1}\n', ["--map", "val_loss=vl"],
         r"log.jsonl: --map val_loss=vl: no metric 'vl' in the log"),
        ("map-malformed", "log.jsonl", '{"step": 0, "loss": 1}\n', ["--map", "loss"],
         r"--map 'loss': expected new=old"),
        ("map-collides", "log.jsonl", '{"step": 0, "loss": 1, "l": 2}\n', ["--map", "loss=l"],
         r"log.jsonl:1: --map loss=l: the log already has a 'loss' column"),
        ("sample-not-text", "log.jsonl", '{"step": 0, "sample": 3}\n', [],
         r"log.jsonl:1: sample=3: a sample must be text"),
        ("csv-truncated", "log.csv", "step,loss\n0,1.0\n1\n", [],
         r"log.csv:3: 1 fields but the header has 2; a truncated line\?"),
        ("csv-header-only", "log.csv", "step,loss\n", [], r"log.csv: a header but no records"),
        ("csv-non-numeric", "log.csv", "step,loss\n0,abc\n", [], r"log.csv:2: loss='abc': not a number"),
        ("csv-no-step", "log.csv", "time,loss\n0,1\n", [], r"log.csv:1: no 'step' or 'epoch' key in \['time', 'loss'\]"),
        ("unknown-content", "log.txt", "hello world\n", [],
         r"log.txt: cannot tell the format .* pass --format"),
        ("binary-as-jsonl", "log.jsonl", b"\xff\xfe\x00garbage", [], r"log.jsonl:1: not UTF-8 text"),
        ("tensorboard-empty", "tb", None, ["--format", "tensorboard"],
         r"tb: no scalar or text events found"),
        ("dir-as-jsonl", "tb", None, ["--format", "jsonl"], r"tb: is a directory"),
        ("missing-file", "nope.jsonl", "SKIP", [], r"nope.jsonl: no such file or directory"),
        ("huge-integer", "log.jsonl", '{"step": 0, "loss": ' + "9" * 400 + '}\n', [],
         r"log.jsonl:1: loss=9999.*: integer too large for a float \(400 digits\)"),
        ("integer-over-digit-limit", "log.jsonl", '{"step": 0, "loss": ' + "9" * 5000 + '}\n', [],
         r"log.jsonl:1: not readable JSON \(Exceeds the limit"),
        ("deep-nesting", "log.jsonl", '{"step": 0, "loss": ' + "[" * 100_000 + "]" * 100_000
         + '}\n', [], r"log.jsonl:1: JSON nested too deeply to read"),
        ("plot-is-directory", "log.jsonl", '{"step": 0, "loss": 1}\n', ["--plot", "plotdir"],
         r"--plot='plotdir': is a directory; give a file name"),
        ("plot-dir-missing", "log.jsonl", '{"step": 0, "loss": 1}\n', ["--plot", "no/such/dir/p.png"],
         r"--plot='no/such/dir/p.png': directory .* does not exist"),
    ]


@pytest.mark.parametrize("name, filename, content, extra, match", _bad_cases(),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_input_exits_2_naming_file_and_line(name, filename, content, extra, match, tmp_path,
                                                capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "plotdir" in extra:
        os.mkdir("plotdir")
    if content is None:
        os.mkdir(filename)
    elif isinstance(content, bytes):
        (tmp_path / filename).write_bytes(content)
    elif content != "SKIP":
        (tmp_path / filename).write_text(content)
    code, out, err = _run(capsys, filename, *extra)
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("invariants scan: error: "), err
    assert "Traceback" not in err
    import re
    assert re.search(match, err), err


@pytest.mark.parametrize("name", ["log.jsonl", "log.csv", "log.dat"])
def test_unreadable_file_exits_2(name, tmp_path, capsys, monkeypatch):
    """Permission denied (simulated: tests may run as root) while detecting or reading."""
    import builtins

    import invariants.signatures.readers.stream as scan_module
    path = tmp_path / name
    path.write_text('{"step": 0, "loss": 1}\n')

    def deny(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(file, *args, **kwargs)
    monkeypatch.setattr(scan_module, "open", deny, raising=False)
    code, out, err = _run(capsys, path)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"{path}: cannot read (Permission denied)" in err


def test_truncated_tensorboard_file_exits_2(tmp_path, capsys):
    _tensorboard(tmp_path / "tb", rlan_timeline())
    (event,) = (tmp_path / "tb").iterdir()
    cut = tmp_path / "cut.tfevents.1"
    cut.write_bytes(event.read_bytes()[:-7])  # the writer was killed mid-record
    code, out, err = _run(capsys, cut)
    assert code == 2 and out == ""
    assert "cut.tfevents.1: truncated or corrupt TensorBoard event file" in err


@pytest.mark.parametrize("argv", [["--format", "xml"], ["--bogus"], []], ids=["format", "flag", "no-path"])
def test_bad_usage_exits_2(argv, tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text('{"step": 0, "loss": 1}\n')
    assert main(["scan", *([str(path)] if argv else []), *argv]) == 2
    assert "usage:" in capsys.readouterr().err


def test_inf_step_and_non_finite_are_not_silently_healthy(tmp_path, capsys):
    path = tmp_path / "nan.csv"
    path.write_text("step,loss,grad_norm\n0,1.0,\n1,nan,1.0\n")
    code, out, _ = _run(capsys, path, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["findings"][0]["signature"] == "non_finite"
    assert math.isnan(float(doc["findings"][0]["value"]))


class TestReportText(__import__("expecttest").TestCase):
    """The default report, verbatim (accept changes with EXPECTTEST_ACCEPT=1 under -n 0)."""

    def test_rlan_report(self):
        import tempfile
        from invariants import render_report, scan_file
        with tempfile.TemporaryDirectory() as d:
            cwd = os.getcwd()
            os.chdir(d)
            try:
                _jsonl("rlan.jsonl", rlan_timeline())
                data, findings = scan_file("rlan.jsonl")
            finally:
                os.chdir(cwd)
        self.assertExpectedInline(render_report(data, findings), """\
rlan.jsonl: jsonl, 51 records, epoch 1..61
metrics: accuracy (51), attention_sharpness (51), entropy (51), lora_norm (51), loss (51), nan_batches (51)
COLLAPSE: 4 critical, 4 warning(s)
first critical: lora_norm on lora_norm at epoch 41
  epoch  severity  signature           message
      1  warning   nan_batches         nan_batches=15 > 10 (healthy is 0-10 per epoch, seed 000)
     31  warning   lora_norm           lora_norm=1.453 > 1 (warn threshold, seed 000)
     41  critical  lora_norm           lora_norm=1.714 > 1.5 (critical threshold, seed 000)
     41  critical  nan_batches         nan_batches=60 > 50 (abort above 50 per epoch, seed 000)
     42  warning   accuracy_drop       accuracy 0.866 is more than 9.05659% below its best 0.96 (seed 000: > 5% drop; raised to the series' noise where larger)
     44  critical  entropy_spike       entropy=2.134 > 2 after having been healthy (< 0.5) (collapse, seed 000)
     45  warning   divergence          loss rose after improving: level (median of the last 9) 0.182 vs best 0.05 since step 45, 10.28 noise units (sd 0.0128405); CUSUM over drift k=3 reached 6.1026 > h=5; critical if it holds for 20 points (from point 20 on); not recovered
     50  critical  attention_collapse  attention_sharpness=0.03 < 0.1 after having been healthy (> 0.5) (collapse, seed 000)""")
