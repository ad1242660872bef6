"""LoRA initialisation invariants (SPEC seed 003, L1-L7).

Every check takes modules or callables the caller built, not our reference
classes: a (base, adapted) pair of ``nn.Module``s with the same input/output
shapes, the adapter's two factor tensors where a bound needs them, and plain
callables for schedules and merges.  Inputs must be finite: with B = 0 an
infinite input gives NaN in the adapter path (0 * inf), and an input so large
that x @ A overflows does too — the zero-init identity is stated for finite
inputs whose adapter intermediate is finite (see docs/lora_init.md).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require, require_finite, require_non_negative,
                                  require_nonempty, require_positive, require_tensor)
from invariants._tolerances import tolerance_for

__all__ = [
    "assert_adapter_contribution_negligible",
    "assert_adapter_delta_within_bound",
    "assert_adapter_gradients_flow_at_init",
    "assert_adapter_identity_at_init",
    "assert_adapter_kl_zero",
    "assert_merge_roundtrip",
    "assert_scale_schedule_progressive",
]


@contextlib.contextmanager
def _mode(modules: tuple[nn.Module, ...], train: bool) -> Iterator[None]:
    saved = [m.training for m in modules]
    try:
        for m in modules:
            m.train(train)
        yield
    finally:
        for m, was in zip(modules, saved):
            m.train(was)


def _run(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    require(callable(module), name, module, "must be a callable module")
    try:
        return module(x)
    except RuntimeError as exc:
        raise InvalidArgumentError(
            f"{name}: calling it on x.shape={tuple(x.shape)}, x.dtype={x.dtype} failed "
            f"({str(exc).splitlines()[0]}); are the module shapes and dtype compatible?") from None


def _outputs(base: nn.Module, adapted: nn.Module, x: torch.Tensor, train: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    require_nonempty("x", x)
    require_finite("x", x)
    with torch.no_grad(), _mode((base, adapted), train):
        y_base = _run("base", base, x)
        y_adapted = _run("adapted", adapted, x)
    require_tensor("base(x)", y_base)
    require_tensor("adapted(x)", y_adapted)
    if y_base.shape != y_adapted.shape:
        raise InvalidArgumentError(
            f"base(x).shape={tuple(y_base.shape)} and adapted(x).shape="
            f"{tuple(y_adapted.shape)}: the base and adapted modules must map x to the same shape")
    return y_base, y_adapted


@invariant_check("L1")
def assert_adapter_identity_at_init(base: nn.Module, adapted: nn.Module, x: torch.Tensor,
                                    *, train: bool = True) -> None:
    """Assert ``adapted(x) == base(x)`` bit for bit (zero-initialised adapter).

    Args:
      base, adapted: modules mapping ``x`` to tensors of one shape.
      x: a finite input.
      train: run both modules in train mode (adapter dropout active), as the
        first RL rollouts of seed 003 did.

    Raises:
      InvariantViolation: if any output element differs (exact comparison).
      InvalidArgumentError: if ``x`` is not finite or the output shapes differ.
    """
    __tracebackhide__ = True
    y_base, y_adapted = _outputs(base, adapted, x, train)
    report = compare_tensors(y_adapted, y_base, tolerance_for(y_base.dtype),
                             what="adapted(x) vs base(x)", exact=True)
    if report:
        fail("the adapted module to reproduce the base output exactly at initialisation",
             report, hint="initialise lora_B (the up-projection) to zeros")


@invariant_check("L2")
def assert_adapter_kl_zero(base_lm: nn.Module, adapted_lm: nn.Module, tokens: torch.Tensor,
                           *, atol: float = 0.0) -> None:
    """Assert KL(base || adapted) of the next-token distributions is <= ``atol``.

    Both models map integer ``tokens`` of shape (B, T) to logits (B, T, V).
    The KL is taken per position; the worst position is reported.

    Raises:
      InvariantViolation: if the largest per-position KL exceeds ``atol``.
    """
    __tracebackhide__ = True
    require_nonempty("tokens", tokens)
    require(not tokens.is_floating_point(), "tokens.dtype", tokens.dtype, "must be an integer dtype")
    require(tokens.dim() == 2, "tokens.shape", tuple(tokens.shape), "must be (batch, length)")
    require_non_negative("atol", atol)
    with torch.no_grad(), _mode((base_lm, adapted_lm), False):
        logits_base = _run("base_lm", base_lm, tokens)
        logits_adapted = _run("adapted_lm", adapted_lm, tokens)
    if logits_base.shape != logits_adapted.shape:
        raise InvalidArgumentError(
            f"base_lm(tokens).shape={tuple(logits_base.shape)} and adapted_lm(tokens).shape="
            f"{tuple(logits_adapted.shape)}: must match")
    logp = torch.log_softmax(logits_base.double(), dim=-1)
    logq = torch.log_softmax(logits_adapted.double(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    worst = float(kl.max())
    if not worst <= atol:
        index = tuple(int(i) for i in torch.nonzero(kl == kl.max())[0])
        fail(f"KL(base || adapted) <= {atol:g} at every position at initialisation",
             f"max KL {worst:.6g} nats at (batch, position) {index}; mean KL "
             f"{float(kl.mean()):.6g}",
             hint="a non-zero adapter at init shifts the next-token distribution; zero-init lora_B")


@invariant_check("L3")
def assert_adapter_delta_within_bound(base: nn.Module, adapted: nn.Module, x: torch.Tensor, *,
                                      scale: float, lora_A: torch.Tensor,
                                      lora_B: torch.Tensor) -> None:
    """Assert ‖adapted(x)_i − base(x)_i‖ ≤ scale·‖B‖₂·‖A‖₂·‖x_i‖ for every row i.

    ``lora_A`` and ``lora_B`` are the adapter's two factors in any orientation
    (spectral norms do not depend on it). Evaluated in eval mode: inverted
    dropout rescales by 1/(1-p) and is not covered by this bound. The bound
    goes to zero with the scale, which is the seed's "tiny scale" claim made exact.

    Raises:
      InvariantViolation: for the row with the greatest excess over its bound.
    """
    __tracebackhide__ = True
    require_non_negative("scale", scale)
    for name, factor in (("lora_A", lora_A), ("lora_B", lora_B)):
        require_nonempty(name, factor)
        require(factor.dim() == 2, f"{name}.shape", tuple(factor.shape), "must be a matrix")
        require_finite(name, factor.detach())
    require(x.dim() >= 1, "x.shape", tuple(x.shape), "must have a feature dimension")
    y_base, y_adapted = _outputs(base, adapted, x, train=False)
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


@invariant_check("L4")
def assert_scale_schedule_progressive(schedule: Callable[[int], float], *, total_steps: int,
                                      target: float) -> None:
    """Assert scale(0) == 0, non-decreasing, and scale(total_steps) == target.

    Args:
      schedule: step -> adapter scale.
      total_steps: the step at which the target must be reached (>= 1).
      target: the final scale (> 0).

    Raises:
      InvariantViolation: naming the first step that breaks the rule.
    """
    __tracebackhide__ = True
    require(callable(schedule), "schedule", schedule, "must be callable step -> scale")
    require(isinstance(total_steps, int) and total_steps >= 1, "total_steps", total_steps,
            "must be an integer >= 1")
    require_positive("target", target)
    values = [float(schedule(step)) for step in range(total_steps + 1)]
    if values[0] != 0.0:
        fail("scale(0) == 0 so the adapted model starts as the base model",
             f"scale(0) = {values[0]:g} (target {target:g})",
             hint="start the progressive schedule at zero")
    for step in range(1, total_steps + 1):
        if not values[step] >= values[step - 1]:
            fail("a non-decreasing scale schedule",
                 f"scale({step}) = {values[step]:g} < scale({step - 1}) = {values[step - 1]:g}")
    if not math.isclose(values[-1], target, rel_tol=1e-9, abs_tol=1e-12):
        fail(f"scale({total_steps}) == target {target:g}",
             f"scale({total_steps}) = {values[-1]:g}")


@invariant_check("L5")
def assert_adapter_contribution_negligible(base: nn.Module, adapted: nn.Module,
                                           x: torch.Tensor, *, rel_tol: float = 1e-3) -> None:
    """Assert ‖adapted(x)_i − base(x)_i‖ <= rel_tol·‖x_i‖ for every row (eval mode).

    This is the seed's "near-zero initial contribution" claim for Option 4c,
    stated so it can be tested; the harness refutes it for that init.

    Raises:
      InvariantViolation: for the row with the largest ‖Δy_i‖/‖x_i‖ above ``rel_tol``.
    """
    __tracebackhide__ = True
    require_positive("rel_tol", rel_tol)
    y_base, y_adapted = _outputs(base, adapted, x, train=False)
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


@invariant_check("L6")
def assert_merge_roundtrip(layer: nn.Module, x: torch.Tensor, *,
                           merge: Callable[[nn.Module], None] | None = None,
                           unmerge: Callable[[nn.Module], None] | None = None,
                           rtol: float | None = None, atol: float | None = None) -> None:
    """Assert merged output == unmerged output, and unmerge restores the output.

    ``merge``/``unmerge`` default to ``layer.merge()``/``layer.unmerge()``
    (PEFT's method names). Eval mode. Tolerances from the dtype table, because
    folding the adapter into the weight reorders the floating-point sums.

    Raises:
      InvariantViolation: saying which of the two comparisons failed and where.
    """
    __tracebackhide__ = True
    require_nonempty("x", x)
    require_finite("x", x)
    merge = merge or (lambda m: m.merge())
    unmerge = unmerge or (lambda m: m.unmerge())
    with torch.no_grad(), _mode((layer,), False):
        before = _run("layer", layer, x).clone()
        merge(layer)
        merged = _run("layer (merged)", layer, x).clone()
        unmerge(layer)
        after = _run("layer (unmerged)", layer, x).clone()
    tol = tolerance_for(before.dtype, rtol=rtol, atol=atol)
    report = compare_tensors(merged, before, tol, what="merged vs unmerged output")
    if report:
        fail("the merged layer to compute the same output as the unmerged one", report,
             hint="the merged weight must be W + scale·(B·A); is the scale applied when merging?")
    report = compare_tensors(after, before, tol, what="output after merge+unmerge vs before")
    if report:
        fail("merge then unmerge to restore the layer's output", report)


@invariant_check("L7")
def assert_adapter_gradients_flow_at_init(adapted: nn.Module, x: torch.Tensor, *,
                                          lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Assert at zero-init: dL/dA is exactly zero and dL/dB is not (learning can start).

    The loss is a fixed random projection of the output (seeded generator), so
    no coincidental cancellation hides the gradient. Eval mode (no dropout).

    Raises:
      InvariantViolation: if dL/dA has a non-zero element, or dL/dB is all zero.
      InvalidArgumentError: if x is all zero (then dL/dB is zero for any init).
    """
    __tracebackhide__ = True
    require_nonempty("x", x)
    require_finite("x", x)
    require(bool((x != 0).any()), "x", x,
            "must have a non-zero element: for x = 0 the gradient w.r.t. B is zero for any init")
    for name, p in (("lora_A", lora_A), ("lora_B", lora_B)):
        require(isinstance(p, torch.Tensor) and p.requires_grad, name, p,
                "must be a parameter tensor of `adapted` that requires grad")
    saved = (lora_A.grad, lora_B.grad)
    lora_A.grad, lora_B.grad = None, None
    try:
        with _mode((adapted,), False):
            y = _run("adapted", adapted, x)
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
