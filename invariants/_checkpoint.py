"""Gradient-checkpointing equivalence (SPEC seed 001, S4).

``assert_checkpoint_gradient_equivalent`` runs any step function twice on the
same arguments — once plainly, once through a checkpoint implementation — and
compares every output and every gradient: of the step's parameters, of the
parameters upstream of its arguments (e.g. a HyperLoRA network whose deltas
arrive in a dict), and of every argument tensor that requires grad, wherever
it sits in the argument structure (``None`` placeholders, dicts, nested
lists/tuples/dicts, keyword arguments).  A gradient that exists on one side
and is ``None`` on the other is a violation, never a skip.

Which tensors are compared is found, not guessed: the check walks the autograd
graph of the plain run's output down to its leaves, so parameters the check has
never been told about (upstream networks, closures) are covered too.

``argument_layouts`` draws argument structures (which arguments are None,
dict sizes and nesting, leaves that require grad or come from an upstream
network, which arguments go by keyword) as plain data that prints readably in
a counterexample; ``ArgumentLayout.materialise`` turns one into tensors.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from invariants._assertions import compare_tensors, fail, invariant_check
from invariants._determinism import seeded
from invariants._errors import InvalidArgumentError
from invariants._tolerances import tolerance_for
from invariants._validate import require, require_finite

__all__ = [
    "ArgumentLayout",
    "argument_layouts",
    "assert_checkpoint_gradient_equivalent",
]

LEAF_KINDS = ("const", "grad", "upstream")
_HINT_REENTRANT = (
    "torch.utils.checkpoint(use_reentrant=True) only tracks positional tensor arguments: "
    "when none of them requires grad (the first solver step: h=None, deltas inside a dict) "
    "its output is cut from the graph and the parameters inside the step and upstream of "
    "the dict silently get no gradient. Use use_reentrant=False.")


# ------------------------------------------------------------------ pytrees
def _leaves(tree: Any, path: str) -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in a tree of dicts/lists/tuples; None and scalars skipped."""
    if isinstance(tree, torch.Tensor):
        return [(path, tree)]
    if isinstance(tree, Mapping):
        out: list[tuple[str, torch.Tensor]] = []
        for key, value in tree.items():
            out += _leaves(value, f"{path}[{key!r}]")
        return out
    if isinstance(tree, (list, tuple)):
        out = []
        for i, value in enumerate(tree):
            out += _leaves(value, f"{path}[{i}]")
        return out
    return []


def _graph_leaves(roots: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Every leaf tensor (AccumulateGrad variable) reachable from ``roots``' grad_fn graph."""
    seen: set[int] = set()
    found: dict[int, torch.Tensor] = {}
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    for t in roots:  # a root that is itself a leaf
        if t.requires_grad and t.grad_fn is None:
            found.setdefault(id(t), t)
    return list(found.values())


def _named_params(step: Callable, params: Any) -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]] = []
    owner = step if isinstance(step, nn.Module) else getattr(step, "__self__", None)
    if isinstance(owner, nn.Module):
        named += [(f"step.{n}", p) for n, p in owner.named_parameters()]
    if isinstance(params, torch.Tensor):
        named.append(("params", params))
    elif isinstance(params, nn.Module):
        named += [(f"params.{n}", p) for n, p in params.named_parameters()]
    elif isinstance(params, Mapping):
        named += [(f"params[{k!r}]", p) for k, p in params.items()]
    else:
        try:
            named += [(f"params[{i}]", p) for i, p in enumerate(params)]
        except TypeError:
            raise InvalidArgumentError(
                f"params={params!r:.80}: must be a tensor, an nn.Module, a mapping or an "
                "iterable of tensors") from None
    for name, p in named:
        require(isinstance(p, torch.Tensor), name, p, "must be a tensor")
    return named


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, device and bits (no NaN): no tolerance can fail, skip the report."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device \
        and bool(torch.equal(a.detach(), b.detach()))


# ------------------------------------------------------------------ one run
@dataclass
class _Run:
    outputs: list[tuple[str, torch.Tensor]]
    grads: dict[int, torch.Tensor | None]
    error: str | None = None


