"""``invariants scan`` sources and the reviewer's measured problems, one table row each:
pipes and stdin read whole, bounded blocks and lines, BOMs, --map, resumed runs,
--plot destinations, echoed values; and the native fast path agreeing with the slow one.
Every row ends in the documented exit code and one clear line, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from invariants._cli import main
from invariants.signatures.readers import jsonl as jsonl_reader
from invariants.signatures.readers import read_log
from invariants.signatures.readers import stream

CLI = [sys.executable, "-m", "invariants", "scan"]


def _run(capsys, *argv):
    code = main(["scan", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _collapse_log(n: int) -> str:
    """Healthy for n-1 lines, NaN loss on the last: only a reader that keeps every byte
    of the stream sees the collapse."""
    lines = [json.dumps({"step": s, "loss": 2.0 / (1 + s / 50)}) for s in range(n - 1)]
    lines.append(json.dumps({"step": n - 1, "loss": None}))
    return "\n".join(lines) + "\n"


LONG = _collapse_log(400)   # ~12 KB: more than the 4 KB the old sniffer swallowed
SHORT = _collapse_log(3)    # shorter than one sniff


# -- 1. pipes and stdin: never lose bytes --------------------------------------------------
@pytest.mark.parametrize("how", ["file", "dev-stdin", "dash", "process-substitution"])
@pytest.mark.parametrize("log", [LONG, SHORT], ids=["long", "short"])
def test_streams_read_whole(how, log, tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(log)
    if how == "file":
        cmd, stdin = [*CLI, str(path), "--json"], None
    elif how == "dev-stdin":
        cmd, stdin = [*CLI, "/dev/stdin", "--json"], open(path, "rb")
    elif how == "dash":
        cmd, stdin = [*CLI, "-", "--json"], open(path, "rb")
    else:
        q = " ".join(CLI).replace(sys.executable, f"'{sys.executable}'")
        cmd, stdin = ["bash", "-c", f"{q} <(cat '{path}') --json"], None
    try:
        proc = subprocess.run(cmd, stdin=stdin if stdin else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
    finally:
        if stdin:
            stdin.close()
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "collapse"
    last = log.count("\n") - 1
    assert ("non_finite", last) in [(f["signature"], f["step"]) for f in doc["findings"]]


def test_peek_never_consumes(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\xef\xbb\xbf" + b"abc\n" * 5000)
    src = stream.open_source(str(path))
    assert src.peek(10) == b"abc\nabc\nab" and src.peek(3) == b"abc"
    got = b"".join(c for _, c, _ in src.chunks(size=4096))
    assert got == b"abc\n" * 5000
    src.close()


# -- 2 and 3. the measured problems, each a row: args, files, exit code, one stderr line --
def _rows():
    big = "y" * 1_000_000
    return [
        # name, files {name: content}, argv, exit code, stdout must contain, stderr regex
        ("bom-jsonl", {"log.jsonl": b"\xef\xbb\xbf" + b'{"step": 0, "loss": 1.0}\n'},
         ["log.jsonl"], 0, "HEALTHY", None),
        ("bom-csv", {"log.csv": b"\xef\xbb\xbfstep,loss\n0,1.0\n1,0.9\n"}, ["log.csv"], 0,
         "HEALTHY", None),
        ("map-one-column-twice", {"log.jsonl": b'{"step": 0, "x": 1.0}\n'},
         ["log.jsonl", "--map", "loss=x", "val_loss=x"], 2, "",
         r"--map 'val_loss=x': column 'x' is already mapped to 'loss'"),
        ("echo-truncated", {"log.jsonl": b'{"step": 0, "loss": "' + big.encode() + b'"}\n'},
         ["log.jsonl"], 2, "", r"log.jsonl:1: loss='yyyy.*\.\.\.: not a number"),
        ("echo-truncated-key", {"log.jsonl": b'{"step": 0, "' + big.encode() + b'": 1}\n'},
         ["log.jsonl"], 2, "", r"log.jsonl: no known metric in 1 records \(ignored: yyy.*\.\.\.\)"),
        ("line-too-long", {"log.jsonl": b'{"step": 0, "loss": 1}\n' + b"z" * 5000},
         ["log.jsonl"], 2, "", r"log.jsonl:2: line longer than 4096 bytes"),
        ("resume-jsonl", {"log.jsonl": b"".join(
            b'{"step": %d, "loss": %g}\n' % (s, v) for s, v in
            [(0, 1.0), (1, 0.9), (2, 0.8), (3, 99.0), (2, 0.8), (3, 0.7), (4, 0.6)])},
         ["log.jsonl"], 0, "note: resumed run: step went back to 2 (line 5); 2 earlier record(s) "
         "at step >= 2 replaced by the newer data", None),
        ("plot-dir-not-writable", {"log.jsonl": b'{"step": 0, "loss": 1}\n'},
         ["log.jsonl", "--json", "--plot", "ro/p.png"], 2, "",
         r"--plot='ro/p.png': directory .*ro' is not writable"),
        ("plot-several-runs", {"a/log.jsonl": b'{"step": 0, "loss": 1}\n',
                               "a/b.jsonl": b'{"step": 0, "loss": 1}\n'},
         ["a", "--plot", "p.png"], 2, "", r"--plot='p.png': PATH holds 2 runs"),
        ("empty-stdin-file", {"empty.jsonl": b""}, ["empty.jsonl"], 2, "",
         r"empty.jsonl: empty log: no records"),
        ("map-step-missing", {"log.jsonl": b'{"it": 0, "loss": 1}\n'},
         ["log.jsonl", "--map", "step=iteration"], 2, "",
         r"log.jsonl:1: --map step=iteration: no 'iteration' key in the first record"),
        ("map-step", {"log.jsonl": b'{"it": 0, "loss": 1}\n{"it": 5, "loss": NaN}\n'},
         ["log.jsonl", "--map", "step=it"], 1, "it 0..5", None),
        ("no-step-after-blank-lines", {"log.jsonl": b'\n\n{"loss": 1}\n'}, ["log.jsonl"], 2, "",
         r"log.jsonl:3: no 'step' or 'epoch' key in \{'loss': 1\}"),
        ("no-log-in-dir", {"d/readme.txt": b"hi"}, ["d"], 2, "",
         r"d: no log found \(searched recursively"),
    ]


@pytest.mark.parametrize("name, files, argv, code, out_has, err_re", _rows(),
                         ids=[r[0] for r in _rows()])
def test_problem_rows(name, files, argv, code, out_has, err_re, tmp_path, capsys, monkeypatch):
    import re
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stream, "MAX_LINE_BYTES", 4096)
    for f, content in files.items():
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(content)
    if name == "plot-dir-not-writable":  # simulated: the tests may run as root
        (tmp_path / "ro").mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p).endswith("ro")
                            else real(p, m))
    got, out, err = _run(capsys, *argv)
    assert got == code, (out, err)
    assert "Traceback" not in err
    if err_re is None:
        assert out_has in out, out
    else:
        assert out == "", "nothing may be printed before a usage error"
        assert err.count("\n") == 1 and err.startswith("invariants scan: error: "), err
        assert len(err) < 600, f"an error must not echo huge values ({len(err)} characters)"
        assert re.search(err_re, err), err


def test_plot_write_failure_names_the_verdict_and_prints_nothing(tmp_path, capsys, monkeypatch):
    """Plot first, print after: a failed plot exits 2 without a half-printed report, and its
    one line still says what the scan found."""
    from invariants.signatures import cli
    path = tmp_path / "log.jsonl"
    path.write_text(SHORT)

    def fail(*a, **k):
        from invariants._errors import InvalidArgumentError
        raise InvalidArgumentError("--plot='p.png': cannot write the plot (No space left)")
    monkeypatch.setattr(cli, "write_plot", fail)
    code, out, err = _run(capsys, path, "--json", "--plot", tmp_path / "p.png")
    assert code == 2 and out == ""
    assert err.strip().endswith("(the scan's verdict: collapse)"), err


def test_resumed_tensorboard_run_keeps_the_newer_data(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter
    run = tmp_path / "run"
    w = SummaryWriter(str(run))
    for s in range(10):
        w.add_scalar("loss", 1.0 if s < 6 else float("nan"), s)  # the crashed attempt
    w.close()
    w = SummaryWriter(str(run))  # resumed from the step-5 checkpoint: healthy from there on
    for s in range(5, 12):
        w.add_scalar("loss", 0.9, s)
    w.close()
    assert len(list(run.iterdir())) == 2
    code, out, _ = _run(capsys, run)
    assert code == 0, out
    assert "note: resumed run: step went back to 5; 5 earlier record(s) at step >= 5" in out
    code, out, err = _run(capsys, run, "--json")
    assert json.loads(out) == {"verdict": "healthy", "findings": []}
    assert "note: " in err and "resumed run" in err


# -- blocks: fast (pyarrow) and slow (json/csv) paths agree, line numbers stay right ------
def _jsonl_cases():
    return {
        "dense": "".join(f'{{"step": {s}, "loss": {1 / (s + 1)}, "lr": 0.1}}\n' for s in range(60)),
        "sparse-blank-lines": "".join(
            f'{{"step": {s}, "loss": {s}}}\n\n' if s % 3 else f'{{"step": {s}, "val_loss": 2}}\n'
            for s in range(60)),
        "non-finite-spellings": "".join(
            f'{{"step": {s}, "loss": {v}, "note": "x"}}\n'
            for s, v in enumerate(["1", "NaN", "null", '"nan"', '"inf"', "Infinity", "-Infinity",
                                   "2"] * 6)),
        "ints-floats-epoch": "".join(f'{{"epoch": {s / 4}, "accuracy": {s % 2}}}\n'
                                     for s in range(60)),
        # the token only where nothing is read (the fast path keeps the block), and a read
        # column that is null on every line (Arrow types it `null`: it must still be NaN)
        "null-in-an-unread-column": "".join(f'{{"step": {s}, "loss": 1.5, "note": null}}\n'
                                            for s in range(60)),
        "all-null-column": "".join(f'{{"step": {s}, "loss": null, "lr": 0.1}}\n'
                                   for s in range(60)),
        "samples": "".join(f'{{"step": {s}, "sample": "{"ab" * (s % 3)}", "loss": 1}}\n'
                           for s in range(60)),
    }


def _assert_same_columns(fast, slow):
    """Every column of the native read equals the json module's, value for value."""
    for m in slow.columns:
        for a, b in zip(fast.columns[m], slow.columns[m]):
            if a.dtype == object:
                assert list(a) == list(b), m
            else:
                np.testing.assert_array_equal(a, b, err_msg=m)


