"""Staged activation, FiLM fallback and weight EMA invariants (SPEC seed 001: S1-S3, S5, S6).

A *staged* module is present in the architecture from epoch 0 but must leave
the model's output untouched until its start epoch.  The checks take plain
callables, not our reference classes:

* ``staged(epoch, *inputs)``  – the model with the module, told the epoch;
* ``without(epoch, *inputs)`` – the same model (same weights) without that
  module (for a context injector: with its FiLM fallback), told the same epoch,
  so other staged modules with other start epochs behave alike on both sides.

Before the start the comparison is exact (bit equality): a skipped module, a
zero delta or an identity FiLM change nothing, so any difference is the module
leaking in.  From the start on the module must change the output beyond the
dtype tolerance "for generic inputs": give it random weights and random inputs
(a module whose own init is zero, like a zero-init LoRA B, contributes nothing
at its start by design; see docs/staged_modules.md).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from hypothesis import strategies as st
from torch import nn

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import require, require_finite, require_in_unit_interval, require_tensor
from invariants._tolerances import tolerance_for

__all__ = [
    "assert_film_identity_at_init",
    "assert_stage_schedule_honoured",
    "assert_staged_module_active_from_start",
    "assert_staged_module_identity_before_start",
    "assert_weight_ema_tracks_weights",
    "start_epochs",
    "weight_histories",
]


# ------------------------------------------------------------------ helpers
#: Epochs beyond this are refused: S1 runs the model once per epoch before the start.
MAX_EPOCH = 10 ** 6


def _require_epoch(name: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, value,
            "must be an integer epoch >= 0")
    require(value <= MAX_EPOCH, name, value, f"must be an integer epoch <= {MAX_EPOCH:.0e}")


def _call(name: str, fn: Callable[..., Any], epoch: int, inputs: tuple) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = fn(epoch, *inputs)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(
            f"{name}: calling it as {name}(epoch={epoch}, *inputs) failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    require_tensor(f"{name}(epoch={epoch}, *inputs)", out)
    require(out.numel() > 0, f"{name}(epoch={epoch}, *inputs).shape", tuple(out.shape),
            "must be non-empty (comparing no element proves nothing); pass non-empty inputs")
    if out.is_floating_point() or out.is_complex():
        bad = ~torch.isfinite(out.detach())
        if bool(bad.any()):
            index = tuple(int(i) for i in torch.nonzero(bad)[0])
            where = (f"{int(bad.sum())} of {out.numel()} output elements at epoch {epoch} are "
                     f"non-finite (first at {list(index)}: {out.detach()[index].item()!r})")
            if name == "without":  # the caller's yardstick, not the subject
                raise InvalidArgumentError(
                    f"without(epoch={epoch}, *inputs): {where}; the model without the module "
                    "must give finite outputs on these inputs")
            fail("finite outputs of the model with the staged module (inputs are finite)",
                 f"{name}: {where}",
                 hint="a NaN/inf output compares unequal (or equal) to anything; find where it "
                      "is produced before judging the staging")
    return out


def _pair(staged: Callable, without: Callable, epoch: int, inputs: tuple
          ) -> tuple[torch.Tensor, torch.Tensor]:
    y_with = _call("staged", staged, epoch, inputs)
    y_without = _call("without", without, epoch, inputs)
    if y_with.shape != y_without.shape:
        raise InvalidArgumentError(
            f"staged(...).shape={tuple(y_with.shape)} and without(...).shape="
            f"{tuple(y_without.shape)} at epoch={epoch}: the model with and without the module "
            "must map the inputs to the same shape")
    return y_with, y_without


def _epoch_list(epochs: Any) -> list:
    require(isinstance(epochs, (list, tuple, range)), "epochs", epochs,
            "must be a list of integer epochs")
    return list(epochs)


def _validate(staged: Any, without: Any, inputs: Any, start_epoch: Any) -> tuple:
    require(callable(staged), "staged", staged, "must be callable as staged(epoch, *inputs)")
    require(callable(without), "without", without, "must be callable as without(epoch, *inputs)")
    _require_epoch("start_epoch", start_epoch)
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    for i, value in enumerate(inputs):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            require_finite(f"inputs[{i}]", value)
    return inputs


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, device and bits (no NaN): equal under any tolerance, exact included."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device \
        and bool(torch.equal(a.detach(), b.detach()))


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if any element differs beyond the dtype table's tolerance (NaN vs number differs)."""
    tol = tolerance_for(a.dtype)
    if _bit_equal(a, b):
        return False
    a64, b64 = a.detach().double(), b.detach().double()
    close = (a64 - b64).abs() <= tol.atol + tol.rtol * b64.abs()
    close |= torch.isnan(a64) & torch.isnan(b64)
    return not bool(close.all())


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------ S1 / S2
@invariant_check("S1")
def assert_staged_module_identity_before_start(staged: Callable[..., torch.Tensor],
                                               without: Callable[..., torch.Tensor],
                                               inputs: Any, *, start_epoch: int,
                                               epochs: Sequence[int] | None = None) -> None:
    """Assert ``staged(e, *inputs) == without(e, *inputs)`` bit for bit for every epoch e < start.

    Args:
      staged, without: see the module docstring; both run under ``no_grad``.
      inputs: a tuple of positional inputs (a single tensor is accepted).
      start_epoch: the module's configured start epoch (>= 1: at 0 there is no
        epoch before it and nothing to check).
      epochs: the epochs to check, all < start_epoch (default: every one).

    Raises:
      InvariantViolation: at the first epoch whose outputs differ, with the
        element report (count, worst index, values).
      InvalidArgumentError: for a negative or non-integer epoch, an epoch not
        before the start, a non-callable, non-finite inputs, differing shapes.
    """
    __tracebackhide__ = True
    inputs = _validate(staged, without, inputs, start_epoch)
    epochs = list(range(start_epoch)) if epochs is None else _epoch_list(epochs)
    require(len(epochs) > 0, "start_epoch", start_epoch,
            "has no epoch before it; identity-before-start needs start_epoch >= 1")
    for e in epochs:
        _require_epoch("epochs[...]", e)
        require(e < start_epoch, "epochs", epochs,
                f"must all lie before start_epoch={start_epoch}")
    for e in sorted(epochs):
        y_with, y_without = _pair(staged, without, e, inputs)
        tol = tolerance_for(y_with.dtype)
        report = None if _bit_equal(y_with, y_without) else compare_tensors(
            y_with, y_without, tol, what=f"output with vs without the module at epoch {e}",
            exact=True)
        if report:
            fail(f"the staged module to be an exact identity before start_epoch={start_epoch}",
                 f"epoch {e}: {report}",
                 hint="gate the module on `epoch >= start_epoch` (skip it, or fall back to "
                      "identity FiLM) instead of running it from epoch 0")


