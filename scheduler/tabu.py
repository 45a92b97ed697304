"""Upper level: tabu search over GPU grouping and phase designation (seeded, deterministic).

Moves: flip a group's phase, split a group (at node boundaries or halving a node's share),
merge two groups, move one GPU between groups. A move is tabu when it re-creates a group that a
recent move destroyed (tenure in iterations), unless it beats the best value found so far
(aspiration). Each iteration takes the best admissible neighbour, pruning neighbours whose cheap
upper bound cannot beat the best one already evaluated. After ``patience`` idle iterations the
search restarts from a seeded perturbation of the best state.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .evaluate import Evaluator, Group, State, canonical
from .parallel import segments

MOVES = ("flip", "split", "merge", "move")


@dataclass(slots=True)
class TabuConfig:
    """Search effort and determinism knobs."""

    max_iters: int = 200
    tenure: int = 7
    patience: int = 25
    perturb_moves: int = 3
    time_limit_s: float = 30.0
    seed: int = 0
    moves: tuple[str, ...] = MOVES

    def __post_init__(self) -> None:
        if self.max_iters < 0 or self.tenure < 0 or self.patience < 1:
            raise ValueError("max_iters, tenure >= 0 and patience >= 1 required")
        if not self.moves or set(self.moves) - set(MOVES):
            raise ValueError(f"moves must be a non-empty subset of {MOVES}")


@dataclass(slots=True)
class SearchResult:
    state: State
    value: float
    iterations: int
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)


def _node(g: str) -> str:
    return g.rsplit(":", 1)[0]


def initial_state(ev: Evaluator) -> State:
    """Network-aware start: per node, the smallest power-of-two share that holds the model;
    leftovers joined along the fastest links; phases chosen to balance prefill and decode."""
    c = ev.cluster
    groups: list[list[str]] = []
    leftovers: list[list[str]] = []
    probe = "prefill" if ev.space.split else "colocated"
    for node in c.nodes:
        gs = [f"{node.name}:{i}" for i in range(node.count)]
        k = next((k for k in (1, 2, 4, 8, 16) if k <= len(gs)
                  and ev.perf(gs[:k], probe).pipeline is not None), None)
        if k is None:
            leftovers.append(gs)
            continue
        groups += [gs[i:i + k] for i in range(0, len(gs) - len(gs) % k, k)]
        if len(gs) % k:
            leftovers.append(gs[len(gs) - len(gs) % k:])
    while leftovers:  # merge leftover pieces with their best-connected neighbour piece
        cur = leftovers.pop(0)
        if ev.perf(cur, probe).pipeline is not None:
            groups.append(cur)
            continue
        if not leftovers:
            if groups:
                near = max(range(len(groups)), key=lambda i: (c.link_gbps(_node(cur[0]), _node(groups[i][0])), -i))
                groups[near] = groups[near] + cur
            else:
                groups.append(cur)
            break
        j = max(range(len(leftovers)), key=lambda i: (c.link_gbps(_node(cur[0]), _node(leftovers[i][0])), -i))
        leftovers[j] = cur + leftovers[j]
    if not ev.space.split:
        return canonical((g, "colocated") for g in groups)
    # Balance: order by prefill/decode strength, pick the cut maximising min(sum P, sum D).
    pd = [(ev.perf(g, "prefill").capacity, ev.perf(g, "decode").capacity) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-(pd[i][0] / (pd[i][1] + 1e-9)), i))
    best_k = max(range(1, len(groups)) if len(groups) > 1 else [1],
                 key=lambda k: min(sum(pd[i][0] for i in order[:k]), sum(pd[i][1] for i in order[k:])))
    phase = {i: ("prefill" if r < best_k else "decode") for r, i in enumerate(order)}
    return canonical((g, phase[i]) for i, g in enumerate(groups))


def _split_points(ev: Evaluator, gpus: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Cut positions in the network-ordered GPU list: node boundaries and halves of a node share."""
    order = [g for _, gs in segments(ev.cluster, list(gpus)) for g in gs]
    cuts, pos = set(), 0
    for _, gs in segments(ev.cluster, list(gpus)):
        if len(gs) >= 2:
            cuts.add(pos + len(gs) // 2)
        pos += len(gs)
        cuts.add(pos)
    return order, sorted(k for k in cuts if 0 < k < len(order))


def neighbours(ev: Evaluator, state: State, moves: tuple[str, ...] = MOVES
               ) -> list[tuple[State, list[Group], list[Group]]]:
    """All moves of the kinds in ``moves`` as (new state, groups destroyed, groups created)."""
    out = []
    groups = list(state)
    phases = ev.space.phases
    other = {"prefill": "decode", "decode": "prefill"}

    def emit(removed: list[Group], added: list[Group]) -> None:
        rest = [g for g in groups if g not in removed]
        out.append((canonical(rest + added), removed, canonical(added)))

    for g in groups:
        gs, ph = g
        if ev.space.split and "flip" in moves:
            emit([g], [(gs, other[ph])])
        if len(gs) >= 2 and "split" in moves:
            order, cuts = _split_points(ev, gs)
            for k in cuts:
                a, b = tuple(order[:k]), tuple(order[k:])
                emit([g], [(a, ph), (b, ph)])
                if ev.space.split:
                    emit([g], [(a, ph), (b, other[ph])])
    for i, g1 in enumerate(groups if "merge" in moves else []):
        for g2 in groups[i + 1:]:
            for ph in sorted({g1[1], g2[1]} & set(phases)):
                emit([g1, g2], [(g1[0] + g2[0], ph)])
    for g1 in groups if "move" in moves else []:  # one representative GPU per node: alike
        if len(g1[0]) < 2:
            continue
        reps = {}
        for x in g1[0]:
            reps[_node(x)] = x
        for x in reps.values():
            for g2 in groups:
                if g2 is not g1:
                    emit([g1, g2], [(tuple(y for y in g1[0] if y != x), g1[1]), (g2[0] + (x,), g2[1])])
    return out


def tabu_search(ev: Evaluator, cfg: TabuConfig | None = None, start: State | None = None,
                progress: Callable[[int, float, float], None] | None = None) -> SearchResult:
    """Maximise ``ev.value`` from ``start`` (default: :func:`initial_state`)."""
    cfg = cfg or TabuConfig()
    rng = random.Random(cfg.seed)
    t0 = time.perf_counter()
    cur = start if start is not None else initial_state(ev)
    cur_v = ev.value(cur)
    best, best_v = cur, cur_v
    tabu: dict[Group, int] = {}
    idle, history, it = 0, [best_v], 0
    for it in range(1, cfg.max_iters + 1):
        if time.perf_counter() - t0 > cfg.time_limit_s:
            break
        cands = neighbours(ev, cur, cfg.moves)
        rng.shuffle(cands)  # seeded tie-breaking among equal values
        scored = sorted(((ev.upper_bound(s), k) for k, (s, _, _) in enumerate(cands)), key=lambda x: -x[0])
        pick, pick_v = None, -1.0
        for ub, k in scored:
            if ub <= pick_v:
                break
            s, removed, added = cands[k]
            is_tabu = any(tabu.get(g, 0) >= it for g in added)
            if is_tabu and ub <= best_v:
                continue
            v = ev.value(s)
            if (not is_tabu or v > best_v) and v > pick_v:
                pick, pick_v = k, v
        if pick is None:
            break
        s, removed, _ = cands[pick]
        for g in removed:
            tabu[g] = it + cfg.tenure
        cur, cur_v = s, pick_v
        if cur_v > best_v * (1 + 1e-9) + 1e-12:
            best, best_v, idle = cur, cur_v, 0
        else:
            idle += 1
        history.append(best_v)
        if progress is not None:
            progress(it, best_v, time.perf_counter() - t0)
        if idle >= cfg.patience:  # diversify: perturb the best state with random moves
            cur = best
            for _ in range(cfg.perturb_moves):
                nb = neighbours(ev, cur, cfg.moves)
                if nb:
                    cur = rng.choice(nb)[0]
            cur_v, idle = ev.value(cur), 0
            tabu.clear()
    return SearchResult(best, best_v, it, ev.evaluations, time.perf_counter() - t0, history)
