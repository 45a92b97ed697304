"""Ours, the baselines and the ablations as points in one design space, planned with the same
search and scored by the same simulator (like-for-like ratios).

* ``thunderkv``: phase-split, heterogeneous cloud cluster, 4-bit KV transfer, network-aware LP.
* ``vllm``: colocated, uniform TP, no PP, homogeneous A100 cluster at the same price
  (its design space is tiny, so it is enumerated exhaustively).
* ``distserve``: phase-split, homogeneous A100 cluster, raw 16-bit KV, tabu search.
* ``hexgen``: colocated, heterogeneous cloud cluster, asymmetric TP/PP, tabu search.
* ablations of ours: ``no-compression`` (16-bit KV), ``no-netaware`` (capacity-proportional routing
  that ignores links), ``no-split`` (colocated: identical to ``hexgen`` in this simulator).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import decompose
from .cluster import Cluster, GpuType, NodeSpec
from .costmodel import CostParams, build_pipeline
from .evaluate import Evaluator, SearchSpace, State, canonical
from .metrics import goodput_search
from .model import ModelSpec
from .parallel import WorkloadStats
from .plan import Plan
from .simulator import simulate
from .tabu import SearchResult, TabuConfig
from .workload import SLO, Workload

BASELINES = ("vllm", "distserve", "hexgen")
ABLATIONS = ("no-compression", "no-netaware", "no-split")

# Reference for DistServe-style SLO scales: datasheet A100-80GB SXM (gpu_catalog.md).
REFERENCE_GPU = GpuType("A100-80GB", 312, 80, 2039, 0.0)


@dataclass(slots=True)
class System:
    """A named design space on a cluster."""

    name: str
    cluster: Cluster
    space: SearchSpace
    kv_bits: int


def make_system(name: str, cloud: Cluster, inhouse: Cluster | None, kv_bits: int = 4) -> System:
    if name in ("vllm", "distserve") and inhouse is None:
        raise ValueError(f"baseline {name!r} needs the same-price homogeneous cluster (--baseline-cluster)")
    table = {
        "thunderkv": (cloud, SearchSpace(), kv_bits),
        "vllm": (inhouse, SearchSpace(("colocated",), pp=False), 16),
        "distserve": (inhouse, SearchSpace(), 16),
        "hexgen": (cloud, SearchSpace(("colocated",)), 16),
        "no-compression": (cloud, SearchSpace(), 16),
        "no-netaware": (cloud, SearchSpace(network_aware=False), kv_bits),
        "no-split": (cloud, SearchSpace(("colocated",)), kv_bits),
    }
    if name not in table:
        raise ValueError(f"unknown system {name!r}; choose from {sorted(table)}")
    c, space, bits = table[name]
    return System(name, c, space, bits)


def reference_slo(model: ModelSpec, prompt_mean: float, scale: float, params: CostParams) -> SLO:
    """``scale`` x single-request latency (mean prompt TTFT, batch-1 TPOT) on the fewest A100-80GB
    (TP within one NVLink node) that hold the model -- DistServe's SLO-scale convention."""
    for tp in (1, 2, 4, 8):
        if model.heads % tp:
            continue
        node = NodeSpec("ref", REFERENCE_GPU.name, tp, 2400)
        c = Cluster({REFERENCE_GPU.name: REFERENCE_GPU}, [node], 100.0)
        pipe = build_pipeline(c, model, params, [tuple(c.gpus)], [model.layers])
        if pipe.kv_token_capacity() > 4096:
            ttft = pipe.prefill(prompt_mean)[0]
            return SLO(scale * ttft, scale * pipe.decode_iter(1, prompt_mean))
    raise ValueError(f"{model.name} does not fit on 8 x A100-80GB")


SEARCH_SHARE = 0.75  # of a planning time limit for the tabu search; the rest replays candidates


def search_budget(cfg: TabuConfig) -> TabuConfig:
    """``cfg`` with the search's share of its time limit (selection by simulation replays the
    search's best candidates in the rest)."""
    return dataclasses.replace(cfg, time_limit_s=cfg.time_limit_s * SEARCH_SHARE)


