"""The one write helper (``invariants._atomic``) and every writer of the tool going through it.

Modes (the umask's for a new file, the old file's kept), symlinks written through, FIFOs,
directories and device nodes refused and left as they were, a failure at any point of the
write (``KeyboardInterrupt`` included) leaving the old file and no temp file, the temp name
covered by ``.gitignore``, and no module writing a file any other way.
"""
import errno
import fnmatch
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from invariants import (
    GoldenRun,
    InvariantViolation,
    assert_matches_golden,
    record_golden,
)
from invariants._atomic import (
    TEMP_PATTERN,
    AtomicWriteError,
    temp_name,
    write_bytes_atomic,
)
from invariants._cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o077)``); the old one comes back after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _only(directory: Path, *names: str) -> None:
    left = sorted(os.listdir(directory))
    assert left == sorted(names), f"left behind in {directory}: {left}"


MODES = [
    # (umask, mode of the existing target or None for a new file, mode after the write)
    (0o022, None, 0o644),
    (0o077, None, 0o600),
    (0o027, None, 0o640),
    (0o077, 0o644, 0o644),   # a rewritten golden keeps its mode (mkstemp made it 0600)
    (0o022, 0o600, 0o600),
    (0o022, 0o755, 0o755),
]


@pytest.mark.parametrize("mask,existing,expected", MODES,
                         ids=[f"umask {m:03o} {'new' if e is None else f'existing {e:03o}'}"
                              for m, e, _ in MODES])
def test_mode_is_the_umasks_for_a_new_file_and_kept_for_an_old_one(mask, existing, expected,
                                                                   umask, tmp_path):
    target = tmp_path / "f.json"
    if existing is not None:
        target.write_bytes(b"old")
        target.chmod(existing)
    umask(mask)
    assert write_bytes_atomic(target, b"new") == target
    assert target.read_bytes() == b"new"
    assert _mode(target) == expected, f"{_mode(target):03o} != {expected:03o}"
    _only(tmp_path, "f.json")


def _quick(name="quick", scale=1.0):
    def fn(seed, device):
        steps = list(range(0, 60, 10))
        return {"loss": (steps, (scale * torch.exp(-3 * torch.linspace(0, 1, 6))).tolist())}
    return GoldenRun(name=name, fn=fn, config={"scale": 1.0})


def _golden_json(tmp_path):
    return [record_golden(_quick(), tmp_path / "golden")]


def _mismatch_files(tmp_path):
    record_golden(_quick(), tmp_path / "golden")
    with pytest.raises(InvariantViolation):
        assert_matches_golden(_quick(scale=2.0), tmp_path / "golden", output_dir=tmp_path / "out")
    return [tmp_path / "out" / "quick.cpu.obtained.json", tmp_path / "out" / "quick.cpu.obtained.png"]


def _scan_plot(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 1.0 + (i > 5) * 5.0}) + "\n"
                           for i in range(10)))
    png = tmp_path / "plot.png"
    assert main(["scan", str(log), "--plot", str(png)]) in (0, 1)
    return [png]


WRITERS = {"golden json": _golden_json, "obtained json and mismatch plot": _mismatch_files,
           "scan --plot": _scan_plot}


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600)],
                         ids=["umask 022", "umask 077"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_of_the_tool_writes_with_the_umasks_mode(writer, mask, expected, umask,
                                                              tmp_path, capsys):
    umask(mask)
    files = WRITERS[writer](tmp_path)
    for path in files:
        assert path.exists(), path
        assert _mode(path) == expected, f"{path.name}: {_mode(path):03o} != {expected:03o}"
    temps = [p for p in tmp_path.rglob("*") if fnmatch.fnmatch(p.name, TEMP_PATTERN)]
    assert not temps, f"temp files left behind: {temps}"


def test_mismatch_files_that_cannot_be_written_never_mask_the_mismatch(tmp_path):
    """A directory where the plot goes, a file where the output directory goes: the mismatch
    is still the InvariantViolation (exit 1 in the CLI), naming why each file is missing."""
    record_golden(_quick(), tmp_path / "golden")
    out = tmp_path / "out"
    (out / "quick.cpu.obtained.png").mkdir(parents=True)
    with pytest.raises(InvariantViolation) as info:
        assert_matches_golden(_quick(scale=2.0), tmp_path / "golden", output_dir=out)
    text = str(info.value)
    assert "loss: 6/6 points outside tolerance" in text
    assert f"obtained curves: {out / 'quick.cpu.obtained.json'}\n" in text
    assert (f"plot: NOT written ({out / 'quick.cpu.obtained.png'}: is a directory, not a regular "
            "file; refusing to replace it)") in text
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"a file, not a directory")
    with pytest.raises(InvariantViolation, match=r"obtained curves: NOT written \(.*blocked/quick"
                                                 r"\.cpu\.obtained\.json: cannot create directory"):
        assert_matches_golden(_quick(scale=2.0), tmp_path / "golden", output_dir=blocked)
    assert blocked.read_bytes() == b"a file, not a directory"


def test_a_symlink_is_written_through_to_its_file(tmp_path, monkeypatch):
    """Decision: a symlink stays a link; the regular file it names is replaced atomically,
    with its temp file beside it (the rename never crosses file systems)."""
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    real = real_dir / "cpu.json"
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = link_dir / "cpu.json"
    link.symlink_to(real)
    renames = []
    os_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))),
                                                         os_replace(src, dst))[1])
    assert write_bytes_atomic(link, b"new") == real
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == b"new" and _mode(real) == 0o640
    [(src, dst)] = renames
    assert dst == real and src.parent == real_dir
    _only(real_dir, "cpu.json")
    _only(link_dir, "cpu.json")


def _fifo(path):
    os.mkfifo(path)


