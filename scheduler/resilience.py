"""Failure-aware plan choice: among a search's near-best plans, prefer the one that keeps the
most goodput after losing any one node and rescheduling lightly (no reload for surviving
groups).

Lightweight rescheduling can only be as good as the plan's failure structure allows: a plan
that puts 42 % of its decode capacity on one node loses it all with that node, and no re-phasing
of the survivors recovers it. Two plans within a percent of each other's goodput can differ a
lot there, and the search has no reason to prefer either. This module scores that difference
by simulation and picks by it, within a goodput tolerance the user sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .evaluate import Evaluator
from .plan import Plan
from .reschedule import plan_nodes, replayed_goodput, reschedule
from .systems import replay_candidates
from .tabu import SearchResult
from .workload import SLO, Workload


def resilience_score(plan: Plan, ev: Evaluator, wl: Workload, slo: SLO, arrivals: str = "poisson",
                     seed: int = 0) -> dict[str, Any]:
    """Simulated goodput after losing each node ``plan`` uses, one at a time, each followed by
    :func:`~.reschedule.reschedule` (lightweight). Returns ``{"per_node": {node: req/s},
    "mean": ..., "min": ...}``."""
    per_node: dict[str, float] = {}
    for node in plan_nodes(plan, ev.cluster):
        if len(ev.cluster.nodes) == 1:  # losing the only node leaves nothing
            per_node[node] = 0.0
            continue
        r = reschedule(plan, ev.cluster, ev.model, ev.params, ev.stats, slo, fail_nodes={node})
        per_node[node] = replayed_goodput(r, wl, slo, arrivals, seed)
    values = list(per_node.values()) or [0.0]
    return {"per_node": per_node, "mean": sum(values) / len(values), "min": min(values)}


def select_resilient(res: SearchResult, ev: Evaluator, wl: Workload, slo: SLO, tolerance: float,
                     arrivals: str = "poisson", seed: int = 0,
                     log: Callable[[str], None] = lambda s: None
                     ) -> tuple[Plan, float, dict[float, float], dict[str, Any]]:
    """Replay every candidate in ``res.top``; of those within ``tolerance`` (a fraction) of the
    best simulated goodput, keep the one with the highest mean goodput after a single-node loss
    (:func:`resilience_score`; ties: the higher goodput). Returns (plan, goodput, its attainment
    curve, info for the JSON)."""
    if not 0 <= tolerance < 1:
        raise ValueError("tolerance must be in [0, 1)")
    t0 = time.perf_counter()
    replayed = replay_candidates(res, ev, wl, slo, arrivals, seed)
    top = max(g for _, _, g, _ in replayed)
    near = [x for x in replayed if x[2] >= (1 - tolerance) * top]
    rows, best = [], None
    for rank, plan, good, seen in near:
        score = resilience_score(plan, ev, wl, slo, arrivals, seed)
        log(f"  candidate {rank}: goodput {good:.2f} req/s, after one lost node mean "
            f"{score['mean']:.2f} / min {score['min']:.2f} req/s")
        rows.append({"rank": rank, "goodput_req_per_s": round(good, 4),
                     "mean_after_loss_req_per_s": round(score["mean"], 4),
                     "min_after_loss_req_per_s": round(score["min"], 4)})
        key = (score["mean"], good)
        if best is None or key > best[0]:
            best = (key, rank, plan, good, seen)
    assert best is not None
    _, rank, plan, good, seen = best
    info = {"tolerance": tolerance, "candidates": len(replayed),
            "best_goodput_req_per_s": round(top, 4),
            "scored": rows, "picked_rank": rank, "seconds": round(time.perf_counter() - t0, 3)}
    return plan, good, seen, info
