"""The kill matrix: every catalog case, one test each.

A fixed variant must hold; a broken variant must be caught ("no teeth"
otherwise); a refuted claim must be refuted with a counterexample.
"""
import pytest

from invariants import run_case
from reference_models.catalog import CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case):
    outcome = run_case(case)
    if outcome.outcome == "error":
        pytest.fail(f"{case.id}: the check itself errored: {outcome.detail}")
    if case.expected == "holds":
        assert outcome.ok, f"{case.id}: fixed variant VIOLATED its invariant:\n{outcome.detail}"
    elif case.expected == "caught":
        assert outcome.ok, (f"invariant {case.invariant} has no teeth: broken variant "
                            f"{case.variant!r} of {case.system} passed it ({case.title})")
        assert outcome.counterexample, f"{case.id}: caught but no counterexample reported"
    else:
        assert outcome.ok, f"{case.id}: claim was expected to be refuted but held"
        assert outcome.counterexample


def test_catalog_ids_are_spec_ids():
    import re
    for case in CASES:
        assert re.fullmatch(r"[HSPLE][1-9]", case.invariant), case.id


def test_every_invariant_has_teeth_or_is_a_claim():
    """Each invariant id with a fixed case also has at least one broken case."""
    by_inv = {}
    for case in CASES:
        by_inv.setdefault((case.system, case.invariant), set()).add(case.expected)
    lacking = [k for k, v in by_inv.items() if "holds" in v and "caught" not in v]
    assert not lacking, f"invariants without a broken variant (no proof of teeth): {lacking}"