def _directory(path):
    path.mkdir()
    (path / "inside").write_bytes(b"kept")


def _char_device(path):
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # the /dev/null device
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD (root); FIFO and directory rows "
                    "check the same refusal")


def _dangling(path):
    path.symlink_to(path.parent / "missing")


def _loop(path):
    path.symlink_to(path)


def _link_to_fifo(path):
    os.mkfifo(path.parent / "pipe")
    path.symlink_to(path.parent / "pipe")


REFUSED = [
    ("FIFO", _fifo, r"is a FIFO \(named pipe\), not a regular file; refusing to replace it"),
    ("directory", _directory, r"is a directory, not a regular file; refusing to replace it"),
    ("character device", _char_device, r"is a character device, not a regular file"),
    ("dangling symlink", _dangling, r"is a symlink to a missing file or a symlink loop"),
    ("symlink loop", _loop, r"is a symlink to a missing file or a symlink loop"),
    ("symlink to a FIFO", _link_to_fifo, r"a symlink to .*pipe, which is a FIFO"),
]


@pytest.mark.parametrize("make,match", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_non_regular_targets_are_refused_and_left_alone(make, match, tmp_path):
    target = tmp_path / "target"
    make(target)
    before = sorted(os.listdir(tmp_path)), os.lstat(target).st_mode
    with pytest.raises(AtomicWriteError, match=f"^{re.escape(str(target))}: .*{match}"):
        write_bytes_atomic(target, b"new")
    assert (sorted(os.listdir(tmp_path)), os.lstat(target).st_mode) == before
    if target.is_dir() and not target.is_symlink():
        assert (target / "inside").read_bytes() == b"kept"


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(AtomicWriteError, match=r"no/such/f\.json: directory '.*no/such' does not "
                                               r"exist"):
        write_bytes_atomic(tmp_path / "no" / "such" / "f.json", b"x")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


FAILURES = [
    # (which step fails, how, what the caller sees)
    ("write", _enospc, AtomicWriteError,
     r"cannot write \(No space left on device\); the old file is unchanged"),
    ("fsync", _enospc, AtomicWriteError, r"No space left on device"),
    ("fchmod", _enospc, AtomicWriteError, r"No space left on device"),
    ("replace", _enospc, AtomicWriteError, r"No space left on device"),
    ("write", _interrupt, KeyboardInterrupt, None),
    ("fsync", _interrupt, KeyboardInterrupt, None),
    ("replace", _interrupt, KeyboardInterrupt, None),
]


@pytest.mark.parametrize("step,fail,error,match", FAILURES,
                         ids=[f"{s} {f.__name__[1:]}" for s, f, _, _ in FAILURES])
def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_file(step, fail, error, match,
                                                                  tmp_path, monkeypatch):
    target = tmp_path / "cpu.json"
    target.write_bytes(b"old golden")
    target.chmod(0o644)  # fchmod runs for an existing target
    calls = []

    def failing(*args, **kwargs):
        calls.append(step)
        fail()

    with monkeypatch.context() as patch:
        patch.setattr(os, step, failing)
        with pytest.raises(error, match=match):
            write_bytes_atomic(target, b"new golden" * 1000)
    assert calls, f"the write never called os.{step}"
    assert target.read_bytes() == b"old golden"
    _only(tmp_path, "cpu.json")


def test_a_failure_writing_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(AtomicWriteError, match=r"new\.json: cannot write .*nothing was written"):
        write_bytes_atomic(tmp_path / "new.json", b"x")
    _only(tmp_path)


def test_short_writes_are_continued(tmp_path, monkeypatch):
    """``os.write`` may write less than asked (a signal, a pipe-like file system)."""
    os_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: os_write(fd, bytes(data[:7])))
    data = bytes(range(256)) * 40
    write_bytes_atomic(tmp_path / "f.bin", data)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_temp_files_match_the_pattern_gitignore_covers(tmp_path, monkeypatch):
    temps = []
    os_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (temps.append(Path(src).name),
                                                         os_replace(src, dst))[1])
    write_bytes_atomic(tmp_path / "cpu.json", b"x")
    write_bytes_atomic(tmp_path / "plot.png", b"x")
    long_name = "n" * 250 + ".json"
    write_bytes_atomic(tmp_path / long_name, b"x")  # the temp name still fits NAME_MAX
    assert len(temps) == 3 and all(fnmatch.fnmatch(t, TEMP_PATTERN) for t in temps), temps
    assert temps[0].startswith(".cpu.json.") and len(os.fsencode(temps[2])) <= 255
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and the repository checkout to ask git check-ignore")
    samples = [f"golden/run-a/{temps[0]}", f"golden-obtained/{temps[1]}", temps[1],
               f"golden/run-a/{temp_name('cuda-sm90.json')}"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *samples], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    assert ignored.stdout.split() == samples, (ignored.stdout, ignored.stderr)
    # and the pattern is not so broad that it hides the goldens themselves
    kept = subprocess.run(["git", "check-ignore", "--no-index", "golden/run-a/cpu.json"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert kept.returncode == 1 and kept.stdout == ""


WRITE_CALLS = re.compile(r"mkstemp|NamedTemporaryFile|os\.replace\(|os\.rename\(|\.write_text\(|"
                         r"\.write_bytes\(|open\([^)]*['\"][wax]b?\+?['\"]|savefig\((?!png,)")


def test_no_module_writes_a_file_except_through_the_helper():
    """Every file the tool writes goes through ``invariants._atomic`` (figures render into
    memory first: ``fig.savefig(png, ...)`` with ``png`` a BytesIO)."""
    offenders = []
    for path in sorted((ROOT / "invariants").rglob("*.py")):
        if path.name == "_atomic.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if WRITE_CALLS.search(code) and not code.lstrip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
