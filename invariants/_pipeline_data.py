"""Owns the data invariants of the curriculum pipeline, P8-P9 (SPEC seed 002): a sound, seeded
validation split (any ``split(samples, seed) -> (train, val)``) and balanced sources.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Mapping, Sequence


from invariants._assertions import fail, invariant_check
from invariants._errors import InvalidArgumentError
from invariants._validate import (require)

__all__ = [
    "assert_sources_balanced",
    "assert_validation_split_sound",
]

# ---------------------------------------------------------------------- P8
def _indices(part: Any, name: str) -> list[int]:
    raw = getattr(part, "indices", part)
    try:
        out = [int(i) for i in raw]
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"{name}={part!r:.80}: must be a sequence of sample indices or a Subset") from None
    return out


@invariant_check("P8")
def assert_validation_split_sound(split: Callable[[Sequence[Any], int], Any],
                                  samples: Sequence[Any], *, fraction: float = 0.2,
                                  seed: int = 0) -> None:
    """Assert a validation split is disjoint, complete, the right size and deterministic.

    ``split(samples, seed) -> (train, val)``, each a sequence of indices into
    ``samples`` or a ``torch.utils.data.Subset``.  Rules: no index in both
    parts (nor twice in one), every index in exactly one part,
    ``|val| == round(fraction · n)`` ± 1, and a second call with the same seed
    gives the same split.  Indices, not contents: de-duplicate the data before
    splitting (the reference pipeline does) if repeated samples are possible.

    Raises:
      InvariantViolation: for overlap (count and first index), missing samples,
        a wrong size or a non-deterministic split.
      InvalidArgumentError: fraction outside (0, 1) or an empty sample list.
    """
    __tracebackhide__ = True
    require(isinstance(fraction, float) and 0.0 < fraction < 1.0, "fraction", fraction,
            "must be a float in (0, 1)")
    require(hasattr(samples, "__len__") and len(samples) >= 1, "samples", samples,
            "must be a non-empty sequence (hold at least one sample)")
    require(callable(split), "split", split, "must be callable split(samples, seed)")
    n = len(samples)
    train, val = (_indices(p, name) for p, name in zip(split(samples, seed), ("train", "val")))
    overlap = sorted(set(train) & set(val))
    if overlap:
        fail("validation samples disjoint from training samples",
             f"{len(overlap)} of {len(val)} validation indices are also in training "
             f"(first: {overlap[0]}); n={n}",
             hint="split once: a permutation, the first round(0.2·n) to validation and "
                  "the rest to training; never draw validation from the training set")
    for name, part in (("train", train), ("val", val)):
        dupes = [i for i, c in Counter(part).items() if c > 1]
        if dupes:
            fail(f"each index at most once in {name}",
                 f"{len(dupes)} repeated (first: {dupes[0]})")
    missing = sorted(set(range(n)) - set(train) - set(val))
    outside = sorted((set(train) | set(val)) - set(range(n)))
    if missing or outside:
        fail(f"every sample index 0..{n - 1} in exactly one part",
             f"{len(missing)} missing (first: {missing[:1]}), {len(outside)} out of range "
             f"(first: {outside[:1]})")
    want = round(fraction * n)
    if abs(len(val) - want) > 1:
        fail(f"|val| = round({fraction:g}·{n}) = {want} ± 1", f"|val| = {len(val)}, "
             f"|train| = {len(train)}")
    again = tuple(_indices(p, name) for p, name in zip(split(samples, seed), ("train", "val")))
    if again != (train, val):
        fail(f"the same split for the same seed={seed}", "a second call differs",
             hint="draw the permutation from a torch.Generator seeded with `seed`")


# ---------------------------------------------------------------------- P9
@invariant_check("P9")
def assert_sources_balanced(sources: Sequence[str], *, caps: Mapping[str, int],
                            available: Mapping[str, int] | None = None) -> None:
    """Assert every data source contributes at most its cap (and no less than it can).

    Args:
      sources: the source name of every sample in the balanced dataset.
      caps: source -> the configured maximum count.
      available: source -> samples it had before balancing; if given, each
        source must contribute exactly ``min(cap, available)`` (none starved).

    Raises:
      InvariantViolation: naming the source furthest over its cap (with its share
        of the dataset), an uncapped source, or a starved source.
      InvalidArgumentError: for a negative or non-integer cap.
    """
    __tracebackhide__ = True
    require(isinstance(caps, Mapping) and len(caps) > 0, "caps", caps,
            "must be a non-empty mapping source -> cap")
    for name, cap in caps.items():
        require(isinstance(cap, int) and cap >= 0, f"caps[{name!r}]", cap,
                "must be an integer >= 0")
    require(isinstance(sources, Sequence) and not isinstance(sources, (str, bytes)), "sources",
            sources, "must be a sequence of source names (one per sample)")
    # empty is meaningful only against `available` (every source must then have had none)
    require(len(sources) > 0 or available is not None, "sources", sources,
            "must be non-empty unless `available` is given (caps on no sample prove nothing)")
    if available is not None:
        for name, n in available.items():
            require(isinstance(n, int) and n >= 0, f"available[{name!r}]", n,
                    "must be an integer >= 0")
    counts = Counter(sources)
    total = max(1, len(sources))
    uncapped = sorted(set(counts) - set(caps))
    if uncapped:
        fail("only capped sources in the balanced dataset",
             f"{len(uncapped)} source(s) without a cap, first {uncapped[0]!r} with "
             f"{counts[uncapped[0]]} samples")
    over = {s: counts[s] - caps[s] for s in counts if counts[s] > caps[s]}
    if over:
        worst = max(over, key=over.__getitem__)
        fail("each source capped at its configured count",
             f"{len(over)} source(s) over their cap; worst {worst!r}: {counts[worst]} samples "
             f"> cap {caps[worst]} ({100.0 * counts[worst] / total:.1f}% of {len(sources)})",
             hint="down-sample each source to its cap before concatenating (seed 002: "
                  "HellaSwag was 45% of the data)")
    if available is not None:
        for name, cap in caps.items():
            want = min(cap, int(available.get(name, 0)))
            if counts.get(name, 0) != want:
                fail(f"source {name!r} to contribute min(cap={cap}, available="
                     f"{available.get(name, 0)}) = {want} samples", f"{counts.get(name, 0)}")
