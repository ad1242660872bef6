"""The public surface: explicit, sorted, and every check speaks with one voice."""
import invariants
from invariants import _errors


def test_all_is_sorted_unique_and_public():
    assert invariants.__all__ == sorted(set(invariants.__all__))
    assert not [n for n in invariants.__all__ if n.startswith("_")]
    for name in invariants.__all__:
        assert hasattr(invariants, name), name


def test_no_private_names_leak():
    # names that are not identifiers ('@py_builtins') are pytest's assertion-rewrite helpers,
    # injected when an in-process pytester run re-imports the plugin package
    public = {n for n in dir(invariants) if not n.startswith("_") and n.isidentifier()}
    extra = public - set(invariants.__all__) - {"plugin"}
    assert not extra, f"names importable from invariants but not in __all__: {sorted(extra)}"


def test_every_assertion_documents_raises_and_has_a_spec_id():
    checks = [n for n in invariants.__all__ if n.startswith("assert_")]
    assert checks
    for name in checks:
        fn = getattr(invariants, name)
        assert "Raises:" in (fn.__doc__ or ""), f"{name}: docstring must state Raises:"
        assert hasattr(fn, "spec_id"), f"{name}: not decorated with @invariant_check"


def test_error_types():
    assert issubclass(invariants.InvariantViolation, AssertionError)
    assert issubclass(invariants.InvalidArgumentError, ValueError)
    assert _errors.InvalidArgumentError is invariants.InvalidArgumentError


def test_reference_models_are_not_imported_by_the_library():
    import subprocess
    import sys
    code = "import sys, invariants; sys.exit(int(any(m.startswith('reference_models') for m in sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
