"""Owns every argument check and its ``name=value`` message.

Each ``require_*`` raises ``InvalidArgumentError("name=value: problem")``; strategies'
``min_``/``max_`` pairs use ``require_ordered`` so every family speaks with one voice
(``Cannot have max_size=1 < min_size=3``), as hypothesis.extra.numpy does.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Sequence

from invariants._errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__: list[str] = []  # private: the public checks call these

# torch is imported where a check needs it, never at import: `invariants scan` (which shares
# `require`) runs without it. A value can only be a tensor once torch has been imported.


def _is_tensor(value: Any) -> bool:
    torch_mod = sys.modules.get("torch")
    return torch_mod is not None and isinstance(value, torch_mod.Tensor)


def _short(value: Any, limit: int = 80) -> str:
    if _is_tensor(value):
        text = f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(condition: bool, name: str, value: Any, problem: str) -> None:
    """Raise ``InvalidArgumentError("name=value: problem")`` unless ``condition``."""
    if not condition:
        raise InvalidArgumentError(f"{name}={_short(value)}: {problem}")


def _finite_number(value: Any) -> bool:
    """A real int or float that fits a float and is finite (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float, e.g. 10**400
        return False


def require_positive(name: str, value: float) -> None:
    require(_finite_number(value) and value > 0, name, value, "must be a finite number > 0")


def require_non_negative(name: str, value: float) -> None:
    require(_finite_number(value) and value >= 0, name, value, "must be a finite number >= 0")


def require_in_unit_interval(name: str, value: float) -> None:
    require(isinstance(value, (int, float)) and 0.0 <= value <= 1.0,
            name, value, "must lie in [0, 1]")


def require_tensor(name: str, value: Any) -> None:
    require(_is_tensor(value), name, value,
            f"must be a torch.Tensor, got {type(value).__name__}")


def require_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise unless every element of ``tensor`` is finite, naming the first bad one."""
    require_tensor(name, tensor)
    import torch
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            index = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise InvalidArgumentError(
                f"{name}={_short(tensor)}: must be finite, but {int(bad.sum())} of "
                f"{tensor.numel()} elements are not (first at index {index}: "
                f"{tensor[index].item()}); this invariant is stated for finite inputs only")


def require_nonempty(name: str, tensor: torch.Tensor) -> None:
    """Raise unless ``tensor`` has at least one element: an empty input checks nothing."""
    require_tensor(name, tensor)
    if tensor.numel() == 0:
        raise InvalidArgumentError(
            f"{name}.shape={tuple(tensor.shape)}: must be non-empty (an empty input would make "
            "the check pass without checking anything)")


def require_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise InvalidArgumentError(
            f"{name_a}.shape={tuple(a.shape)} and {name_b}.shape={tuple(b.shape)}: "
            "shapes must match")


def finite_number(value: Any) -> bool:
    """A real int or float that fits a float and is finite (bool is not a number here)."""
    return _finite_number(value)


def require_ordered(min_name: str, min_value: Any, max_name: str, max_value: Any, *,
                    strict: bool = False) -> None:
    """Raise ``Cannot have max_x=... < min_x=...`` unless ``min_value <= max_value``
    (``<`` with ``strict``); ``None`` on either side means unbounded."""
    if min_value is None or max_value is None:
        return
    if max_value < min_value or (strict and max_value == min_value):
        op = "<=" if strict else "<"
        raise InvalidArgumentError(
            f"Cannot have {max_name}={_short(max_value)} {op} {min_name}={_short(min_value)}")


def unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The multi-index of flat position ``flat`` in a row-major tensor of ``shape``."""
    if not shape:
        return ()
    import torch
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))


def require_patience(patience: Any) -> None:
    require(isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1,
            "patience", patience, "must be an integer >= 1 (checks without improvement "
            "before stopping)")


def require_min_delta(min_delta: Any) -> None:
    require(finite_number(min_delta) and min_delta >= 0, "min_delta", min_delta,
            "must be a finite number >= 0 (the improvement a new best must exceed)")


def require_max_norm(max_norm: Any) -> None:
    require(finite_number(max_norm) and max_norm > 0, "max_norm", max_norm,
            "must be a finite number > 0 (the cap on the total gradient norm)")


def require_scalar_tensor(name: str, value: Any) -> None:
    """Raise unless ``value`` is a real (int or float), one-element tensor that has data.

    Reads metadata only (dtype, device, shape), never the value: no host-device sync.
    """
    require_tensor(name, value)
    import torch
    ints = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    require(not value.is_complex(), name, value, "must be real, not a complex tensor")
    require(value.dtype is not torch.bool, name, value, "must be a number, not a bool tensor")
    require(value.dtype.is_floating_point or value.dtype in ints, name, value,
            "must be an int or float tensor")
    require(not value.is_meta, name, value, "is a meta tensor: it has no value to read")
    require(value.numel() == 1, name, value,
            f"must hold one value (a 0-d tensor), got {value.numel()} elements")


def require_sync_every(sync_every: Any) -> None:
    require(isinstance(sync_every, int) and not isinstance(sync_every, bool) and sync_every >= 1,
            "sync_every", sync_every, "must be an integer >= 1 (updates between host reads)")


def require_int(name: str, value: Any, *, minimum: int | None = None,
                maximum: int | None = None, why: str = "") -> None:
    """Raise unless ``value`` is an int (never a bool: ``True`` is not a step count) in
    ``[minimum, maximum]``; ``why`` is appended to the problem, e.g. what a maximum bounds."""
    bounds = ("" if minimum is None else f" >= {minimum}") + \
        ("" if maximum is None else f"{' and' if minimum is not None else ''} <= {maximum:_}")
    ok = isinstance(value, int) and not isinstance(value, bool) and \
        (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    require(ok, name, value, f"must be an integer{bounds}{why}")


def require_bool(name: str, value: Any) -> None:
    require(isinstance(value, bool), name, value, "must be True or False")


def require_module(name: str, value: Any) -> None:
    """Raise unless ``value`` is a ``torch.nn.Module`` or another callable (a model, a layer, a
    function ``x -> output``): a module's *name* (``"q_proj"``) is the usual mistake."""
    hint = " (a module's name, not the module? pass the nn.Module itself)" \
        if isinstance(value, str) else ""
    torch_mod = sys.modules.get("torch")   # an nn.Module exists only once torch is imported
    module = torch_mod is not None and isinstance(value, torch_mod.nn.Module)
    require(module or callable(value), name, value,
            f"must be an nn.Module or a callable, got {type(value).__name__}{hint}")


# A schedule check evaluates every step in Python: 10**6 steps take ~0.3 s for a plain function
# and ~3.5 s for a torch LambdaLR (measured, 2-core CPU). A larger count is refused rather than
# left running (10**9 would run for hours); check a schedule's shape on a shorter run.
MAX_SCHEDULE_STEPS = 1_000_000


def require_schedule_steps(name: str, value: Any, *, minimum: int = 1) -> None:
    require_int(name, value, minimum=minimum, maximum=MAX_SCHEDULE_STEPS,
                why=" (every step is evaluated; check the shape on a shorter schedule)")
