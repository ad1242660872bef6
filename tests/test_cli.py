"""`invariants check`: the JSON contract, exit codes, and a disabled fix turning the gate red."""
import json
import textwrap

import pytest

from invariants._cli import main

CONTRACT_KEYS = {"system", "invariant", "variant", "expected", "outcome", "counterexample"}


def test_check_json_contract_for_lora_init(capsys):
    rc = main(["check", "--system", "lora_init", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] is True
    assert {tuple(sorted(c)) for c in out["cases"]} == {tuple(sorted(CONTRACT_KEYS))}
    by_id = {(c["invariant"], c["variant"]): c for c in out["cases"]}
    assert {inv for inv, _ in by_id} == {f"L{i}" for i in range(1, 8)}
    for case in out["cases"]:
        want = {"holds": "holds", "caught": "caught", "refuted": "refuted"}[case["expected"]]
        assert case["outcome"] == want, case
        assert (case["counterexample"] is None) == (case["expected"] == "holds"), case
    assert "x=" in by_id[("L5", "claim:orthogonal_4c")]["counterexample"]


def test_check_table_lists_rows_and_counterexamples(capsys):
    assert main(["check", "--system", "lora_init", "--invariant", "L4", "-q"]) == 0
    out = capsys.readouterr().out
    assert "lora_init  L4   holds     caught 1/1" in out
    assert "broken:starts_at_target: total=1, target=10.0 -> [L4]" in out


@pytest.fixture
def disabled_fix_catalog(tmp_path, monkeypatch):
    (tmp_path / "disabled_fix_catalog.py").write_text(textwrap.dedent("""
        from dataclasses import replace
        from invariants import Case
        from reference_models import lora_init as m

        # the fix disabled: the "fixed" configuration initialises B randomly
        CASES = [Case("lora_init", "L1", "fixed", "holds",
                      lambda: replace(m.FIXED, init="random"), m._check_l1, "zero-init disabled"),
                 Case("lora_init", "L7", "broken:zero_b_is_fine", "caught",
                      lambda: m.FIXED, m._check_l7, "a 'broken' variant that is in fact fixed")]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "disabled_fix_catalog"


def test_disabling_the_fix_fails_the_gate(disabled_fix_catalog, capsys):
    rc = main(["check", "--catalog", disabled_fix_catalog, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["ok"] is False
    assert [c["outcome"] for c in out["cases"]] == ["VIOLATED", "MISSED"]


def test_missed_broken_variant_says_no_teeth(disabled_fix_catalog, capsys):
    assert main(["check", "--catalog", disabled_fix_catalog, "-q"]) == 1
    out = capsys.readouterr().out
    assert "no counterexample found: the invariant has no teeth" in out
    assert "fixed: VIOLATED: [L1] assert_adapter_identity_at_init" in out


BAD_USAGE = [
    (["check", "--catalog", "no_such_module_xyz"],
     "--catalog='no_such_module_xyz': cannot import it"),
    (["check", "--catalog", "json"], "--catalog='json': the module defines neither CASES nor cases()"),
    (["check", "--system", "nope"], "--system='nope': not in catalog"),
    (["check", "--invariant", "Z9", "--system", "lora_init"], "--invariant='Z9': no case has this id"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.fixture
def broken_catalogs(tmp_path, monkeypatch):
    (tmp_path / "empty_catalog.py").write_text("CASES = []\n")
    (tmp_path / "raising_catalog.py").write_text("raise RuntimeError('db not reachable')\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("module,message", [
    ("empty_catalog", "--catalog='empty_catalog': the catalog is empty"),
    ("raising_catalog", "--catalog='raising_catalog': importing it raised RuntimeError: db not "
                        "reachable"),
])
def test_broken_catalog_modules_exit_2(broken_catalogs, module, message, capsys):
    assert main(["check", "--catalog", module]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", BAD_USAGE, ids=[" ".join(a) for a, _ in BAD_USAGE])
def test_bad_usage_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_is_installed():
    import shutil
    import subprocess
    exe = shutil.which("invariants")
    assert exe, "the `invariants` console script is not on PATH; is the package installed?"
    proc = subprocess.run([exe, "check", "--system", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
