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

import numpy as np
import torch
from hypothesis.vendor import pretty as _hypothesis_pretty

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


# torch dtypes numpy has no type for: printed through float32, which holds them exactly
_WIDEN = {torch.bfloat16: torch.float32}


def tensor_repr(tensor: torch.Tensor) -> str:
    """``torch.tensor([...], dtype=...)`` rebuilding ``tensor`` exactly (up to 1000 elements).

    Every float is the shortest decimal that round-trips in the tensor's dtype (numpy's
    ``floatmode="unique"``; bfloat16 through float32, which holds it exactly). Larger tensors are
    summarised as numpy does ("..."): their shape and dtype are still exact.
    """
    t = tensor.detach().cpu()
    if t.is_complex() or t.is_quantized or t.layout != torch.strided:
        return repr(tensor)
    t = t.resolve_conj().resolve_neg()
    grad = ", requires_grad=True" if tensor.requires_grad else ""
    if t.numel() == 0:
        return f"torch.empty({tuple(t.shape)}, dtype={t.dtype}{grad})"
    array = t.to(_WIDEN.get(t.dtype, t.dtype)).numpy()
    body = np.array2string(array, separator=", ", floatmode="unique", max_line_width=10**9,
                           threshold=1000)
    body = " ".join(body.replace("nan", "float('nan')").replace("inf", "float('inf')").split())
    return f"torch.tensor({body}, dtype={t.dtype}{grad})"


def _pretty_tensor(obj: torch.Tensor, printer: Any, cycle: bool) -> None:
    printer.text(tensor_repr(obj))


def use_exact_tensor_printing() -> None:
    """Hypothesis prints tensors as ``tensor_repr`` (a ``torch.tensor(...)`` that rebuilds them
    bit for bit) from now on, in this process.

    Opt-in, never done at import: the pytest plugin calls it for a suite that opted in to the
    harness's profiles (``invariants_profile``), and ``load_profile`` (``invariants check``,
    benches, a user's own call) does. A suite that did not ask keeps Hypothesis's printing."""
    _hypothesis_pretty.for_type_by_name("torch", "Tensor", _pretty_tensor)


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
    total = diff.numel()
    n_nan = int((torch.isnan(a) | torch.isnan(e)).sum())
    nan_note = f"; {n_nan} element(s) are NaN (NaN never matches)" if n_nan and not equal_nan \
        else ""
    return (f"{what}: {n_bad} / {total} elements ({100.0 * n_bad / total:.1f}%) differ "
            f"beyond {tol_text}; greatest absolute difference {_fmt(float(diff.max()))} "
            f"at index {index} (actual {_fmt(float(a[index]))}, expected "
            f"{_fmt(float(e[index]))}); {_relative_text(diff, e, bad)}{nan_note}")


def _relative_text(diff: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor) -> str:
    """The greatest relative difference over mismatches whose expected value is not 0; a
    relative difference against 0 is undefined (dividing by the smallest float printed
    4.99e+307), so those are counted instead."""
    nonzero = bad & (expected != 0)
    n_zero = int((bad & (expected == 0)).sum())
    zero_note = f"; {n_zero} mismatched element(s) expected exactly 0 (relative difference " \
                "undefined)" if n_zero else ""
    if not bool(nonzero.any()):
        return "relative difference undefined: every mismatched element expected 0"
    rel = diff[nonzero] / expected[nonzero].abs()
    return f"greatest relative difference {_fmt(float(rel.max()))}{zero_note}"
