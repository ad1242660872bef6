"""Cases and the kill matrix.

A ``Case`` pairs a subject (a factory building the thing under test) with a
check (a callable that raises ``InvariantViolation`` when the invariant fails,
usually a Hypothesis property) and says what must happen:

* ``holds``   – a fixed variant: the check must pass;
* ``caught``  – a broken variant: the check must fail, or the invariant has no teeth;
* ``refuted`` – a seed's claim the harness disproves (SPEC L5): the check of the
  claim must fail, and the counterexample is the evidence.

``run_case`` turns a case into an ``Outcome``; ``invariants check`` and the
pytest kill-matrix test both call it, so they cannot disagree. ``run_cases`` runs a
whole catalog for ``invariants check``: one case after another, or over forked worker
processes (``jobs``), with outcomes always in catalog order, and with the garbage
collector told that what exists between cases is long-lived (see ``_between_cases``).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import multiprocessing
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator, Sequence

from invariants._errors import InvalidArgumentError, InvariantViolation

__all__ = ["Case", "Outcome", "load_catalog", "run_case", "run_cases"]

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


# ------------------------------------------------------------------ a whole catalog
@contextlib.contextmanager
def _long_lived_heap() -> Iterator[Callable[[], None]]:
    """Freeze what exists now for the garbage collector; yield ``between_cases``.

    A full collection walks every tracked object: with torch, sympy (imported by torch on
    first use) and Hypothesis loaded that is ~350,000 objects, ~0.1-0.2 s a walk, and the
    generational thresholds trigger one every second or two of a catalog (measured: 1.8 s of
    GC in a 17 s catalog). Objects alive before and between cases (modules, the catalog,
    Hypothesis's caches) live on anyway: ``between_cases`` collects what the last case left
    (a walk over that case's survivors only) and freezes the rest, so no later walk visits
    it again (0.6 s of GC for the same catalog). Nothing cyclic is leaked: every case's
    garbage is collected before its survivors are frozen. The freeze is undone on exit
    unless the caller had frozen objects itself.
    """
    ours = gc.get_freeze_count() == 0
    gc.freeze()

    def between_cases() -> None:
        gc.collect()
        gc.freeze()

    try:
        yield between_cases
    finally:
        if ours:
            gc.unfreeze()


def _why_not_fork() -> str | None:
    """Why forked workers would be unsafe here (None: safe)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork"
    if threading.active_count() > 1:  # a lock held by another thread stays held in the child
        return "the process runs other threads"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # CUDA cannot be used after fork
        return "CUDA is initialised"
    return None


def _worker(conn: Any, cases: Sequence[Case]) -> None:
    """A forked worker: run the case index received, send back its outcome, until None."""
    with _long_lived_heap() as between_cases:
        while (index := conn.recv()) is not None:
            o = run_case(cases[index])
            conn.send((index, o.outcome, o.ok, o.counterexample, o.detail, o.seconds))
            between_cases()
    conn.close()


def _run_forked(cases: Sequence[Case], jobs: int, report: Callable[[int, Outcome], None]
                ) -> None:
    """Run ``cases`` over ``jobs`` forked workers, each taking the next case when it is free.

    A worker that dies takes only its case in flight with it (reported as an error); the
    others run the rest.
    """
    ctx = multiprocessing.get_context("fork")
    if "torch" in sys.modules:
        # torch imports torch._dynamo (~1.2 s CPU, with sympy) on the first call of anything it
        # wraps in torch._disable_dynamo: torch.manual_seed, an optimizer step, checkpoint.
        # Imported once here, the workers share it instead of each importing it again.
        importlib.import_module("torch._dynamo")
    sys.stdout.flush()  # a child flushing an inherited buffer would print it twice
    sys.stderr.flush()
    pending = deque(range(len(cases)))
    procs = []
    busy: dict[Any, tuple[Any, int]] = {}  # connection -> (its process, the case in flight)

    def died(conn: Any, proc: Any, index: int | None) -> None:
        conn.close()
        proc.join()
        if index is not None:
            report(index, Outcome(cases[index], "error", False, None,
                                  f"the worker process running this case died (exit code "
                                  f"{proc.exitcode})", 0.0))

    def dispatch(conn: Any, proc: Any) -> None:
        """Give the worker the next case, or tell it to stop."""
        index = pending.popleft() if pending else None
        try:
            conn.send(index)
        except OSError:  # it died between two cases: the case goes back in the queue
            if index is not None:
                pending.appendleft(index)
            died(conn, proc, None)
            return
        if index is None:
            conn.close()
        else:
            busy[conn] = (proc, index)

    try:
        for _ in range(jobs):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child_end, cases),
                               name="invariants-check-worker")
            proc.start()
            child_end.close()
            procs.append(proc)
            dispatch(parent_end, proc)
        while busy:
            ready = set(wait(list(busy) + [proc.sentinel for proc, _ in busy.values()]))
            for conn in [c for c, (proc, _) in busy.items() if {c, proc.sentinel} & ready]:
                proc, index = busy.pop(conn)
                try:
                    result = conn.recv()
                except EOFError:
                    died(conn, proc, index)
                    continue
                report(result[0], Outcome(cases[result[0]], *result[1:]))
                dispatch(conn, proc)
        for index in pending:  # left only if every worker died
            report(index, Outcome(cases[index], "error", False, None,
                                  "not run: every worker process died", 0.0))
    finally:
        for conn, (proc, _) in busy.items():  # interrupted: stop the workers
            proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def run_cases(cases: Sequence[Case], *, jobs: int = 1,
              on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every case; return the outcomes in catalog order.

    ``jobs`` > 1 runs them over that many forked worker processes (each takes the next
    case when it is free) when forking is safe here: no other thread, CUDA not
    initialised, a platform that forks; otherwise, and for ``jobs=1``, one after another
    in this process. Verdicts and counterexamples do not depend on it: Hypothesis draws
    each property's examples from that property's own derandomized seed, and the cases
    seed every RNG they use. ``on_outcome`` is called in catalog order as outcomes arrive.
    """
    outcomes: list[Outcome | None] = [None] * len(cases)
    reported = 0

    def report(index: int, outcome: Outcome) -> None:
        nonlocal reported
        outcomes[index] = outcome
        while reported < len(cases) and outcomes[reported] is not None:
            if on_outcome is not None:
                on_outcome(outcomes[reported])  # type: ignore[arg-type]
            reported += 1

    jobs = min(jobs, len(cases))
    if jobs > 1 and _why_not_fork() is None:
        _run_forked(cases, jobs, report)
    else:
        with _long_lived_heap() as between_cases:
            for index, case in enumerate(cases):
                report(index, run_case(case))
                between_cases()
    return [o for o in outcomes if o is not None]


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