@invariant_check("S2")
def assert_staged_module_active_from_start(staged: Callable[..., torch.Tensor],
                                           without: Callable[..., torch.Tensor],
                                           inputs: Any, *, start_epoch: int,
                                           epochs: Sequence[int]) -> None:
    """Assert the module changes the output beyond tolerance at every given epoch >= start.

    Use generic (random) weights and inputs. The tolerance is the dtype
    table's, so a contribution lost in rounding does not count.

    Raises:
      InvariantViolation: at the first epoch where the output with the module
        equals the output without it (within tolerance), or is non-finite (NaN
        differs from everything, so it would otherwise read as "active").
      InvalidArgumentError: for an empty ``epochs``, an epoch before the start,
        a negative start, a non-callable, non-finite inputs, differing shapes.
    """
    __tracebackhide__ = True
    inputs = _validate(staged, without, inputs, start_epoch)
    epochs = _epoch_list(epochs)
    require(len(epochs) > 0, "epochs", epochs, "must name at least one epoch >= start_epoch")
    for e in epochs:
        _require_epoch("epochs[...]", e)
        require(e >= start_epoch, "epochs", epochs,
                f"must all lie at or after start_epoch={start_epoch}")
    for e in sorted(epochs):
        y_with, y_without = _pair(staged, without, e, inputs)
        tol = tolerance_for(y_with.dtype)
        if not _differs(y_with, y_without):
            fail(f"the staged module to contribute from start_epoch={start_epoch} on",
                 f"epoch {e}: output with the module equals the output without it "
                 f"(max |difference| {_max_abs(y_with, y_without):.3g}, within "
                 f"rtol={tol.rtol:g}, atol={tol.atol:g})",
                 hint="the staging flag never turns on, or the module's contribution is "
                      "multiplied by zero; check the flag is recomputed each epoch")