@pytest.mark.parametrize("case", list(_jsonl_cases()))
@pytest.mark.parametrize("block", [64, 1 << 20], ids=["tiny-blocks", "one-block"])
def test_fast_path_equals_slow_path(case, block, tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    path.write_text(_jsonl_cases()[case])
    monkeypatch.setattr(stream, "CHUNK_BYTES", block)
    slow_blocks = []
    real_slow = jsonl_reader._slow
    monkeypatch.setattr(jsonl_reader, "_slow", lambda *a: slow_blocks.append(a[2]) or real_slow(*a))
    fast = read_log(path)
    if case in ("dense", "ints-floats-epoch", "samples", "sparse-blank-lines",
                "null-in-an-unread-column"):
        assert slow_blocks == [], f"the native path fell back to json for blocks at {slow_blocks}"
    monkeypatch.setattr(jsonl_reader, "_arrow", lambda: None)
    slow = read_log(path)
    assert fast.records == slow.records and sorted(fast.columns) == sorted(slow.columns)
    _assert_same_columns(fast, slow)


@pytest.mark.parametrize("block", [48, 1 << 20], ids=["tiny-blocks", "one-block"])
@pytest.mark.parametrize("fmt, bad, match", [
    ("jsonl", '{"step": 57, "loss": true}', "log.jsonl:58: loss=True: not a number"),
    ("jsonl", '{"step": 57, "loss": 1', "log.jsonl:58: not valid JSON"),
    ("jsonl", '{"loss": 1}', "log.jsonl:58: no 'step' key"),
    ("csv", "57,abc", "log.csv:59: loss='abc': not a number"),
    ("csv", "57", "log.csv:59: 1 fields but the header has 2"),
], ids=["jsonl-bool", "jsonl-truncated", "jsonl-no-step", "csv-text", "csv-short-row"])
def test_line_numbers_survive_blocks(fmt, bad, match, block, tmp_path, monkeypatch):
    from invariants._errors import InvalidArgumentError
    monkeypatch.setattr(stream, "CHUNK_BYTES", block)
    if fmt == "jsonl":
        lines = [f'{{"step": {s}, "loss": 1.5}}' for s in range(57)] + [bad]
    else:
        lines = ["step,loss"] + [f"{s},1.5" for s in range(57)] + [bad]
    path = tmp_path / f"log.{fmt}"
    path.write_text("\n".join(lines + lines[-3:-1]) + "\n")
    with pytest.raises(InvalidArgumentError, match=match):
        read_log(path)


def test_csv_quoted_newlines_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 32)
    rows = "".join(f'{s},1.0,"line one\nline two {s}"\n' for s in range(20))
    path = tmp_path / "log.csv"
    path.write_text("step,loss,sample\n" + rows)
    data = read_log(path)
    assert data.records == 20
    assert list(data.columns["sample"][2])[:2] == ["line one\nline two 0", "line one\nline two 1"]


