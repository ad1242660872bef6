"""LoRA initialisation invariants (SPEC seed 003, L1-L7).

Every check takes modules or callables the caller built, not our reference
classes: a (base, adapted) pair of ``nn.Module``s with the same input/output
shapes (a transformers model's output is read through its ``.logits``), the
adapter's two factor tensors where a bound needs them, and plain callables for
schedules and merges.  Inputs must be finite: with B = 0 an infinite input gives
NaN in the adapter path (0 * inf), and an input so large that x @ A overflows
does too (docs/lora_init.md).

The train-mode RNG stream (L1) and the rounding bounds from the summands (L1
``exact=False``, L6) are ``_lora_passes``'s contracts; docs/lora_init.md states
them with measurements.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._lora_passes import (L1_ROUNDINGS, L6_ROUNDINGS, adapter_path, base_is_stochastic,
                                     bound_report, coefficient, magnitude, mode, outputs,
                                     require_input, run, same_shape, train_outputs)
from invariants._strategies import LoraConfig
from invariants._tolerances import tolerance_for
from invariants._validate import (require, require_bool, require_finite, require_module,
                                  require_non_negative, require_nonempty, require_positive,
                                  require_schedule_steps, require_tensor)

__all__ = [
    "LoraSpec",
    "assert_adapter_contribution_negligible",
    "assert_adapter_delta_within_bound",
    "assert_adapter_gradients_flow_at_init",
    "assert_adapter_identity_at_init",
    "assert_adapter_kl_zero",
    "assert_merge_roundtrip",
    "assert_scale_schedule_progressive",
]


# The public name for one adapted layer's shape and hyper-parameters: ``LoraConfig`` (kept as
# an alias, the same class) clashes with ``peft.LoraConfig`` in a test that imports both.
LoraSpec = LoraConfig


# ---------------------------------------------------------------------------- L1
@invariant_check("L1")
def assert_adapter_identity_at_init(base: Any, adapted: Any, x: torch.Tensor, *,
                                    train: bool = True, exact: bool = True,
                                    rtol: float | None = None,
                                    atol: float | None = None) -> None:
    """Assert ``adapted(x) == base(x)`` at initialisation: bit for bit, or within rounding.

    Args:
      base, adapted: modules (or callables) mapping ``x`` to tensors of one shape;
        a transformers model's output is read through ``.logits``.
      x: a finite input (features, or token ids for a whole language model).
      train: run both in train mode, as the first RL rollouts of seed 003 did. Both
        passes start from one RNG seed, and the randomness drawn inside modules only
        ``adapted`` has (its ``lora_dropout``) is drawn off that stream, so a base with
        its own dropout sees the same masks in both passes (the caller's RNG is left
        alone).
      exact: True for a plain zero-init ``lora_B``, whose adapter adds exactly 0.0.
        False for inits that are the identity only up to rounding: PEFT's ``"pissa"``
        and ``"olora"`` rewrite the base weights to ``W - s·B·A``, and ``"orthogonal"``
        has ``B·A = 0`` only in exact arithmetic. Then the allowed difference is
        ``atol + c·(summands)`` (module docstring) with 8 roundings of the dtype's rtol.
      rtol, atol: override ``c`` and ``atol`` of that bound (``exact=False`` only).

    Raises:
      InvariantViolation: if an output element differs (exact) or exceeds the bound;
        the hint says whether the difference is rounding-sized (an init that rewrites
        the base) or not (``lora_B`` is not zero).
      InvalidArgumentError: non-finite ``x``, output shapes that differ, modules that
        are not callable, or a stochastic base whose passes cannot be aligned.
    """
    __tracebackhide__ = True
    require_module("base", base)
    require_module("adapted", adapted)
    require_input("x", x)
    require_bool("train", train)
    require_bool("exact", exact)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            require_non_negative(name, value)
            require(not exact, name, value, "applies only with exact=False (a rounding bound)")
    if train:
        y_base, y_adapted, same_draws = train_outputs(base, adapted, x)
    else:
        y_base, y_adapted = outputs(base, adapted, x, train=False)
        same_draws = True
    tol = tolerance_for(y_base.dtype)
    report = compare_tensors(y_adapted, y_base, tol, what="adapted(x) vs base(x)", exact=True)
    if report is None:  # bit-equal (NaN never is)
        return
    stochastic = train and base_is_stochastic(base, x, y_base)
    if stochastic and not same_draws:
        raise InvalidArgumentError(
            "train=True: undecidable for these modules: base is stochastic in train mode (two "
            "passes from different seeds differ: its own dropout), and adapted drew a different "
            "amount of randomness outside its adapter-only modules, so the two passes saw "
            "different dropout masks. Pass train=False, or set the base's dropout to 0")
    stream = (" (train mode: both passes from one RNG seed; the base is stochastic and its "
              "dropout masks matched)" if stochastic else "")
    coef = coefficient(y_base.dtype, x, L1_ROUNDINGS, rtol)
    rounding = bound_report(y_adapted, y_base, magnitude(y_base, adapter_path(adapted, x)),
                            coef, tol.atol if atol is None else atol, what="adapted(x) vs base(x)")
    if exact:
        hint = ("initialise lora_B (the up-projection) to zeros" if rounding else
                "the difference is rounding-sized (within the exact=False bound): an init "
                "that rewrites the base weights (PEFT pissa/olora) or has B·A = 0 only in exact "
                "arithmetic (PEFT orthogonal) is the identity up to rounding; pass exact=False. "
                "A plain zero-init lora_B is bit-exact")
        fail("the adapted module to reproduce the base output exactly at initialisation",
             report + stream, hint=hint)
    if rounding:
        fail("the adapted module to reproduce the base output within rounding at "
             "initialisation", rounding + stream,
             hint="beyond rounding: lora_B is not zero, or W_res + s·B·A does not rebuild W "
                  "(is the scale the one the init divided by?)")


# ---------------------------------------------------------------------------- L2
@invariant_check("L2")
def assert_adapter_kl_zero(base_lm: Any, adapted_lm: Any, tokens: torch.Tensor,
                           *, atol: float = 0.0) -> None:
    """Assert KL(base || adapted) of the next-token distributions is <= ``atol``.

    Both models map integer ``tokens`` of shape (B, T) to logits (B, T, V) (a
    transformers output is read through ``.logits``). The KL is taken per position;
    the worst position is reported. Eval mode.

    Raises:
      InvariantViolation: if the largest per-position KL exceeds ``atol``.
      InvalidArgumentError: non-integer, negative or out-of-vocabulary tokens, logits
        of different shapes.
    """
    __tracebackhide__ = True
    require_module("base_lm", base_lm)
    require_module("adapted_lm", adapted_lm)
    require_tensor("tokens", tokens)
    require_nonempty("tokens", tokens)
    require(not tokens.is_floating_point() and not tokens.is_complex()
            and tokens.dtype is not torch.bool, "tokens.dtype", tokens.dtype,
            "must be an integer dtype")
    require(tokens.dim() == 2, "tokens.shape", tuple(tokens.shape), "must be (batch, length)")
    require(int(tokens.min()) >= 0, "tokens.min()", int(tokens.min()),
            "must be >= 0 (token ids index the vocabulary)")
    require_non_negative("atol", atol)
    with torch.no_grad(), mode((base_lm, adapted_lm), False):
        logits_base = run("base_lm", base_lm, tokens)
        logits_adapted = run("adapted_lm", adapted_lm, tokens)
    same_shape(logits_base, logits_adapted, ("base_lm", "adapted_lm"))
    logp = torch.log_softmax(logits_base.double(), dim=-1)
    logq = torch.log_softmax(logits_adapted.double(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    worst = float(kl.max())
    if not worst <= atol:
        index = tuple(int(i) for i in torch.nonzero(kl == kl.max())[0]) \
            if not math.isnan(worst) else "(NaN)"
        fail(f"KL(base || adapted) <= {atol:g} at every position at initialisation",
             f"max KL {worst:.6g} nats at (batch, position) {index}; mean KL "
             f"{float(kl.mean()):.6g}",
             hint="a non-zero adapter at init shifts the next-token distribution; zero-init lora_B")


# ---------------------------------------------------------------------------- L3
@invariant_check("L3")
def assert_adapter_delta_within_bound(base: Any, adapted: Any, x: torch.Tensor, *,
                                      scale: float, lora_A: torch.Tensor,
                                      lora_B: torch.Tensor) -> None:
    """Assert ‖adapted(x)_i − base(x)_i‖ ≤ scale·‖B‖₂·‖A‖₂·‖x_i‖ for every row i.

    ``lora_A`` and ``lora_B`` are the adapter's two factors in any orientation
    (spectral norms do not depend on it). Evaluated in eval mode: inverted
    dropout rescales by 1/(1-p) and is not covered by this bound. The bound
    goes to zero with the scale, which is the seed's "tiny scale" claim made exact.

    Raises:
      InvariantViolation: for the row with the greatest excess over its bound.
      InvalidArgumentError: negative scale, factors that are not finite matrices.
    """
    __tracebackhide__ = True
    require_module("base", base)
    require_module("adapted", adapted)
    require_non_negative("scale", scale)
    for name, factor in (("lora_A", lora_A), ("lora_B", lora_B)):
        require_tensor(name, factor)
        require_nonempty(name, factor)
        require(factor.dim() == 2, f"{name}.shape", tuple(factor.shape), "must be a matrix")
        require_finite(name, factor.detach())
    require_input("x", x)
    require(x.dim() >= 1, "x.shape", tuple(x.shape), "must have a feature dimension")
    y_base, y_adapted = outputs(base, adapted, x, train=False)
    tol = tolerance_for(y_base.dtype)
    spec = float(torch.linalg.matrix_norm(lora_A.detach().double(), ord=2)) * \
        float(torch.linalg.matrix_norm(lora_B.detach().double(), ord=2))
    delta = (y_adapted.double() - y_base.double()).flatten(0, -2).norm(dim=-1)
    x_norm = x.double().flatten(0, -2).norm(dim=-1)
    y_norm = y_base.double().flatten(0, -2).norm(dim=-1)
    bound = scale * spec * x_norm
    allowed = bound * (1 + 8 * tol.eps) + tol.rtol * y_norm + tol.atol
    excess = delta - allowed
    excess = torch.where(torch.isnan(excess), torch.full_like(excess, math.inf), excess)  # NaN fails
    if bool((excess > 0).any()):
        i = int(torch.argmax(excess))
        fail(f"‖Δy_i‖ <= scale·‖B‖₂·‖A‖₂·‖x_i‖ with scale={scale:g}, ‖A‖₂·‖B‖₂={spec:.6g}",
             f"row {i}: ‖Δy‖={float(delta[i]):.6g} > bound {float(bound[i]):.6g} "
             f"(‖x_i‖={float(x_norm[i]):.6g}; allowed with {y_base.dtype} tolerance "
             f"{float(allowed[i]):.6g}); {int((excess > 0).sum())} of {excess.numel()} rows exceed",
             hint="the adapter output must scale linearly with `scale`; is the scale applied?")


# ---------------------------------------------------------------------------- L4
@invariant_check("L4")
def assert_scale_schedule_progressive(schedule: Callable[[int], float], *, total_steps: int,
                                      target: float) -> None:
    """Assert scale(0) == 0, non-decreasing, and scale(total_steps) == target.

    Every step 0..total_steps is evaluated, so ``total_steps`` is bounded by
    ``MAX_SCHEDULE_STEPS`` (10**6; ~0.3 s for a plain function).

    Args:
      schedule: step -> adapter scale.
      total_steps: the step at which the target must be reached (1..MAX_SCHEDULE_STEPS).
      target: the final scale (> 0).

    Raises:
      InvariantViolation: naming the first step that breaks the rule.
      InvalidArgumentError: a bool or out-of-range total_steps, a non-number scale.
    """
    __tracebackhide__ = True
    require(callable(schedule), "schedule", schedule, "must be callable step -> scale")
    require_schedule_steps("total_steps", total_steps)
    require_positive("target", target)
    values = []
    for step in range(total_steps + 1):
        value = schedule(step)
        try:
            values.append(float(value))
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(f"schedule({step})={value!r:.60}: must be a number") \
                from None
    if values[0] != 0.0:
        fail("scale(0) == 0 so the adapted model starts as the base model",
             f"scale(0) = {values[0]!r} (target {target!r})",
             hint="start the progressive schedule at zero")
    for step in range(1, total_steps + 1):
        if not values[step] >= values[step - 1]:
            fail("a non-decreasing scale schedule",
                 f"scale({step}) = {values[step]!r} < scale({step - 1}) = {values[step - 1]!r}")
    if not math.isclose(values[-1], target, rel_tol=1e-9, abs_tol=1e-12):
        fail(f"scale({total_steps}) == target {target!r}",
             f"scale({total_steps}) = {values[-1]!r}")


# ---------------------------------------------------------------------------- L5
@invariant_check("L5")
def assert_adapter_contribution_negligible(base: Any, adapted: Any,
                                           x: torch.Tensor, *, rel_tol: float = 1e-3) -> None:
    """Assert ‖adapted(x)_i − base(x)_i‖ <= rel_tol·‖x_i‖ for every row (eval mode).

    This is the seed's "near-zero initial contribution" claim for Option 4c,
    stated so it can be tested; the harness refutes it for that init.

    Raises:
      InvariantViolation: for the row with the largest ‖Δy_i‖/‖x_i‖ above ``rel_tol``.
      InvalidArgumentError: a non-positive rel_tol, a non-finite x.
    """
    __tracebackhide__ = True
    require_module("base", base)
    require_module("adapted", adapted)
    require_positive("rel_tol", rel_tol)
    require_input("x", x)
    y_base, y_adapted = outputs(base, adapted, x, train=False)
    delta = (y_adapted.double() - y_base.double()).flatten(0, -2).norm(dim=-1)
    x_norm = x.double().flatten(0, -2).norm(dim=-1)
    ratio = delta / x_norm.clamp_min(1e-300)
    ratio = torch.where(x_norm > 0, ratio, torch.where(delta > 0, math.inf, 0.0))
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)  # NaN fails
    i = int(torch.argmax(ratio))
    if float(ratio[i]) > rel_tol:
        fail(f"a near-zero adapter contribution, ‖Δy_i‖ <= {rel_tol:g}·‖x_i‖",
             f"row {i}: ‖Δy‖ = {float(delta[i]):.6g} = {float(ratio[i]):.4g}·‖x_i‖ "
             f"(‖x_i‖ = {float(x_norm[i]):.6g})",
             hint="B = -Aᵀ/scale with orthonormal A gives Δy = -x·A·Aᵀ, the projection of x "
                  "onto span(A): as large as x itself when x lies in that span")


# ---------------------------------------------------------------------------- L6
def _merge_hint(diff: torch.Tensor, adapter: torch.Tensor | None) -> str:
    """Name the cause when ``merged - unmerged`` is a multiple of the adapter term."""
    generic = "the merged weight must be W + scale·(B·A), folded in once"
    if adapter is None:
        return generic + " (pass base= to see whether the adapter term is what differs)"
    d, a = diff.double().flatten(), adapter.double().flatten()
    aa = float(a @ a)
    if aa == 0.0:
        return generic + "; the adapter term is 0 here, so the base path itself changed"
    c = float(d @ a) / aa
    if float((d - c * a).norm()) > 0.1 * float(d.norm()):
        return generic + "; the difference is not a multiple of the adapter term"
    k = 1 + c
    return (f"the merged layer computes base + {k:.3g}·adapter (1·adapter expected): "
            + ("the adapter was not folded in" if abs(k) < 1e-3 else
               f"the scale is applied {k:.3g} times (scale·B·A, folded in once)"))


@invariant_check("L6")
def assert_merge_roundtrip(layer: Any, x: torch.Tensor, *,
                           merge: Callable[[Any], None] | None = None,
                           unmerge: Callable[[Any], None] | None = None,
                           base: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           rtol: float | None = None, atol: float | None = None) -> None:
    """Assert merged output == unmerged output, and unmerge restores the output (eval mode).

    ``merge``/``unmerge`` default to ``layer.merge()``/``layer.unmerge()`` (PEFT's
    method names). Merging rounds the weight, so the outputs agree up to rounding,
    which scales with the summands: the allowed difference per element is
    ``atol + c·(|b| + rms(b) + |a| + rms(a))`` with ``b = base(x)`` (the base path,
    read before merging), ``a = layer(x) - b`` (the adapter path) and
    ``c = 2·rtol + 4·eps_acc·sqrt(x.shape[-1])`` from the dtype table (module
    docstring). ``base`` defaults to PEFT's ``layer.base_layer``; without one the
    summands are unknown and ``b = layer(x)``, ``a = 0``. ``rtol``/``atol`` replace
    ``c`` and ``atol``. Measured on PEFT merges (docs/lora_init.md): the worst
    rounding is under half the bound in float32, bfloat16 and float16 at inputs ~1 and
    ~1e3, while a merge that applies the scale twice (or forgets it) is caught.

    Raises:
      InvariantViolation: saying which of the two comparisons failed and where; the
        hint names the multiple of the adapter term the merged layer computes.
      InvalidArgumentError: a layer without merge/unmerge and none given, non-callables.
    """
    __tracebackhide__ = True
    require_module("layer", layer)
    require_input("x", x)
    for name, fn in (("merge", merge), ("unmerge", unmerge)):
        if fn is None:
            require(callable(getattr(layer, name, None)), "layer", layer,
                    f"has no {name}() method: pass {name}=callable(layer) (PEFT's LoRA layers "
                    "have merge() and unmerge())")
        else:
            require(callable(fn), name, fn, "must be callable(layer)")
    if base is None and isinstance(getattr(layer, "base_layer", None), nn.Module):
        base = layer.base_layer
    if base is not None:
        require_module("base", base)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            require_non_negative(name, value)
    merge = merge or (lambda m: m.merge())
    unmerge = unmerge or (lambda m: m.unmerge())
    with torch.no_grad(), mode((layer,), False):
        before = run("layer", layer, x).clone()
        y_base = run("base", base, x).clone() if base is not None else None
        merge(layer)
        merged = run("layer (merged)", layer, x).clone()
        unmerge(layer)
        after = run("layer (unmerged)", layer, x).clone()
    for name, y in (("layer (merged)", merged), ("layer (unmerged)", after)):
        same_shape(before, y, ("layer", name))
    adapter = None
    if y_base is not None:
        same_shape(before, y_base, ("layer", "base"))
        adapter = before.double() - y_base.double()
    scale = magnitude(before if y_base is None else y_base, adapter)
    coef = coefficient(before.dtype, x, L6_ROUNDINGS, rtol)
    atol = tolerance_for(before.dtype).atol if atol is None else atol
    report = bound_report(merged, before, scale, coef, atol, what="merged vs unmerged output")
    if report:
        fail("the merged layer to compute the same output as the unmerged one", report,
             hint=_merge_hint(merged.double() - before.double(), adapter))
    report = bound_report(after, before, scale, coef, atol,
                           what="output after merge+unmerge vs before")
    if report:
        fail("merge then unmerge to restore the layer's output", report,
             hint="unmerge must subtract exactly the delta merge added")


# ---------------------------------------------------------------------------- L7
@invariant_check("L7")
def assert_adapter_gradients_flow_at_init(adapted: Any, x: torch.Tensor, *,
                                          lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Assert at zero-init: dL/dA is exactly zero and dL/dB is not (learning can start).

    The loss is a fixed random projection of the output (seeded generator), so
    no coincidental cancellation hides the gradient. Eval mode (no dropout).

    Raises:
      InvariantViolation: if dL/dA has a non-zero element, or dL/dB is all zero.
      InvalidArgumentError: if x is all zero (then dL/dB is zero for any init).
    """
    __tracebackhide__ = True
    require_module("adapted", adapted)
    require_input("x", x)
    require(bool((x != 0).any()), "x", x,
            "must have a non-zero element: for x = 0 the gradient w.r.t. B is zero for any init")
    for name, p in (("lora_A", lora_A), ("lora_B", lora_B)):
        require(isinstance(p, torch.Tensor) and p.requires_grad, name, p,
                "must be a parameter tensor of `adapted` that requires grad")
    saved = (lora_A.grad, lora_B.grad)
    lora_A.grad, lora_B.grad = None, None
    try:
        with mode((adapted,), False):
            y = run("adapted", adapted, x)
            gen = torch.Generator().manual_seed(0)
            weights = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
            (y * weights).sum().backward()
        grad_a, grad_b = lora_A.grad, lora_B.grad
    finally:
        lora_A.grad, lora_B.grad = saved
    if grad_b is None or grad_a is None:
        fail("gradients to reach both adapter factors",
             f"grad(lora_A) is {'None' if grad_a is None else 'set'}, grad(lora_B) is "
             f"{'None' if grad_b is None else 'set'}",
             hint="are lora_A and lora_B the parameters that `adapted` actually uses?")
    nz_a = int(torch.count_nonzero(grad_a))
    if nz_a:
        fail("dL/dA == 0 exactly at zero-init (B = 0 blocks it)",
             f"{nz_a} of {grad_a.numel()} elements of dL/dA are non-zero (max |g| "
             f"{float(grad_a.abs().max()):.3g}); B is not zero at init")
    if int(torch.count_nonzero(grad_b)) == 0:
        fail("dL/dB != 0 at zero-init so the adapter can start learning",
             "dL/dB is exactly zero: the adapter is dead (A and B both zero?)",
             hint="keep lora_A random; only lora_B starts at zero")
