"""Shared machinery of every ``assert_<subject>_<predicate>`` check.

One decorator gives all checks the same voice: the message starts with
``[<SPEC id>] <check name>:``, a caller's ``custom_message`` is appended, and
pytest hides the wrapper frames from tracebacks.  ``fail`` builds the message
from an expectation and an observation, ``compare_tensors`` does the
assert_close-style element report (how many mismatched, worst index, tolerance).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

from invariants._errors import InvariantViolation
from invariants._validate import require_same_shape
from invariants._tolerances import Tolerance

__all__: list[str] = []

F = TypeVar("F", bound=Callable[..., Any])


def invariant_check(spec_id: str | None) -> Callable[[F], F]:
    """Decorate a check: message prefix, ``custom_message`` hook, hidden frames."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, custom_message: str | None = None, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            try:
                return fn(*args, **kwargs)
            except InvariantViolation as exc:
                prefix = f"[{spec_id}] {fn.__name__}: " if spec_id else f"{fn.__name__}: "
                text = str(exc)
                if not text.startswith("["):
                    text = prefix + text
                if custom_message:
                    text = f"{text}\n{custom_message}"
                raise InvariantViolation(text, spec_id=spec_id or exc.spec_id) from None

        wrapper.spec_id = spec_id  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def fail(expected: str, observed: str, *, hint: str | None = None) -> None:
    """Raise an InvariantViolation stating the expectation, then the observation."""
    __tracebackhide__ = True
    message = f"expected {expected}\n  observed: {observed}"
    if hint:
        message += f"\n  hint: {hint}"
    raise InvariantViolation(message)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def compare_tensors(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, *,
                    what: str, exact: bool = False, equal_nan: bool = False) -> str | None:
    """Return ``None`` if equal within ``tol`` (or bit-equal if ``exact``), else a report.

    The report says how many elements mismatched and what share, the greatest
    absolute and relative difference and where, and the tolerance allowed.
    NaN on either side is a mismatch (as in ``torch.testing.assert_close``): two
    modules that both output NaN have not been shown equal. ``equal_nan=True``
    accepts NaN at the same place on both sides. Equal infinities match.
    """
    require_same_shape(f"{what} (actual)", actual, f"{what} (expected)", expected)
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    if equal_nan:
        diff = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if exact:
        allowed = torch.zeros_like(diff)
        tol_text = "exact equality"
    else:
        allowed = tol.atol + tol.rtol * torch.where(torch.isinf(e), torch.zeros_like(e), e.abs())
        tol_text = f"rtol={tol.rtol:g}, atol={tol.atol:g}"
    bad = diff > allowed
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    flat = int(torch.argmax(torch.where(bad, diff, torch.full_like(diff, -1.0))))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) \
        if diff.dim() else ()
    rel = diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    total = diff.numel()
    n_nan = int((torch.isnan(a) | torch.isnan(e)).sum())
    nan_note = f"; {n_nan} element(s) are NaN (NaN never matches)" if n_nan and not equal_nan \
        else ""
    return (f"{what}: {n_bad} / {total} elements ({100.0 * n_bad / total:.1f}%) differ "
            f"beyond {tol_text}; greatest absolute difference {_fmt(float(diff.max()))} "
            f"at index {index} (actual {_fmt(float(a[index]))}, expected "
            f"{_fmt(float(e[index]))}); greatest relative difference "
            f"{_fmt(float(rel[bad].max()))}{nan_note}")
