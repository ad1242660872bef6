"""How the LoRA checks (``_lora``) run the caller's modules, and the two contracts that owns.

* Running: train/eval mode set and restored, a transformers ``ModelOutput`` read through
  ``.logits``, a module's failure turned into one ``InvalidArgumentError`` line.
* **One RNG stream for train mode (L1).** Both passes start from one seed (``_determinism.
  seeded``, the caller's RNG untouched); the randomness an adapter draws inside modules the
  base does not have (PEFT's ``lora_dropout``) is drawn off that stream (``fork_rng`` around
  those modules), so a base with its own dropout (a whole GPT-2) sees the same masks in both
  passes. The RNG states after the passes say whether the adapted pass drew the same amount.
* **Rounding bounds from the summands (L1 ``exact=False``, L6).** Rounding scales with the
  summands ``|W x|`` and ``|s·B·A x|``, not with their sum: the allowed difference is
  ``atol + c·(|b| + rms(b) + |a| + rms(a))`` per element (``b`` the base path, ``a`` the
  adapter path, ``rms`` over the output features: the size of a dot product's rounding), with
  ``c = k·rtol + 4·eps_acc·sqrt(n)`` from the dtype table: ``k`` roundings of the dtype, ``n =
  x.shape[-1]`` terms accumulated in ``eps_acc`` (float32 for half types, as CPU and
  tensor-core matmuls accumulate). docs/lora_init.md has the measurements behind ``k``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from invariants._determinism import seeded
from invariants._errors import InvalidArgumentError
from invariants._tolerances import tolerance_for
from invariants._validate import require, require_finite, require_nonempty, require_tensor

__all__: list[str] = []  # private: the LoRA checks call these

L1_ROUNDINGS = 8  # W_res, A, B rounded at init, then each path's output (docs/lora_init.md)
L6_ROUNDINGS = 2  # the merged weight and the output, on each side
SEED = 0          # the one RNG stream both train-mode passes start from


# ------------------------------------------------------------------ running modules
@contextlib.contextmanager
def mode(modules: tuple[Any, ...], train: bool) -> Iterator[None]:
    mods = [m for m in modules if isinstance(m, nn.Module)]  # a plain callable has no mode
    saved = [m.training for m in mods]
    try:
        for m in mods:
            m.train(train)
        yield
    finally:
        for m, was in zip(mods, saved):
            m.train(was)


def _as_tensor(name: str, out: Any) -> torch.Tensor:
    """A module's output as a tensor: a transformers ``ModelOutput`` is read through ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    require(isinstance(logits, torch.Tensor), name, out,
            f"must return a tensor (or an object with a .logits tensor, as transformers "
            f"models do), got {type(out).__name__}")
    return logits


def run(name: str, module: Any, x: torch.Tensor) -> torch.Tensor:
    try:
        return _as_tensor(f"{name}(x)", module(x))
    except (RuntimeError, IndexError) as exc:
        note = ""
        if isinstance(exc, IndexError) and not x.is_floating_point():
            note = (f"; x holds ids in [{int(x.min())}, {int(x.max())}]: is one outside the "
                    "vocabulary (num_embeddings)?")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidArgumentError(
            f"{name}: calling it on x.shape={tuple(x.shape)}, x.dtype={x.dtype} failed "
            f"({first}){note or '; are the module shapes and dtype compatible?'}") from None


def require_input(name: str, x: Any) -> None:
    require_tensor(name, x)
    require_nonempty(name, x)
    require_finite(name, x)


def same_shape(y_base: torch.Tensor, y_adapted: torch.Tensor, names: tuple[str, str]) -> None:
    if y_base.shape != y_adapted.shape:
        raise InvalidArgumentError(
            f"{names[0]}(x).shape={tuple(y_base.shape)} and {names[1]}(x).shape="
            f"{tuple(y_adapted.shape)}: the two modules must map x to the same shape")


def outputs(base: Any, adapted: Any, x: torch.Tensor, train: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), mode((base, adapted), train):
        y_base, y_adapted = run("base", base, x), run("adapted", adapted, x)
    same_shape(y_base, y_adapted, ("base", "adapted"))
    return y_base, y_adapted


# --------------------------------------------------- one RNG stream for train mode (L1)
def _adapter_only_modules(base: Any, adapted: Any) -> list[nn.Module]:
    """Modules of ``adapted`` whose whole subtree matches no module of ``base`` by name suffix.

    PEFT's ``...c_attn.lora_dropout.default`` is one; ``...c_attn`` (the wrapper, named as the
    base's layer) is not. Every such module is returned, not only the outermost: PEFT calls
    ``lora_dropout["default"]`` directly, never its ModuleDict. Randomness drawn inside these
    is drawn off the shared stream (nested forks restore in order)."""
    if not isinstance(adapted, nn.Module):
        return []
    base_names = {n for n, _ in base.named_modules()} if isinstance(base, nn.Module) else {""}
    names = dict(adapted.named_modules())

    def shared(name: str) -> bool:
        parts = name.split(".")
        return not name or any(".".join(parts[i:]) in base_names for i in range(len(parts)))

    own = {n for n in names if not shared(n)}
    whole = {n for n in own if not any(m.startswith(n + ".") and m not in own for m in names)}
    return [names[n] for n in sorted(whole)]