def _loss(outputs: list[tuple[str, torch.Tensor]], seed: int) -> torch.Tensor | None:
    """Σ w·out over floating outputs with seeded random weights (no accidental cancellation)."""
    gen = torch.Generator().manual_seed(seed)
    terms = []
    for _, out in outputs:
        weights = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        if out.requires_grad:
            terms.append((out * weights).sum())
    return torch.stack([t.to(torch.float64) for t in terms]).sum() if terms else None


def _run(call: Callable[[], Any], targets: dict[int, torch.Tensor], seed: int, *,
         discover: Callable[[list[tuple[str, torch.Tensor]]], None] | None = None) -> _Run:
    """Call, backprop the seeded loss, and collect the gradient reaching each target.

    Gradients are captured with tensor hooks (summed over calls: the reentrant
    mode runs a second backward inside the first), so the callers' ``.grad``
    fields are saved and restored and nothing of theirs is left changed.
    ``discover(outputs)``, when given, runs between the call and the backward
    and may add targets (the plain run finds the upstream leaves in its own graph,
    so the step is not called a third time just to look): hooks are then armed
    after the call, which sees the same gradients (a hook fires at backward).
    """
    captured: dict[int, torch.Tensor | None] = {}
    saved_grads: dict[int, torch.Tensor | None] = {}
    handles: list[Any] = []

    def hook_for(key: int):
        def hook(grad: torch.Tensor) -> None:
            prev = captured[key]
            captured[key] = grad.detach().clone() if prev is None else prev + grad.detach()
        return hook

    def arm() -> None:
        for key, t in targets.items():
            captured[key] = None
            if t.is_leaf:  # backward accumulates in place: park the caller's grads
                saved_grads[key] = t.grad
                t.grad = None
        handles.extend(t.register_hook(hook_for(key)) for key, t in targets.items()
                       if t.requires_grad)

    try:
        if discover is None:
            arm()
        with seeded(seed):
            out = call()
        outputs = [(p, t) for p, t in _leaves(out, "out") if t.is_floating_point()]
        if discover is not None:
            discover(outputs)
            arm()
        loss = _loss(outputs, seed)
        if loss is not None:
            loss.backward(retain_graph=True)
        return _Run(outputs, captured)
    finally:
        for handle in handles:
            handle.remove()
        for key, grad in saved_grads.items():
            targets[key].grad = grad


def _require_finite_run(what: str, tensor: torch.Tensor) -> None:
    bad = ~torch.isfinite(tensor.detach())
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise InvalidArgumentError(
            f"{what}: {int(bad.sum())} of {tensor.numel()} elements are non-finite (first at "
            f"{list(index)}: {tensor.detach()[index].item()!r}) without checkpointing; the "
            "equivalence is checked on finite runs only: fix the step or its inputs")


def _validate_structure(args: Any, kwargs: Any, use_reentrant: bool | None,
                        custom: bool) -> None:
    require(isinstance(args, (tuple, list)), "args", args,
            "must be a tuple of the step's positional arguments")
    require(isinstance(kwargs, Mapping), "kwargs", kwargs,
            "must be a mapping of keyword arguments (or None)")
    for key in kwargs:
        require(isinstance(key, str), "kwargs", dict(kwargs), "keys must be strings")
    require(use_reentrant is None or isinstance(use_reentrant, bool), "use_reentrant",
            use_reentrant, "must be True, False or None")
    if not custom:
        require(use_reentrant is not None, "use_reentrant", use_reentrant,
                "say which torch.utils.checkpoint mode to test (True or False); torch 2.13 "
                "silently picks the reentrant mode, with only a warning, when it is omitted")
    if use_reentrant and kwargs:
        raise InvalidArgumentError(
            f"kwargs={sorted(kwargs)} with use_reentrant=True: the reentrant checkpoint mode "
            "cannot take keyword arguments for the step function (torch raises 'Unexpected "
            "keyword arguments'); pass them positionally or test use_reentrant=False")
    for path, tensor in _leaves(args, "args") + _leaves(kwargs, "kwargs"):
        if tensor.is_floating_point():
            require_finite(path, tensor)