def plan_system(sys_: System, model: ModelSpec, params: CostParams, stats: WorkloadStats,
                slo: SLO, cfg: TabuConfig,
                progress: Callable[[int, float, float], None] | None = None
                ) -> tuple[Plan, Evaluator, SearchResult | None]:
    """Search ``sys_``'s design space; returns (plan, evaluator, search result or None)."""
    ev = Evaluator(sys_.cluster, model, params.with_kv_bits(sys_.kv_bits), stats, slo, sys_.space)
    if sys_.name == "vllm":
        best: tuple[float, State] | None = None
        for tp in (1, 2, 4, 8):
            groups = [[f"{n.name}:{i + k}" for k in range(tp)]
                      for n in sys_.cluster.nodes for i in range(0, n.count - n.count % tp, tp)]
            if not groups:
                continue
            st = canonical((g, "colocated") for g in groups)
            v = ev.value(st)
            if best is None or v > best[0]:
                best = (v, st)
        assert best is not None
        return ev.plan(best[1]), ev, None
    res = decompose.search(ev, cfg, progress)  # site by site first on large clusters
    return ev.plan(res.state), ev, res


def sim_runner(plan: Plan, ev: Evaluator, wl: Workload, arrivals: str = "poisson",
               seed: int = 0) -> Callable[[float], object]:
    """``rate -> SimResult`` for ``plan`` on ``wl`` (lengths fixed, arrivals regenerated)."""
    def run(rate: float):
        return simulate(plan, ev.cluster, ev.model, ev.params, wl.arrivals_at(rate, arrivals, seed))
    return run


def system_goodput(plan: Plan, ev: Evaluator, wl: Workload, slo: SLO, arrivals: str = "poisson",
                   seed: int = 0, log: Callable[[str], None] | None = None,
                   what: str = "replay") -> tuple[float, dict[float, float]]:
    """Simulated goodput (req/s at >= 90 % SLO attainment) of ``plan``. ``log`` gets a progress
    line (naming ``what``) at most every 2 s of simulations: on clusters of thousands of GPUs one
    simulation of the steady-state span takes minutes."""
    return goodput_search(sim_runner(plan, ev, wl, arrivals, seed), slo,
                          hint=max(plan.objective, 0.05), on_sim=_sim_progress(log, what))


def _sim_progress(log: Callable[[str], None] | None, what: str,
                  every_s: float = 2.0) -> Callable[[float, float], None] | None:
    """A goodput search's ``on_sim`` that logs at most once per ``every_s`` seconds."""
    if log is None:
        return None
    t0 = time.perf_counter()
    last, count = [t0], [0]

    def on_sim(rate: float, attained: float) -> None:
        count[0] += 1
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0] = now
            log(f"{what}: {rate:.2f} req/s -> {attained:.1%} within the SLOs "
                f"(simulation {count[0]}, {now - t0:.1f} s)")
    return on_sim


def replay_candidates(res: SearchResult, ev: Evaluator, wl: Workload, slo: SLO,
                      arrivals: str = "poisson", seed: int = 0, deadline: float | None = None,
                      log: Callable[[str], None] | None = None
                      ) -> list[tuple[int, Plan, float, dict[float, float]]]:
    """Simulated goodput of the search's best distinct candidates (``res.top``, best model
    value first): ``[(rank, plan, goodput, attainment curve)]``. After the first candidate,
    replays one more only while the slowest replay so far still fits before ``deadline`` (a
    ``time.perf_counter()`` value). ``log``: progress lines, as for :func:`system_goodput`."""
    out = []
    slowest = 0.0
    cands = res.top or [(res.value, res.state)]
    for rank, (_, state) in enumerate(cands):
        t = time.perf_counter()
        if rank and deadline is not None and t + slowest > deadline:
            break
        plan = ev.plan(state)
        good, seen = system_goodput(plan, ev, wl, slo, arrivals, seed, log,
                                    f"replaying candidate {rank + 1} of {len(cands)}")
        out.append((rank, plan, good, seen))
        slowest = max(slowest, time.perf_counter() - t)
    return out


def select_by_simulation(res: SearchResult, ev: Evaluator, wl: Workload, slo: SLO,
                         arrivals: str = "poisson", seed: int = 0,
                         deadline: float | None = None, log: Callable[[str], None] | None = None
                         ) -> tuple[Plan, float, dict[float, float], dict]:
    """Replay the search's best distinct candidates (:func:`replay_candidates`) and keep the
    one with the highest simulated goodput: the roofline + queueing model ranks plans well but
    not exactly, and a plan's simulated goodput is what every system is compared on. Returns
    (plan, goodput, its attainment curve, {"candidates", "simulated", "picked_rank",
    "candidate_model_req_per_s"})."""
    cands = res.top or [(res.value, res.state)]
    replayed = replay_candidates(res, ev, wl, slo, arrivals, seed, deadline, log)
    best = replayed[0]
    for r in replayed[1:]:
        if r[2] > best[2] * (1 + 1e-9):
            best = r
    rank, plan, good, seen = best
    info = {"candidates": len(cands), "simulated": len(replayed), "picked_rank": rank,
            "candidate_model_req_per_s": [round(v, 4) for v, _ in cands]}
    return plan, good, seen, info