# ------------------------------------------------------------------ S3
@invariant_check("S3")
def assert_film_identity_at_init(film: Callable[..., torch.Tensor], x: torch.Tensor,
                                 *context: Any) -> None:
    """Assert a freshly initialised FiLM layer returns ``x`` bit for bit: γ = 1, β = 0.

    Args:
      film: called as ``film(x, *context)``; for a FiLM whose γ, β are predicted
        from a context, pass the context too — identity must hold for any one.
      x: a finite input.

    Raises:
      InvariantViolation: if any element of ``film(x, *context)`` differs from ``x``.
      InvalidArgumentError: if ``film`` is not callable, ``x`` is not finite,
        or the output shape differs from ``x``'s.
    """
    __tracebackhide__ = True
    require(callable(film), "film", film, "must be callable as film(x, *context)")
    require_finite("x", x)
    require(x.numel() > 0, "x.shape", tuple(x.shape), "must be non-empty (an identity on no "
            "element proves nothing)")
    for i, c in enumerate(context):
        if isinstance(c, torch.Tensor) and c.is_floating_point():
            require_finite(f"context[{i}]", c)
    try:
        with torch.no_grad():
            y = film(x, *context)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InvalidArgumentError(
            f"film: calling it as film(x (shape {tuple(x.shape)}, {x.dtype}), *context) failed "
            f"({type(exc).__name__}: {first})") from None
    require_tensor("film(x, *context)", y)
    if y.shape != x.shape:
        raise InvalidArgumentError(
            f"film(x).shape={tuple(y.shape)} and x.shape={tuple(x.shape)}: FiLM must keep the shape")
    tol = tolerance_for(x.dtype)
    report = None if _bit_equal(y, x) else compare_tensors(y, x, tol, what="film(x) vs x",
                                                           exact=True)
    if report:
        fail("FiLM to be the identity at initialisation (γ = 1, β = 0)", report,
             hint="initialise the γ/β projection to zero and add 1 to γ "
                  "(γ = 1 + W_γ·c, β = W_β·c with W = 0), not randomly")


