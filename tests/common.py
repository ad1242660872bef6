"""Shared test bodies: per-system test files hold tables, this module holds what runs them.

* ``refusals(table)``: a bad-input table of ``(id, call, match)`` rows as pytest params;
  ``assert_refused(call, match)``: the one body every such table feeds (the call must raise
  ``InvalidArgumentError`` whose ``name=value`` message matches).
* ``with_nan(tensor, index)``: the same tensor with one element set to NaN (fault injection).
* ``edge_magnitudes(dtype)``: zero, the smallest normal and subnormal, one, and the largest
  finite value of ``dtype`` — the magnitudes strategies must reach and checks must survive.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import pytest
import torch

from invariants import InvalidArgumentError


def refusals(table: Sequence[tuple[str, Any, str]]) -> list:
    """``[(id, call, match), ...]`` as ``pytest.param(call, match, id=id)``."""
    return [pytest.param(call, match, id=name) for name, call, match in table]


def assert_refused(call: Callable[[], Any], match: str) -> None:
    """``call()`` raises InvalidArgumentError whose message matches ``match`` (a regex)."""
    __tracebackhide__ = True
    with pytest.raises(InvalidArgumentError, match=match):
        call()


def with_nan(tensor: torch.Tensor, index: int | tuple[int, ...] = 0) -> torch.Tensor:
    """A copy of ``tensor`` with one element (flat ``index`` or a multi-index) set to NaN."""
    out = tensor.detach().clone()
    if isinstance(index, int):
        out.view(-1)[index] = float("nan")
    else:
        out[index] = float("nan")
    return out


def edge_magnitudes(dtype: torch.dtype) -> list[float]:
    info = torch.finfo(dtype)
    return [0.0, float(info.smallest_normal) * info.eps, float(info.smallest_normal), 1.0,
            float(info.max)]
