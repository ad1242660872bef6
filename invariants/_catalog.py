"""Cases and the kill matrix.

A ``Case`` pairs a subject (a factory building the thing under test) with a
check (a callable that raises ``InvariantViolation`` when the invariant fails,
usually a Hypothesis property) and says what must happen:

* ``holds``   – a fixed variant: the check must pass;
* ``caught``  – a broken variant: the check must fail, or the invariant has no teeth;
* ``refuted`` – a seed's claim the harness disproves (SPEC L5): the check of the
  claim must fail, and the counterexample is the evidence.

``run_case`` turns a case into an ``Outcome``; ``invariants check`` and the
pytest kill-matrix test both call it, so they cannot disagree.
"""
from __future__ import annotations

import importlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from invariants._errors import InvalidArgumentError, InvariantViolation

__all__ = ["Case", "Outcome", "load_catalog", "run_case"]

EXPECTED = ("holds", "caught", "refuted")
_GOOD = {"holds": "holds", "caught": "caught", "refuted": "refuted"}
_BAD = {"holds": "VIOLATED", "caught": "MISSED", "refuted": "NOT REFUTED"}


@dataclass(frozen=True)
class Case:
    """One row of the kill matrix.

    Args:
      system: the reference system (e.g. ``"lora_init"``).
      invariant: the SPEC id (e.g. ``"L1"``).
      variant: ``"fixed"`` for the fix, ``"broken:<name>"`` for a pre-fix
        variant, ``"claim:<name>"`` for a refuted claim.
      expected: ``"holds"``, ``"caught"`` or ``"refuted"``.
      subject: zero-argument factory of the thing under test.
      check: ``check(subject)``; raises InvariantViolation when the invariant fails.
      title: one line saying what is checked.
    """

    system: str
    invariant: str
    variant: str
    expected: str
    subject: Callable[[], Any] = field(repr=False, compare=False)
    check: Callable[[Callable[[], Any]], None] = field(repr=False, compare=False)
    title: str = ""

    def __post_init__(self) -> None:
        if self.expected not in EXPECTED:
            raise InvalidArgumentError(
                f"expected={self.expected!r}: must be one of {EXPECTED} "
                f"(case {self.system}/{self.invariant}/{self.variant})")
        kind = self.variant.split(":", 1)[0]
        want = {"holds": "fixed", "caught": "broken", "refuted": "claim"}[self.expected]
        if kind != want:
            raise InvalidArgumentError(
                f"variant={self.variant!r}: a case expected to be {self.expected!r} must have "
                f"a variant starting with {want!r}")

    @property
    def id(self) -> str:
        return f"{self.system}-{self.invariant}-{self.variant}"


@dataclass(frozen=True)
class Outcome:
    case: Case
    outcome: str  # holds | VIOLATED | caught | MISSED | refuted | NOT REFUTED | error
    ok: bool
    counterexample: str | None
    detail: str | None
    seconds: float

    def as_json(self) -> dict[str, Any]:
        c = self.case
        return {"system": c.system, "invariant": c.invariant, "variant": c.variant,
                "expected": c.expected, "outcome": self.outcome,
                "counterexample": self.counterexample}


def _one_line(text: str, limit: int = 400) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_flatten(sub))
        return out
    return [exc]


def _counterexample(exc: BaseException) -> str:
    """One line: the shrunk Hypothesis example (from the exception notes) and the message head."""
    notes = list(getattr(exc, "__notes__", []))
    example = ""
    for note in notes:
        if note.startswith(("Falsifying", "Failing")):
            body = note.split(":", 1)[1]
            body = "\n".join(line.split("#", 1)[0] for line in body.splitlines())
            body = re.sub(r"data=data\(\.\.\.\),?", "", body)
            body = re.sub(r"^\s*\w+\(", "", body.strip())  # drop the property's name
            example = body.rstrip().removesuffix(")").strip().rstrip(",")
            break
    draws = []
    for note in notes:
        match = re.match(r"Draw \d+(?: \((\w+)\))?: (.*)", note, re.S)
        if match:
            draws.append(f"{match.group(1) or 'draw'}={match.group(2).split('  #')[0]}")
    message = str(exc).splitlines()
    head = " | ".join(line.strip() for line in message[:2] if line.strip())
    parts = [p for p in (example, ", ".join(draws)) if p]
    if parts:
        return _one_line(f"{' '.join(parts)} -> {head}")
    return _one_line(head)


def run_case(case: Case) -> Outcome:
    """Run one case under the loaded Hypothesis profile and judge it."""
    start = time.perf_counter()
    violation: BaseException | None = None
    try:
        case.check(case.subject)
    except (InvariantViolation, BaseExceptionGroup) as exc:
        leaves = _flatten(exc)
        if all(isinstance(leaf, InvariantViolation) for leaf in leaves):
            violation = leaves[0]
            if not getattr(violation, "__notes__", None):
                violation.__notes__ = getattr(exc, "__notes__", [])  # type: ignore[attr-defined]
        else:
            other = next(x for x in leaves if not isinstance(x, InvariantViolation))
            return Outcome(case, "error", False, None,
                           f"{type(other).__name__}: {other}", time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - reported, never swallowed
        return Outcome(case, "error", False, None, f"{type(exc).__name__}: {exc}",
                       time.perf_counter() - start)
    seconds = time.perf_counter() - start
    failed = violation is not None
    ok = (not failed) if case.expected == "holds" else failed
    outcome = (_GOOD if ok else _BAD)[case.expected]
    counterexample = _counterexample(violation) if violation is not None else None
    detail = str(violation) if violation is not None else None
    return Outcome(case, outcome, ok, counterexample, detail, seconds)


def load_catalog(module: str = "reference_models.catalog") -> list[Case]:
    """Import ``module`` and return its ``CASES`` (a list) or ``cases()`` result."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise InvalidArgumentError(
            f"--catalog={module!r}: cannot import it ({exc}); give a dotted module path "
            "importable from the current environment, e.g. reference_models.catalog") from None
    except Exception as exc:  # noqa: BLE001 - the user's module is broken: say so, exit 2
        raise InvalidArgumentError(
            f"--catalog={module!r}: importing it raised {type(exc).__name__}: {exc}") from None
    cases: Iterable[Any] | None = getattr(mod, "CASES", None)
    if cases is None and callable(getattr(mod, "cases", None)):
        try:
            cases = mod.cases()
        except Exception as exc:  # noqa: BLE001
            raise InvalidArgumentError(
                f"--catalog={module!r}: cases() raised {type(exc).__name__}: {exc}") from None
    if cases is None:
        raise InvalidArgumentError(
            f"--catalog={module!r}: the module defines neither CASES nor cases()")
    cases = list(cases)
    if not cases:
        raise InvalidArgumentError(
            f"--catalog={module!r}: the catalog is empty; an empty kill matrix proves nothing")
    for i, case in enumerate(cases):
        if not isinstance(case, Case):
            raise InvalidArgumentError(
                f"--catalog={module!r}: entry {i} is a {type(case).__name__}, not an invariants.Case")
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise InvalidArgumentError(f"--catalog={module!r}: duplicate case id {case.id!r}")
        seen.add(case.id)
    return cases
