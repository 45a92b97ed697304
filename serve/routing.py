"""The router's plan-driven choice of prefill and decode workers.

A plan (``thunderkv plan --json``) routes request rates between groups: ``routing`` entries
``{"prefill": i, "decode": j, "req_per_s": r}`` (``i == j`` for a colocated group). With one
worker per group (worker id = group index), the router sends each request to the prefill worker
whose share of the planned rate is most behind, then to the decode worker most behind its share
of that prefill worker's planned outflow -- a deterministic weighted round robin, so any prefix of
the request stream follows the plan's fractions as closely as whole requests allow.

Pairs whose workers died or changed phase drop out; when nothing planned is left for a choice, the
caller falls back to least-loaded routing (what runs without a plan).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence


def _worker_id(value: object) -> int:
    """A routing entry's worker (group) index: an integer, also one JSON wrote as ``2.0``;
    TypeError for anything else (``true``, ``0.7``, ``"1"``, ``1e400`` are not worker ids)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"worker {value!r} is not an integer")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise TypeError(f"worker {value!r} is not an integer")
    return int(value)


class PlanRouting:
    """Planned flows between worker ids and how many requests each choice has had so far."""

    def __init__(self, entries: Iterable[dict]) -> None:
        self.flow: dict[tuple[int, int], float] = {}
        for e in entries:
            try:
                i, j = _worker_id(e["prefill"]), _worker_id(e["decode"])
                rate = float(e["req_per_s"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"routing entry {e!r} needs integer prefill/decode and a "
                                 f"req_per_s rate ({exc})") from None
            if i < 0 or j < 0:
                raise ValueError(f"routing entry {e!r}: negative worker")
            if not math.isfinite(rate) or rate < 0:
                raise ValueError(f"routing entry {e!r}: req_per_s must be a finite number >= 0")
            if rate > 0:
                self.flow[(i, j)] = self.flow.get((i, j), 0.0) + rate
        if not self.flow:
            raise ValueError("the plan routes no requests (every req_per_s is 0)")
        self.prefill_count: dict[int, int] = defaultdict(int)
        self.pair_count: dict[tuple[int, int], int] = defaultdict(int)

    def to_dicts(self) -> list[dict]:
        """The planned flows and the requests routed along each so far."""
        return [{"prefill": i, "decode": j, "req_per_s": r, "routed": self.pair_count[(i, j)]}
                for (i, j), r in sorted(self.flow.items())]

    @staticmethod
    def _most_behind(weights: dict, counts: dict, tie: Callable) -> object | None:
        if not weights:
            return None
        return min(weights, key=lambda k: ((counts[k] + 1) / weights[k], tie(k)))

    def pick_prefill(self, candidates: Sequence[int], tie: Callable[[int], object]) -> int | None:
        """The candidate prefill (or colocated) worker most behind its planned share, or None
        when no candidate has planned traffic."""
        allowed = set(candidates)
        weights: dict[int, float] = defaultdict(float)
        for (i, _), r in self.flow.items():
            if i in allowed:
                weights[i] += r
        choice = self._most_behind(dict(weights), self.prefill_count, tie)
        if choice is not None:
            self.prefill_count[choice] += 1
        return choice

    def pick_decode(self, prefill: int, candidates: Sequence[int],
                    tie: Callable[[int], object]) -> int | None:
        """The candidate decode worker most behind its share of ``prefill``'s planned outflow,
        or None when the plan sends nothing from ``prefill`` to any candidate."""
        allowed = set(candidates)
        weights = {j: r for (i, j), r in self.flow.items() if i == prefill and j in allowed}
        counts = {j: self.pair_count[(prefill, j)] for j in weights}
        choice = self._most_behind(weights, counts, tie)
        if choice is not None:
            self.pair_count[(prefill, choice)] += 1
        return choice

    def record(self, prefill: int, decode: int) -> None:
        """Count a pair chosen some other way (a colocated worker decoding its own prefill)."""
        self.pair_count[(prefill, decode)] += 1