def test_memory_is_bounded_by_blocks_not_file(tmp_path):
    """A 64 MiB file without a line end fails after reading one line's bound (16 MiB), in a
    fresh process whose peak RSS grows by a few line bounds, not by the file size (the old
    reader held the whole file, several times over)."""
    path = tmp_path / "noline.jsonl"
    with open(path, "wb") as fh:
        fh.write(b"{" * (64 << 20))
    small = tmp_path / "small.jsonl"
    small.write_text('{"step": 0, "loss": 1}\n')
    probe = ("import resource, sys\nfrom invariants._cli import main\n"
             "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
             "main(['scan', sys.argv[2]])\n"  # warm: every import a scan needs
             "base = rss()\ncode = main(['scan', sys.argv[1]])\nprint(rss() - base, code)")
    proc = subprocess.run([sys.executable, "-c", probe, str(path), str(small)],
                          capture_output=True, text=True, timeout=120)
    grew_mb, code = map(int, proc.stdout.split()[-2:])
    assert code == 2 and "noline.jsonl:1: line longer than 16 MiB" in proc.stderr
    assert grew_mb < 64, f"peak RSS grew by {grew_mb} MB reading a 64 MiB file with no line end"


def test_native_reader_reads_multi_chunk_columns_with_gaps_like_the_slow_path(tmp_path, monkeypatch):
    """A block over pyarrow's 1 MiB parse block comes back as several chunks per column;
    columns with missing keys carry a validity bitmap. Both are read from the buffers
    (``jsonl._numpy``), and must give exactly the json module's values."""
    lines = []
    for s in range(60_000):
        rec = {"step": s, "loss": 1.0 / (s + 1)}
        if s % 7 == 0:
            rec["val_loss"] = s * 0.5            # sparse: absent on 6 lines of 7
        if s % 1000 == 3:
            rec["sample"] = "ab" * (s % 5)
        lines.append(json.dumps(rec))
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 2 * (1 << 20)
    fast = read_log(path)
    monkeypatch.setattr(jsonl_reader, "_arrow", lambda: None)
    slow = read_log(path)
    assert fast.records == slow.records == 60_000 and sorted(fast.columns) == sorted(slow.columns)
    _assert_same_columns(fast, slow)


