"""Exhaustive search over groupings and phases, for clusters small enough to enumerate (tests).

Enumerates every set partition of the GPUs (deduplicated by node signature, since GPUs of one
node are interchangeable) and every phase assignment allowed by the evaluator's search space.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from .evaluate import Evaluator, State, canonical


def set_partitions(items: list[str]) -> Iterator[list[list[str]]]:
    """All partitions of ``items`` into non-empty blocks (Bell-number many)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def exhaustive_best(ev: Evaluator, max_gpus: int = 8) -> tuple[State, float, int]:
    """(best state, its value, number of states scored); refuses clusters above ``max_gpus``."""
    gpus = list(ev.cluster.gpus)
    if len(gpus) > max_gpus:
        raise ValueError(f"{len(gpus)} GPUs is too many to enumerate (max {max_gpus})")
    best: State | None = None
    best_v, scored = -1.0, 0
    seen: set = set()
    for part in set_partitions(gpus):
        for phases in itertools.product(ev.space.phases, repeat=len(part)):
            key = tuple(sorted((ev.signature(b), ph) for b, ph in zip(part, phases)))
            if key in seen:
                continue
            seen.add(key)
            state = canonical(zip(part, phases))
            if ev.upper_bound(state) <= best_v:
                continue
            v = ev.value(state)
            scored += 1
            if v > best_v:
                best, best_v = state, v
    assert best is not None
    return best, best_v, scored
