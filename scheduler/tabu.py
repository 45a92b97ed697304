"""Upper level: tabu search over GPU grouping and phase designation (seeded, deterministic).

Moves: flip a group's phase, split a group (at node boundaries or halving a node's share),
merge two groups, move one GPU between groups. A move is tabu when it re-creates a group that a
recent move destroyed (tenure in iterations), unless it beats the best value found so far
(aspiration). Each iteration takes the best admissible neighbour, evaluating neighbours in order
of a cheap upper bound and stopping when the bound cannot beat the best one evaluated, after
``max_evals`` evaluations, or at the time limit. After ``patience`` idle iterations the
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

    max_iters: int = 5000  # the time limit usually binds first
    tenure: int = 7
    patience: int = 25
    perturb_moves: int = 3
    time_limit_s: float = 30.0
    seed: int = 0
    moves: tuple[str, ...] = MOVES
    max_neighbours: int = 2000  # sample merges/moves beyond this many (0: never sample)
    max_evals: int = 64  # routing LPs per iteration at most (best upper bounds first; 0: no cap)
    keep_top: int = 8  # best distinct-valued states remembered for a final check by simulation

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
    top: list[tuple[float, State]] = field(default_factory=list)  # best first, distinct values


class _Top:
    """The ``k`` best states seen, one per distinct value (equal values are usually the same
    plan up to interchangeable GPUs)."""

    def __init__(self, k: int) -> None:
        self.k, self.by_value = k, {}

    def add(self, v: float, state: State) -> None:
        if self.k <= 0 or v <= 0:
            return
        key = round(v, 6)
        if key in self.by_value:
            return
        if len(self.by_value) >= self.k:
            worst = min(self.by_value)
            if key <= worst:
                return
            del self.by_value[worst]
        self.by_value[key] = (v, state)

    def items(self) -> list[tuple[float, State]]:
        return [self.by_value[k] for k in sorted(self.by_value, reverse=True)]


def _node(g: str) -> str:
    return g.rsplit(":", 1)[0]


def initial_state(ev: Evaluator, gpus=None) -> State:
    """Network-aware start: per node, the smallest power-of-two share that holds the model;
    leftovers joined along the fastest links; phases chosen to balance prefill and decode.
    ``gpus``: group only these (default: every GPU of the cluster)."""
    c = ev.cluster
    groups: list[list[str]] = []
    leftovers: list[list[str]] = []
    probe = "prefill" if ev.space.split else "colocated"
    only = None if gpus is None else set(gpus)
    for node in c.nodes:
        gs = [f"{node.name}:{i}" for i in range(node.count)]
        if only is not None:
            gs = [g for g in gs if g in only]
            if not gs:
                continue
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


def _moves(ev: Evaluator, groups: list[Group], moves: tuple[str, ...] = MOVES,
           frozen: frozenset = frozenset()) -> list[tuple[list[Group], list[Group]]]:
    """All moves of the kinds in ``moves`` as (groups destroyed, groups created), in a fixed
    order; groups whose GPU tuple is in ``frozen`` may only flip."""
    out: list[tuple[list[Group], list[Group]]] = []
    phases = ev.space.phases
    free = [g for g in groups if g[0] not in frozen]
    for g in groups:
        gs, ph = g
        others = [q for q in phases if q != ph]  # split: the other phase; hybrid: two
        if "flip" in moves:
            out += [([g], [(gs, q)]) for q in others]
        if len(gs) >= 2 and "split" in moves and gs not in frozen:
            order, cuts = _split_points(ev, gs)
            for k in cuts:
                a, b = tuple(sorted(order[:k])), tuple(sorted(order[k:]))
                out.append(([g], [(a, ph), (b, ph)]))
                out += [([g], [(a, ph), (b, q)]) for q in others]
    for i, g1 in enumerate(free if "merge" in moves else []):
        for g2 in free[i + 1:]:
            for ph in sorted({g1[1], g2[1]} & set(phases)):
                out.append(([g1, g2], [(tuple(sorted(g1[0] + g2[0])), ph)]))
    for g1 in free if "move" in moves else []:  # one representative GPU per node: alike
        if len(g1[0]) < 2:
            continue
        reps = {}
        for x in g1[0]:
            reps[_node(x)] = x
        for x in reps.values():
            for g2 in free:
                if g2 is not g1:
                    out.append(([g1, g2], [(tuple(y for y in g1[0] if y != x), g1[1]),
                                           (tuple(sorted(g2[0] + (x,))), g2[1])]))
    return out


def _apply(groups: list[Group], removed: list[Group], added: list[Group]) -> State:
    return canonical([g for g in groups if g not in removed] + added)


def neighbours(ev: Evaluator, state: State, moves: tuple[str, ...] = MOVES,
               frozen: frozenset = frozenset()
               ) -> list[tuple[State, list[Group], list[Group]]]:
    """All moves of the kinds in ``moves`` as (new state, groups destroyed, groups created).
    Groups whose GPU tuple is in ``frozen`` may only flip (no split, merge or move)."""
    groups = list(state)
    return [(_apply(groups, r, a), r, canonical(a)) for r, a in _moves(ev, groups, moves, frozen)]


def _sample(rng: random.Random, cands: list, cap: int) -> list:
    """At most ``cap`` moves: every flip and split (linear in the groups) plus a seeded sample of
    the merges and moves (quadratic); the full list when it is small enough."""
    if cap <= 0 or len(cands) <= cap:
        return cands
    lin = [c for c in cands if len(c[0]) == 1]
    quad = [c for c in cands if len(c[0]) != 1]
    k = max(cap - len(lin), cap // 2)
    return lin + rng.sample(quad, min(k, len(quad)))


def tabu_search(ev: Evaluator, cfg: TabuConfig | None = None, start: State | None = None,
                progress: Callable[[int, float, float], None] | None = None,
                frozen: frozenset = frozenset()) -> SearchResult:
    """Maximise ``ev.value`` from ``start`` (default: :func:`initial_state`); groups in
    ``frozen`` (GPU tuples) keep their GPUs and may only change phase."""
    cfg = cfg or TabuConfig()
    rng = random.Random(cfg.seed)
    t0 = time.perf_counter()
    cur = start if start is not None else initial_state(ev)
    cur_v = ev.value(cur)
    best, best_v = cur, cur_v
    top = _Top(cfg.keep_top)
    top.add(cur_v, cur)
    tabu: dict[Group, int] = {}
    idle, history, it = 0, [best_v], 0
    for it in range(1, cfg.max_iters + 1):
        if time.perf_counter() - t0 > cfg.time_limit_s:
            break
        groups = list(cur)
        full = _moves(ev, groups, cfg.moves, frozen)
        cands = _sample(rng, full, cfg.max_neighbours)
        rng.shuffle(cands)  # seeded tie-breaking among equal values
        if len(cands) < len(full):  # large: lazy states, incremental bounds (changed groups only)
            states: list[State | None] = [None] * len(cands)
            base = ev.bound_terms(cur)
            ubs = [ev.bound_delta(base, r, a) for r, a in cands]
        else:  # small: exact bounds of the built states (bit-for-bit the earlier search)
            states = [_apply(groups, r, a) for r, a in cands]
            ubs = [ev.upper_bound(st) for st in states]
        scored = sorted(((ub, k) for k, ub in enumerate(ubs)), key=lambda x: -x[0])
        pick, pick_v, pick_s = None, -1.0, None
        evals = 0
        for ub, k in scored:
            if ub <= pick_v:
                break
            if pick is not None and (0 < cfg.max_evals <= evals
                                     or time.perf_counter() - t0 > cfg.time_limit_s):
                break  # NIC-bound plans prune poorly: keep an iteration's cost bounded
            removed, added = cands[k]
            is_tabu = any(tabu.get(g, 0) >= it for g in added)
            if is_tabu and ub <= best_v:
                continue
            s = states[k] or _apply(groups, removed, added)
            v = ev.value(s)
            evals += 1
            top.add(v, s)
            if (not is_tabu or v > best_v) and v > pick_v:
                pick, pick_v, pick_s = k, v, s
        if pick is None:
            break
        removed, _ = cands[pick]
        s = pick_s
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
                nb = _moves(ev, list(cur), cfg.moves, frozen)
                if nb:
                    cur = _apply(list(cur), *rng.choice(nb))
            cur_v, idle = ev.value(cur), 0
            top.add(cur_v, cur)
            tabu.clear()
    return SearchResult(best, best_v, it, ev.evaluations, time.perf_counter() - t0, history,
                        top.items())
