"""Large clusters: search each site first, then the whole cluster from the sites' plans.

On hundreds of GPUs a tabu iteration evaluates up to ``max_evals`` routing LPs over the whole
cluster, so a search within minutes makes only ~100 moves from the network-aware initial
grouping. Sites -- nodes joined by the fastest links, up to ``site_gpus`` GPUs -- are small
enough for a short search each to get far; their best states together start the global search,
which still may move GPUs and route KV between sites.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from .cluster import Cluster
from .evaluate import Evaluator, canonical
from .tabu import SearchResult, TabuConfig, initial_state, tabu_search

SITE_GPUS = 32  # largest site searched on its own
DECOMPOSE_ABOVE = 64  # clusters with more GPUs are searched site by site first
SITE_SHARE = 0.5  # of the search time spent on the sites


def sites(cluster: Cluster, site_gpus: int | None = None) -> list[list[str]]:
    """Node names grouped into sites: repeatedly merge the two groups joined by the fastest
    link between any of their nodes (ties: the earliest nodes in the file), while the merged
    group has at most ``site_gpus`` (default :data:`SITE_GPUS`) GPUs."""
    site_gpus = SITE_GPUS if site_gpus is None else site_gpus
    parts = [[n.name] for n in cluster.nodes]
    gpus = {n.name: n.count for n in cluster.nodes}
    size = [gpus[p[0]] for p in parts]
    while True:
        best = None
        for a in range(len(parts)):
            for b in range(a + 1, len(parts)):
                if size[a] + size[b] > site_gpus:
                    continue
                bw = max(cluster.link_gbps(x, y) for x in parts[a] for y in parts[b])
                if best is None or bw > best[0]:
                    best = (bw, a, b)
        if best is None:
            return parts
        _, a, b = best
        parts[a] += parts.pop(b)
        size[a] += size.pop(b)


def site_first_search(ev: Evaluator, cfg: TabuConfig,
                      progress: Callable[[int, float, float], None] | None = None
                      ) -> SearchResult:
    """:func:`tabu_search` over the whole cluster, started from the union of each site's best
    state (each site searched alone for its share of ``SITE_SHARE`` of the time limit)."""
    t0 = time.perf_counter()
    parts = sites(ev.cluster)
    share = cfg.time_limit_s * SITE_SHARE / len(parts)
    start: list = []
    iterations = 0
    for k, names in enumerate(parts):
        gpus = [g for g in ev.cluster.gpus if g.rsplit(":", 1)[0] in names]
        local = dataclasses.replace(cfg, time_limit_s=share, seed=cfg.seed + k, keep_top=0)
        res = tabu_search(ev, local, start=initial_state(ev, gpus))
        iterations += res.iterations
        start += list(res.state)
    rest = dataclasses.replace(cfg, time_limit_s=max(cfg.time_limit_s - (time.perf_counter() - t0),
                                                     0.0))
    res = tabu_search(ev, rest, start=canonical(start), progress=progress)
    res.iterations += iterations
    res.seconds = time.perf_counter() - t0
    return res


def search(ev: Evaluator, cfg: TabuConfig,
           progress: Callable[[int, float, float], None] | None = None) -> SearchResult:
    """Site-first on clusters of more than ``DECOMPOSE_ABOVE`` GPUs, else a plain search."""
    if len(ev.cluster.gpus) > DECOMPOSE_ABOVE and len(sites(ev.cluster)) > 1:
        return site_first_search(ev, cfg, progress)
    return tabu_search(ev, cfg, progress=progress)


__all__ = ["sites", "site_first_search", "search"]