# ------------------------------------------------------------------ S5
def _snapshot(read: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    weights = read()
    require(isinstance(weights, Mapping) and len(weights) > 0, "read()", weights,
            "must return a non-empty mapping name -> EMA tensor")
    for k, v in weights.items():
        require_tensor(f"read()[{k!r}]", v)
    return {k: v.detach().clone() for k, v in weights.items()}


@invariant_check("S5")
def assert_weight_ema_tracks_weights(model: nn.Module, update: Callable[[], Any],
                                     read: Callable[[], Mapping[str, torch.Tensor]],
                                     history: Sequence[Mapping[str, torch.Tensor]], *,
                                     decay: float | None) -> None:
    """Assert the EMA follows ema_t = d·ema_{t-1} + (1−d)·w_t through a weight history.

    The check writes each ``history[t]`` into ``model``'s parameters (by name,
    under ``no_grad``), calls ``update()`` as a training loop would after an
    optimizer step, and reads the EMA with ``read()``.  At every step it checks,
    in this order: the recursion (dtype-table tolerance; skipped when ``decay``
    is None), when every w_t so far equals ema_0 that the EMA of that constant
    stays the constant, and that the EMA stays in the convex hull of
    {ema_0, w_1..w_t} elementwise.  The last two hold for any decay schedule in
    [0, 1] (warm-up, a first update that copies), so ``decay=None`` checks an
    EMA whose per-step decay is not a constant.  The model's parameters are
    restored afterwards.

    Args:
      model: the live model the EMA shadows.
      update: zero-argument callable performing one EMA update.
      read: zero-argument callable returning name -> EMA tensor for the
        parameters named in ``history`` (more names are ignored).
      history: weights after each optimizer step, name -> tensor.
      decay: d in [0, 1], or None for "some decay in [0, 1] per step".

    Raises:
      InvariantViolation: naming the step, the parameter, the worst element.
      InvalidArgumentError: for a decay outside [0, 1], an empty history, a name
        not in the model or not read back, a shape mismatch, non-finite weights.
    """
    __tracebackhide__ = True
    require(isinstance(model, nn.Module), "model", model, "must be an nn.Module")
    require(callable(update), "update", update, "must be a zero-argument callable")
    require(callable(read), "read", read, "must be a zero-argument callable")
    if decay is not None:
        require_in_unit_interval("decay", decay)
    require(isinstance(history, Sequence) and len(history) > 0, "history", history,
            "must be a non-empty sequence of name -> tensor mappings")
    params = dict(model.named_parameters())
    names = list(history[0])
    for t, weights in enumerate(history):
        require(isinstance(weights, Mapping) and list(weights) == names, f"history[{t}]",
                weights, f"must map exactly the names {names}")
        for name, w in weights.items():
            require(name in params, f"history[{t}]", name, "is not a parameter of model")
            require_finite(f"history[{t}][{name!r}]", w)
            require(w.numel() > 0, f"history[{t}][{name!r}].shape", tuple(w.shape),
                    "must be non-empty (an EMA of no element proves nothing)")
            if w.shape != params[name].shape:
                raise InvalidArgumentError(
                    f"history[{t}][{name!r}].shape={tuple(w.shape)}: must match the "
                    f"parameter's shape {tuple(params[name].shape)}")
    saved = {n: params[n].detach().clone() for n in names}
    try:
        prev = _snapshot(read)
        for name in names:
            require(name in prev, "read()", sorted(prev), f"must contain {name!r}")
        ema0 = {n: prev[n].double() for n in names}
        lo = {n: ema0[n].clone() for n in names}
        hi = {n: ema0[n].clone() for n in names}
        constant = True
        for t, weights in enumerate(history, start=1):
            with torch.no_grad():
                for name, w in weights.items():
                    params[name].copy_(w)
            update()
            now = _snapshot(read)
            for name in names:
                w = params[name].detach().double()
                got = now[name]
                tol = tolerance_for(got.dtype)
                if decay is not None:
                    expected = decay * prev[name].double() + (1 - decay) * w
                    report = compare_tensors(got, expected.to(got.dtype), tol,
                                             what=f"ema[{name!r}] after update {t}")
                    if report:
                        fail(f"ema_t = d·ema_(t-1) + (1-d)·w_t with d={decay:g}",
                             f"step {t}: {report}",
                             hint="is the EMA update actually called (use_ema claimed on but "
                                  "the update disabled?), and does it use this decay?")
                constant = constant and bool(torch.equal(w, ema0[name]))
                if constant:
                    report = compare_tensors(got, ema0[name].to(got.dtype), tol,
                                             what=f"ema[{name!r}] of a constant, step {t}")
                    if report:
                        fail("the EMA of a constant to stay that constant", report)
                lo[name] = torch.minimum(lo[name], w)
                hi[name] = torch.maximum(hi[name], w)
                g = got.double()
                slack = tol.atol + tol.rtol * torch.maximum(lo[name].abs(), hi[name].abs())
                # NaN compares False with both bounds: a non-finite EMA is outside too
                outside = ~((g >= lo[name] - slack) & (g <= hi[name] + slack))
                if bool(outside.any()):
                    flat = int(torch.nonzero(outside.flatten())[0])
                    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), g.shape)) \
                        if g.dim() else ()
                    fail("the EMA to stay (finite) in the convex hull of its history "
                         "(ema_0, w_1..w_t)",
                         f"step {t}: ema[{name!r}]{list(idx)} = {float(g[idx]):.6g} outside "
                         f"[{float(lo[name][idx]):.6g}, {float(hi[name][idx]):.6g}] "
                         f"({int(outside.sum())} of {g.numel()} elements outside)")
            prev = now
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