# an import hook that records where ``module`` (argv[1]) is first asked for, then ``body``
_WATCH = r"""
import importlib.abc, sys, traceback
module, paths, asked = sys.argv[1], sys.argv[2:], []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == module and not asked:   # where the first attempt came from
            ours = [f for f in traceback.extract_stack() if not f.filename.startswith("<")]
            asked.append(" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                     for f in reversed(ours[-4:])))
        return None
sys.meta_path.insert(0, Watch())
"""


def _first_import_of(module: str, body: str, tmp_path, n: int) -> str:
    """Run ``body`` over a sparse JSONL and a CSV log of ``n`` records in a fresh interpreter
    under the hook; its last stdout line (``body`` prints what it checks and ``asked``)."""
    jl, csv = tmp_path / "log.jsonl", tmp_path / "log.csv"
    jl.write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1), "sample": "ab c"}
                                     if s % 100 == 0 else {"step": s, "loss": 1 / (s + 1)}) + "\n"
                          for s in range(n)))
    csv.write_text("step,loss,val_loss\n" + "".join(
        f"{s},{1 / (s + 1)},{'' if s % 10 else 2.0}\n" for s in range(n)))
    out = subprocess.run([sys.executable, "-c", _WATCH + body, module, str(jl), str(csv)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_scan_command_never_imports_torch(tmp_path):
    """`invariants scan` needs numpy and pyarrow, not torch: importing torch was 1.3 s of a
    2.9 s scan of 10^6 records. The package's names load on first use (PEP 562), the scan
    path never touches a torch-backed one; watched with an import hook."""
    body = (
        "from invariants._cli import main   # the console script's entry point\n"
        "codes = [main(['scan', p, '--json']) for p in paths]\n"
        "import invariants                  # the public names resolve without torch too\n"
        "assert invariants.SignatureConfig and invariants.scan_series and invariants.verdict_of\n"
        "print(codes, asked)\n")
    got = _first_import_of("torch", body, tmp_path, 300)
    assert got == "[0, 0] []", f"the scan command imported torch (codes, first import site): {got}"


def test_scanning_a_log_never_imports_pandas(tmp_path):
    """pyarrow's ``to_numpy`` imports pandas whenever it is installed (0.2 s and 40 MB of
    every scan); the readers take their columns from the Arrow buffers instead. Watched
    with an import hook, so it holds whether or not pandas is installed here."""
    body = (
        "from invariants.signatures.logs import scan_file\n"
        "for p in paths:\n"
        "    data, found = scan_file(p)\n"
        "    assert data.records == 3000, (p, data.records)\n"
        "print(asked)\n")
    got = _first_import_of("pandas", body, tmp_path, 3000)
    assert got == "[]", f"scanning imported pandas, first from {got}"