@contextlib.contextmanager
def _off_stream(modules: Sequence[nn.Module], cuda: list[int]) -> Iterator[None]:
    stack: list[Any] = []

    def enter(module: nn.Module, args: Any) -> None:
        fork = torch.random.fork_rng(devices=cuda)
        fork.__enter__()
        stack.append(fork)

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        stack.pop().__exit__(None, None, None)

    handles = [m.register_forward_pre_hook(enter) for m in modules]
    handles += [m.register_forward_hook(leave) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while stack:
            stack.pop().__exit__(None, None, None)


def _stream_pass(name: str, module: Any, x: torch.Tensor, seed: int,
                 off_stream: Sequence[nn.Module] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``module(x)`` from RNG seed ``seed`` (the caller's RNG untouched); the RNG states after."""
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    with seeded(seed, device=x.device), _off_stream(off_stream, cuda):
        y = run(name, module, x)
        states = [torch.random.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in cuda]
    return y, states


def train_outputs(base: Any, adapted: Any, x: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(base(x), adapted(x), same_draws) in train mode, both from seed ``SEED``."""
    with torch.no_grad(), mode((base, adapted), True):
        y_base, s_base = _stream_pass("base", base, x, SEED)
        y_adapted, s_adapted = _stream_pass("adapted", adapted, x, SEED,
                                            _adapter_only_modules(base, adapted))
    same_shape(y_base, y_adapted, ("base", "adapted"))
    return y_base, y_adapted, all(torch.equal(a, b) for a, b in zip(s_base, s_adapted))


def base_is_stochastic(base: Any, x: torch.Tensor, y_base: torch.Tensor) -> bool:
    with torch.no_grad(), mode((base,), True):
        again, _ = _stream_pass("base", base, x, SEED + 1)
    return not torch.equal(again, y_base)


# ------------------------------------------------------------ rounding bounds (L1, L6)
def adapter_path(module: Any, x: torch.Tensor) -> torch.Tensor | None:
    """``module``'s adapter term ``module(x) - base_path(x)`` in eval mode, where PEFT exposes
    the base path (a LoRA layer's ``base_layer``, a PeftModel's ``disable_adapter()``); else
    None. Used only for the size of the rounding bound."""
    base_layer = getattr(module, "base_layer", None)
    peft_model = callable(getattr(module, "disable_adapter", None))
    if not (isinstance(base_layer, nn.Module) or peft_model):
        return None
    with torch.no_grad(), mode((module,), False):
        y = run("adapted", module, x)
        if isinstance(base_layer, nn.Module):
            return y - run("base_layer", base_layer, x)
        with module.disable_adapter():
            return y - run("adapted (adapters disabled)", module, x)


def magnitude(*terms: torch.Tensor | None) -> torch.Tensor:
    """Σ |t| + rms(t) over the output features (last dim), in float64."""
    out = None
    for t in terms:
        if t is None:
            continue
        t = t.detach().double()
        rms = t.pow(2).mean(-1, keepdim=True).sqrt() if t.dim() else t.abs()
        out = t.abs() + rms if out is None else out + t.abs() + rms
    assert out is not None
    return out


def coefficient(dtype: torch.dtype, x: torch.Tensor, roundings: int,
                 rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    n = x.shape[-1] if x.is_floating_point() and x.dim() else 1
    return roundings * tolerance_for(dtype).rtol + 4 * tolerance_for(acc).eps * math.sqrt(n)


def bound_report(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor,
                  coef: float, atol: float, *, what: str) -> str | None:
    """None if |actual - expected| <= atol + coef·scale everywhere (NaN never is), else a report."""
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    allowed = atol + coef * scale
    bad = diff > allowed
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    ratio = torch.where(bad, diff / allowed.clamp_min(1e-300), torch.zeros_like(diff))
    i = tuple(int(k) for k in torch.unravel_index(torch.argmax(ratio), diff.shape)) \
        if diff.dim() else ()
    return (f"{what}: {n_bad} / {diff.numel()} elements differ beyond the rounding bound "
            f"atol + c·(summands) with c={coef:.3g}, atol={atol:g}; worst at index {i}: "
            f"|{float(a[i])!r} - {float(e[i])!r}| = {float(diff[i]):.6g} > allowed "
            f"{float(allowed[i]):.6g} (summand scale {float(scale[i]):.6g}; "
            f"{float(ratio[i]):.3g}x the bound)")