# ------------------------------------------------------------------ S6
@invariant_check("S6")
def assert_stage_schedule_honoured(build: Callable[[Mapping[str, int]], Mapping[str, tuple]],
                                   starts: Mapping[str, int], inputs: Any, *,
                                   epochs: int) -> None:
    """Assert each configured start epoch is the epoch its module starts to act.

    Args:
      build: ``build(starts) -> {key: (staged, without)}``: builds the model
        from a config carrying ``starts`` (e.g. ``{"hpm_start_epoch": 4}``) and
        returns, for each key, the model and the same model without the module
        that key schedules (see the module docstring for the call convention).
      starts: config key -> start epoch (>= 0).
      inputs: positional inputs (generic: random weights and inputs).
      epochs: check epochs 0 .. epochs-1 (> every start, so "active" is seen).

    Raises:
      InvariantViolation: for the first key whose observed activity differs
        from ``epoch >= start``: says the configured start and the epochs the
        module was observed active.
      InvalidArgumentError: negative start epochs, ``epochs`` not beyond every
        start, ``build`` not callable or not returning a pair for every key.
    """
    __tracebackhide__ = True
    require(callable(build), "build", build, "must be callable as build(starts)")
    require(isinstance(starts, Mapping) and len(starts) > 0, "starts", starts,
            "must be a non-empty mapping config key -> start epoch")
    for key, value in starts.items():
        _require_epoch(f"starts[{key!r}]", value)
    require(isinstance(epochs, int) and not isinstance(epochs, bool)
            and max(starts.values()) < epochs <= MAX_EPOCH, "epochs", epochs,
            f"must be an integer > every start epoch ({max(starts.values())}) so the "
            f"module is seen both off and on, and <= {MAX_EPOCH:.0e}")
    subjects = build(dict(starts))
    require(isinstance(subjects, Mapping), "build(starts)", subjects,
            "must return a mapping key -> (staged, without)")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    cache: dict[tuple[int, int], torch.Tensor] = {}  # one model shared by several keys: run once

    def run(name: str, fn: Callable, e: int) -> torch.Tensor:
        if (id(fn), e) not in cache:
            cache[(id(fn), e)] = _call(name, fn, e, inputs)
        return cache[(id(fn), e)]

    for key, start in starts.items():
        require(key in subjects and len(subjects[key]) == 2, "build(starts)", sorted(subjects),
                f"must return a (staged, without) pair for {key!r}")
        staged, without = subjects[key]
        require(callable(staged) and callable(without), f"build(starts)[{key!r}]",
                subjects[key], "must be a pair of callables (staged, without)")
        active = []
        for e in range(epochs):
            y_with, y_without = run("staged", staged, e), run("without", without, e)
            if y_with.shape != y_without.shape:
                raise InvalidArgumentError(
                    f"staged(...).shape={tuple(y_with.shape)} and without(...).shape="
                    f"{tuple(y_without.shape)} for {key!r} at epoch={e}: must match")
            active.append(_differs(y_with, y_without))
        expected = [e >= start for e in range(epochs)]
        if active != expected:
            on = [e for e, a in enumerate(active) if a]
            first_bad = next(e for e in range(epochs) if active[e] != expected[e])
            fail(f"{key}={start} to be honoured: module off at epochs < {start}, on from {start}",
                 f"active at epochs {on or 'none'} of 0..{epochs - 1} (first disagreement at "
                 f"epoch {first_bad}); starts={dict(starts)}",
                 hint=f"is {key} read from the config but a hard-coded or other start used?")


# ------------------------------------------------------------ strategies
def start_epochs(*, min_epoch: int = 0, max_epoch: int = 8) -> st.SearchStrategy[int]:
    """Start epochs reaching both bounds, 1 and the seed's 3 and 5 when in range."""
    _require_epoch("min_epoch", min_epoch)
    if not (isinstance(max_epoch, int) and max_epoch >= min_epoch):
        raise InvalidArgumentError(f"Cannot have max_epoch={max_epoch!r} < min_epoch={min_epoch}")
    edges = sorted({v for v in (min_epoch, min_epoch + 1, 3, 5, max_epoch)
                    if min_epoch <= v <= max_epoch})
    return st.one_of(st.sampled_from(edges), st.integers(min_epoch, max_epoch))


@st.composite
def _histories(draw, shape, dtype, min_length, max_length, max_magnitude):
    length = draw(st.integers(min_length, max_length))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["random", "constant", "step", "tiny"]))
    scale = {"random": max_magnitude, "constant": max_magnitude, "step": max_magnitude,
             "tiny": 1e-6}[kind]
    base = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    out = []
    for t in range(length):
        if kind == "constant":
            w = base
        elif kind == "step":
            w = base if t < length // 2 else -base
        else:
            w = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        out.append(w.to(dtype))
    return kind, out


def weight_histories(*, shape: tuple[int, ...] = (3,), dtype: torch.dtype = torch.float32,
                     min_length: int = 1, max_length: int = 8,
                     max_magnitude: float = 1.0) -> st.SearchStrategy:
    """(kind, [w_1..w_T]) weight histories: random, constant, a step change, tiny values.

    ``kind`` is printed in a counterexample; "constant" repeats one tensor.
    """
    require(isinstance(min_length, int) and min_length >= 1, "min_length", min_length,
            "must be an integer >= 1")
    if not (isinstance(max_length, int) and max_length >= min_length):
        raise InvalidArgumentError(
            f"Cannot have max_length={max_length!r} < min_length={min_length}")
    require(isinstance(max_magnitude, (int, float)) and math.isfinite(max_magnitude)
            and max_magnitude > 0, "max_magnitude", max_magnitude, "must be a finite number > 0")
    require(all(isinstance(s, int) and s >= 1 for s in shape), "shape", shape,
            "sides must be integers >= 1")
    return _histories(tuple(shape), dtype, min_length, max_length, float(max_magnitude))