@invariant_check("S4")
def assert_checkpoint_gradient_equivalent(step: Callable[..., Any], args: tuple = (),
                                          kwargs: Mapping[str, Any] | None = None, *,
                                          use_reentrant: bool | None = None,
                                          checkpoint: Callable[..., Any] | None = None,
                                          params: Any = (), seed: int = 0,
                                          rtol: float | None = None,
                                          atol: float | None = None) -> None:
    """Assert ``checkpoint(step, *args, **kwargs)`` matches ``step(*args, **kwargs)``.

    Compared: every floating output tensor (values and ``requires_grad``), and
    the gradient of a seeded random projection of the outputs with respect to
    every tensor that receives one in either run — the step's parameters, the
    parameters upstream of the arguments (found by walking the autograd graph),
    ``params``, and every argument tensor that requires grad, leaf or not,
    wherever it sits in ``args``/``kwargs``.  RNG is reset to ``seed`` before
    each run, so dropout inside the step is compared like for like.

    Args:
      step: any callable; an ``nn.Module`` or a bound method of one names its
        parameters ``step.<name>`` in messages.
      args, kwargs: the step's arguments; any structure of tensors, ``None``,
        dicts, lists and tuples. The arguments' upstream graphs are kept
        (``retain_graph=True``), so the same arguments can be reused; the
        callers' ``.grad`` fields are left as they were.
      use_reentrant: the ``torch.utils.checkpoint.checkpoint`` mode to test
        (required when ``checkpoint`` is not given; passed on when it is).
      checkpoint: a callable with torch's convention ``checkpoint(fn, *args,
        **kwargs)``; default ``torch.utils.checkpoint.checkpoint``.
      params: extra parameters to name in messages (module, mapping or iterable).
      seed: seeds the loss projection and the RNG of both runs.
      rtol, atol: override the dtype table's tolerances.

    Raises:
      InvariantViolation: if an output differs or its ``requires_grad`` differs,
        if a tensor gets a gradient in one run and ``None`` in the other, if a
        gradient differs beyond tolerance, or if the checkpointed run raises
        where the plain one did not.
      InvalidArgumentError: if ``step``/``checkpoint`` is not callable, the
        structure cannot be taken by the mode (keyword arguments with
        ``use_reentrant=True``), an argument tensor is not finite, the plain
        step raises, returns no floating tensor, or nothing in it requires grad
        (the comparison would be empty).
    """
    __tracebackhide__ = True
    require(callable(step), "step", step, "must be callable (the step function to checkpoint)")
    require(checkpoint is None or callable(checkpoint), "checkpoint", checkpoint,
            "must be callable like torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)")
    kwargs = {} if kwargs is None else kwargs
    _validate_structure(args, kwargs, use_reentrant, custom=checkpoint is not None)
    require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2 ** 63,
            "seed", seed, "must be an integer in [0, 2**63)")
    ckpt = checkpoint or _torch_checkpoint
    if use_reentrant is not None:
        ckpt = functools.partial(ckpt, use_reentrant=use_reentrant)
    mode = "custom checkpoint" if checkpoint is not None else \
        f"torch.utils.checkpoint(use_reentrant={use_reentrant})"

    names: dict[int, str] = {}
    targets: dict[int, torch.Tensor] = {}
    for name, tensor in _leaves(args, "args") + _leaves(kwargs, "kwargs"):
        if tensor.requires_grad:
            names.setdefault(id(tensor), name)
            targets.setdefault(id(tensor), tensor)
    for name, p in _named_params(step, params):
        names.setdefault(id(p), name)
        targets.setdefault(id(p), p)

    def plain_step() -> Any:
        try:
            return step(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the caller's step is broken, not the checkpoint
            raise InvalidArgumentError(
                f"step={step!r}: calling it without checkpointing failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); check the arguments") from None

    def discover(outputs: list[tuple[str, torch.Tensor]]) -> None:
        """Check the plain run's outputs; add every leaf of their graph that requires grad."""
        floating = [t for _, t in outputs]
        require(bool(floating), "step", step,
                "returned no floating-point tensor; there is nothing to compare")
        require(any(t.numel() > 0 for t in floating), "step", step,
                f"returned only empty floating tensors (shapes "
                f"{[tuple(t.shape) for t in floating][:4]}); outputs must be non-empty")
        for leaf in _graph_leaves(floating):
            if leaf.requires_grad and id(leaf) not in targets:
                names[id(leaf)] = f"upstream leaf {tuple(leaf.shape)} #{len(names)}"
                targets[id(leaf)] = leaf
        if not any(t.requires_grad for t in targets.values()):
            raise InvalidArgumentError(
                f"step={step!r}: nothing requires grad (no parameter, no argument, nothing "
                "upstream); the gradient comparison would be empty")

    # One plain run: it finds every leaf that receives a gradient (walking its own graph)
    # and is the yardstick the checkpointed run is compared with.
    plain = _run(plain_step, targets, seed, discover=discover)
    # The yardstick must be finite: NaN in the plain run is the step's problem (or its
    # inputs'), and NaN compares unequal to itself, so it would read as a checkpoint bug.
    for path, out in plain.outputs:
        _require_finite_run(f"step(...) output {path}", out)
    for key, grad in plain.grads.items():
        if grad is not None:
            _require_finite_run(f"gradient of {names[key]} without checkpointing", grad)
    try:
        ckpt_run = _run(lambda: ckpt(step, *args, **kwargs), targets, seed)
    except Exception as exc:  # noqa: BLE001 - reported as the violation it is
        fail(f"{mode} to run wherever the plain step runs",
             f"it raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return

    problems: list[str] = []
    # Outputs.
    plain_out = dict(plain.outputs)
    ckpt_out = dict(ckpt_run.outputs)
    if list(plain_out) != list(ckpt_out):
        problems.append(f"output structure differs: plain {list(plain_out)}, "
                        f"checkpointed {list(ckpt_out)}")
    for path, p_out in plain_out.items():
        c_out = ckpt_out.get(path)
        if c_out is None:
            continue
        if p_out.requires_grad != c_out.requires_grad:
            problems.append(f"{path}.requires_grad is {c_out.requires_grad} with checkpointing "
                            f"but {p_out.requires_grad} without")
        if p_out.shape != c_out.shape:
            problems.append(f"{path}.shape {tuple(c_out.shape)} vs {tuple(p_out.shape)}")
            continue
        tol = tolerance_for(p_out.dtype, rtol=rtol, atol=atol)  # validates rtol/atol, dtype
        report = None if _bit_equal(c_out, p_out) else compare_tensors(
            c_out, p_out, tol, what=f"{path} (checkpointed vs plain)")
        if report:
            problems.append(report)
    # Gradients.
    lost = [names[k] for k in targets if plain.grads[k] is not None and ckpt_run.grads[k] is None]
    extra = [names[k] for k in targets if plain.grads[k] is None and ckpt_run.grads[k] is not None]
    n_with = sum(g is not None for g in plain.grads.values())
    if lost:
        problems.append(f"{len(lost)} of {n_with} tensors that get a gradient without "
                        f"checkpointing get None with it: {', '.join(lost[:6])}"
                        f"{', ...' if len(lost) > 6 else ''}")
    if extra:
        problems.append(f"{len(extra)} tensors get a gradient only with checkpointing: "
                        f"{', '.join(extra[:6])}")
    for key, tensor in targets.items():
        g_plain, g_ckpt = plain.grads[key], ckpt_run.grads[key]
        if g_plain is None or g_ckpt is None:
            continue
        tol = tolerance_for(g_plain.dtype, rtol=rtol, atol=atol)
        report = None if _bit_equal(g_ckpt, g_plain) else compare_tensors(
            g_ckpt, g_plain, tol, what=f"grad of {names[key]}")
        if report:
            problems.append(report)
    if problems:
        fail(f"{mode} to give the same outputs and gradients as the plain step",
             "; ".join(problems),
             hint=_HINT_REENTRANT if use_reentrant else None)


# ------------------------------------------------------------ strategies
@dataclass(frozen=True)
class ArgumentLayout:
    """The structure of a step's arguments (x, h, deltas), as plain printable data.

    Leaves are ``"const"`` (no grad), ``"grad"`` (a leaf that requires grad) or
    ``"upstream"`` (produced by an upstream network: a non-leaf that requires
    grad, like HyperLoRA deltas).  ``h`` may be ``None`` (the first solver
    step); ``deltas`` is ``None`` or a dict, possibly nested, possibly empty;
    ``as_kwargs`` names the arguments passed by keyword.  x and h are (B, D),
    every delta leaf is a per-sample matrix (B, D, D).
    """

    batch: int
    hidden: int
    x: str
    h: str | None
    deltas: Any
    as_kwargs: tuple[str, ...] = ()

    def materialise(self, *, generator: torch.Generator,
                    upstream_vector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    upstream_matrix: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[tuple, dict]:
        """(args, kwargs) with seeded values; "upstream" leaves are computed by the callables.

        ``upstream_vector`` maps a (B, D) context to (B, D); ``upstream_matrix``
        maps it to (B, D, D).
        """
        b, d = self.batch, self.hidden

        def leaf(kind: str, matrix: bool) -> torch.Tensor:
            shape = (b, d, d) if matrix else (b, d)
            require(kind in LEAF_KINDS, "leaf kind", kind, f"must be one of {LEAF_KINDS}")
            if kind == "upstream":
                fn = upstream_matrix if matrix else upstream_vector
                require(callable(fn), "upstream_matrix" if matrix else "upstream_vector", fn,
                        "must be given to materialise 'upstream' leaves")
                context = torch.randn(b, d, generator=generator, dtype=torch.float64).to(dtype)
                out = fn(context)
                require(tuple(out.shape) == shape, "upstream output shape", tuple(out.shape),
                        f"must be {shape}")
                return out
            value = (torch.randn(shape, generator=generator, dtype=torch.float64) * 0.3).to(dtype)
            return value.requires_grad_(kind == "grad")

        def tree(spec: Any) -> Any:
            if spec is None:
                return None
            if isinstance(spec, dict):
                return {k: tree(v) for k, v in spec.items()}
            return leaf(spec, matrix=True)

        values = {"x": leaf(self.x, False),
                  "h": None if self.h is None else leaf(self.h, False),
                  "deltas": tree(self.deltas)}
        order = ("x", "h", "deltas")
        args = tuple(values[k] for k in order if k not in self.as_kwargs)
        kwargs = {k: values[k] for k in order if k in self.as_kwargs}
        return args, kwargs


def _deltas(max_size: int, depth: int) -> st.SearchStrategy:
    """Dicts of leaf kinds with at most ``depth`` further dict levels below this one."""
    leaf = st.sampled_from(LEAF_KINDS[::-1])  # shrinks towards "upstream": the seed's case
    keys = st.sampled_from(["w", "b", "ih", "hh"])
    value = leaf if depth <= 0 else st.one_of(leaf, _deltas(max_size, depth - 1))
    return st.dictionaries(keys, value, max_size=max_size)


def argument_layouts(*, min_batch: int = 1, max_batch: int = 3, min_hidden: int = 1,
                     max_hidden: int = 4, max_dict_size: int = 3, max_depth: int = 2,
                     allow_none: bool = True, allow_kwargs: bool = True
                     ) -> st.SearchStrategy[ArgumentLayout]:
    """Argument structures for a step (x, h, deltas): None h, empty/nested dicts, kwargs.

    Reaches batch 1, hidden 1, h=None with x not requiring grad (the first
    solver step), deltas=None, {}, one "upstream" leaf, nesting up to
    ``max_depth`` dict levels below the top one.  ``allow_kwargs=False`` for
    modes that take positional arguments only (``use_reentrant=True``).
    """
    for name, value in (("min_batch", min_batch), ("min_hidden", min_hidden)):
        require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
    for name, value in (("max_dict_size", max_dict_size), ("max_depth", max_depth)):
        require(isinstance(value, int) and value >= 0, name, value, "must be an integer >= 0")
    if not (isinstance(max_batch, int) and max_batch >= min_batch):
        raise InvalidArgumentError(f"Cannot have max_batch={max_batch!r} < min_batch={min_batch}")
    if not (isinstance(max_hidden, int) and max_hidden >= min_hidden):
        raise InvalidArgumentError(
            f"Cannot have max_hidden={max_hidden!r} < min_hidden={min_hidden}")
    h_kinds = ([None] if allow_none else []) + list(LEAF_KINDS)
    deltas = _deltas(max_dict_size, max_depth)
    if allow_none:
        deltas = st.one_of(deltas, st.none())
    kw = st.sampled_from([(), ("deltas",), ("h", "deltas")]) if allow_kwargs else st.just(())
    return st.builds(
        ArgumentLayout,
        batch=st.one_of(st.just(min_batch), st.integers(min_batch, max_batch)),
        hidden=st.one_of(st.just(min_hidden), st.integers(min_hidden, max_hidden)),
        x=st.sampled_from(LEAF_KINDS), h=st.sampled_from(h_kinds),
        deltas=deltas, as_kwargs=kw)
