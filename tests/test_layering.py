"""The library never depends on the reference models: statically, and at run time.

DESIGN: ``invariants/`` is what users import; ``reference_models/`` is one user of it. The
static test reads every module under ``invariants/`` for an import of ``reference_models``
(also a lazy one inside a function, which ``import invariants`` alone cannot reveal). The
run-time test drives golden update and compare at world size 1 and 2 (spawned gloo ranks)
with a user's own runs module, in a fresh interpreter, and fails if ``reference_models``
enters ``sys.modules`` of that process or of a rank.
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import invariants

LIBRARY = Path(invariants.__file__).resolve().parent


def _imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_module_of_the_library_imports_reference_models():
    modules = sorted(LIBRARY.rglob("*.py"))
    assert len(modules) > 10
    offenders = [f"{path.relative_to(LIBRARY.parent)}:{line}: import {name}"
                 for path in modules for line, name in _imports_of(path)
                 if name.split(".")[0] == "reference_models"]
    assert not offenders, "the library must not depend on the reference models:\n" + \
        "\n".join(offenders)


USER_RUNS = '''
"""A user's own golden runs: nothing from reference_models."""
import sys

import torch

from invariants import GoldenRun
from invariants.distributed import metrics_reduced


def _curves(seed, device):
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "reference_models")
    if leaked:  # in the main process or in a spawned rank
        raise RuntimeError(f"reference_models was imported: {leaked}")
    assert metrics_reduced()
    x = torch.linspace(0, 1, 8)
    values = (torch.exp(-2 * x) + 0.01 * torch.rand(8)).tolist()
    return {"toy_loss": (list(range(0, 80, 10)), values)}


RUNS = (GoldenRun(name="toy-fixed", fn=_curves, config={"toy": 1}),)
'''

DRIVER = '''
import sys
from pathlib import Path

from invariants import assert_matches_golden, record_golden
from invariants.golden import execute_distributed
from invariants._cli import main

import my_runs


def drive(root: Path) -> None:
    golden, out = str(root / "golden"), str(root / "out")
    common = ["golden", "--runs", "my_runs", "--golden-dir", golden, "--output", out]
    assert main(common + ["--update"]) == 0
    assert main(common) == 0
    assert main(common + ["--world-size", "2", "--timeout", "90"]) == 0
    run = my_runs.RUNS[0]
    record_golden(run, root / "api-golden")
    assert_matches_golden(run, root / "api-golden", output_dir=root / "api-out")
    per_rank = execute_distributed([run], 2, runs_module="my_runs", timeout=90)[run.name]
    assert_matches_golden(run, root / "api-golden", output_dir=root / "api-out",
                          world_size=2, per_rank=per_rank)


if __name__ == "__main__":  # the spawned ranks import this file again: no work at import
    drive(Path(sys.argv[1]))
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "reference_models")
    print("LEAKED", leaked)
    sys.exit(1 if leaked else 0)
'''


@pytest.mark.distributed(timeout=200)
def test_golden_update_and_compare_with_a_users_runs_never_import_reference_models(tmp_path):
    (tmp_path / "my_runs.py").write_text(textwrap.dedent(USER_RUNS))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    # a fresh interpreter in the user's directory: reference_models stays importable (the
    # editable install puts it on the path), so only an actual import can make this fail
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "LEAKED []" in done.stdout
    assert "toy-fixed (cpu, world size 2): matches golden" in done.stdout
    assert (tmp_path / "golden" / "toy-fixed" / "cpu.json").exists()
