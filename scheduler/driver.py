"""End-to-end planning used by ``thunderkv plan``: search ours, the baselines and ablations,
score all of them with the same simulator, and assemble the JSON document."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cluster import Cluster, GpuType, NodeSpec
from .costmodel import CostParams
from .diagnose import zero_goodput_notes
from .evaluate import HYBRID, Evaluator, SearchSpace
from .metrics import required_scale, summarize
from .model import ModelSpec
from .parallel import WorkloadStats
from .plan import Plan, inputs_to_dict
from .resilience import select_resilient
from .systems import (
    System,
    make_system,
    plan_system,
    search_budget,
    select_by_simulation,
    sim_runner,
    system_goodput,
)
from .tabu import TabuConfig
from .workload import SLO, Workload

Log = Callable[[str], None]


@dataclass(slots=True)
class PlanRequest:
    """Everything ``thunderkv plan`` was asked to do."""

    cluster: Cluster
    model: ModelSpec
    workload: Workload
    slo: SLO
    params: CostParams = field(default_factory=CostParams)
    tabu: TabuConfig = field(default_factory=TabuConfig)
    baseline_cluster: Cluster | None = None
    systems: tuple[str, ...] = ("vllm", "distserve", "hexgen")
    rate: float | None = None
    arrivals: str = "poisson"
    seed: int = 0
    select_by_simulation: bool = True  # replay the search's best candidates, keep the best
    resilience: float | None = None  # ours: among candidates within this fraction of the best
    #                                  goodput, keep the one that best survives a lost node

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.resilience is not None and not 0 <= self.resilience < 1:
            raise ValueError("resilience tolerance must be in [0, 1)")


def same_price_a100(cluster: Cluster, price: float) -> Cluster:
    """The homogeneous A100-80GB NVLink cluster (nodes of 8) costing about ``cluster``'s $/h."""
    n = max(1, round(cluster.price_per_hour() / price))
    gt = GpuType("A100-80GB", 312, 80, 2039, price)
    nodes = [NodeSpec(f"a100node{i}", gt.name, min(8, n - 8 * i), 2400) for i in range((n + 7) // 8)]
    return Cluster({gt.name: gt}, nodes, 200.0, name=f"same-price-a100x{n}",
                   price_source=f"${price}/A100-hour")


def _metrics(plan: Plan, ev: Evaluator, wl: Workload, slo: SLO, rate: float, arrivals: str,
             seed: int) -> dict[str, float]:
    """Metrics of one replay at ``rate``, with the SLO scale it needs for 90 % attainment
    (``slo_scale_needed``, what the latency-deadline ratios compare)."""
    if rate <= 0 or plan.objective <= 0:
        return {"slo_attainment": 0.0}
    res = sim_runner(plan, ev, wl, arrivals, seed)(rate)
    return {**summarize(res, slo), "slo_scale_needed": required_scale(res, slo)}


def evaluate_system(sys_: System, req: PlanRequest, stats: WorkloadStats, log: Log
                    ) -> dict[str, Any]:
    """Plan one system and score it: goodput, metrics at goodput, timings."""
    t0 = time.perf_counter()
    last = [0.0]

    def progress(it: int, best: float, el: float) -> None:
        if el - last[0] >= 2.0:
            last[0] = el
            log(f"  {sys_.name}: iteration {it}, best {best:.2f} req/s (model), {el:.1f} s")

    def named(line: str) -> None:
        log(f"  {sys_.name}: {line}")

    cfg = req.tabu
    if req.select_by_simulation:  # the search leaves part of the time budget to the replays
        cfg = search_budget(cfg)
    plan, ev, res = plan_system(sys_, req.model, req.params, stats, req.slo, cfg, progress)
    search = None if res is None else {"iterations": res.iterations, "evaluations": res.evaluations}
    resilience = None
    if res is not None and req.resilience is not None and sys_.name == "thunderkv":
        log(f"  {sys_.name}: scoring candidates within {req.resilience:.0%} of the best goodput "
            "by goodput after losing each node (lightweight rescheduling)")
        plan, good, seen, resilience = select_resilient(res, ev, req.workload, req.slo,
                                                        req.resilience, req.arrivals, req.seed, log)
        solve = time.perf_counter() - t0
    elif res is not None and req.select_by_simulation:
        plan, good, seen, info = select_by_simulation(res, ev, req.workload, req.slo,
                                                      req.arrivals, req.seed,
                                                      deadline=t0 + req.tabu.time_limit_s,
                                                      log=named)
        search.update(info)
        solve = time.perf_counter() - t0
    else:
        solve = time.perf_counter() - t0
        good, seen = system_goodput(plan, ev, req.workload, req.slo, req.arrivals, req.seed,
                                    named, "goodput search")
    m = _metrics(plan, ev, req.workload, req.slo, good, req.arrivals, req.seed)
    cost = sys_.cluster.price_per_hour()
    log(f"  {sys_.name}: model {plan.objective:.2f} req/s, simulated goodput {good:.2f} req/s, "
        f"${cost:.2f}/h, planned in {solve:.1f} s")
    return {"name": sys_.name, "plan": plan, "ev": ev, "solve_seconds": solve,
            "search": search, "resilience": resilience,
            "goodput_req_per_s": good, "cost_per_hour": cost, "cluster": sys_.cluster.name,
            "metrics_at_goodput": m, "attainment_curve": dict(sorted(seen.items()))}


def public(r: dict[str, Any]) -> dict[str, Any]:
    """The JSON block of one system (same keys for ours and the baselines)."""
    m = r["metrics_at_goodput"]
    keys = ("slo_attainment", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "e2e_p50", "e2e_p90")
    out = {"goodput_req_per_s": round(r["goodput_req_per_s"], 4),
           "tokens_per_s": round(m.get("tokens_per_s", 0.0), 2),
           **{k: (round(m[k], 4) if k in m and np.isfinite(m[k]) else None) for k in keys},
           "model_req_per_s": round(r["plan"].objective, 4),
           "cost_per_hour": round(r["cost_per_hour"], 4),
           "goodput_per_dollar_hour": round(r["goodput_req_per_s"] / r["cost_per_hour"], 4)
           if r["cost_per_hour"] > 0 else None,
           "cluster": r["cluster"], "solve_seconds": round(r["solve_seconds"], 3)}
    if r["search"]:
        out["search"] = r["search"]
    if r.get("resilience"):
        out["resilience"] = r["resilience"]
    return out


def run_plan(req: PlanRequest, log: Log = lambda s: None) -> tuple[dict[str, Any], dict]:
    """Plan ours + requested systems; returns (JSON document, raw results by system name)."""
    req.workload.check_arrivals(req.arrivals)
    stats = WorkloadStats.of(req.workload)
    log(f"workload {req.workload.name}: {len(req.workload)} requests, prompt mean "
        f"{stats.prompt_mean:.0f}, output mean {stats.output_mean:.0f}; SLO TTFT {req.slo.ttft:.3g} s, "
        f"TPOT {req.slo.tpot:.3g} s")
    raw: dict[str, dict] = {}
    notes: list[str] = []
    names = ("thunderkv",) + tuple(s for s in req.systems if s != "thunderkv")
    for name in names:
        log(f"planning {name} ...")
        sys_ = make_system(name, req.cluster, req.baseline_cluster, req.params.kv_bits)
        raw[name] = evaluate_system(sys_, req, stats, log)
        if name == "thunderkv" and raw[name]["plan"].objective <= 0:
            # too few replicas to split the phases (e.g. one GPU): let groups be colocated
            why = zero_goodput_notes(raw[name]["plan"], raw[name]["ev"], req.workload, req.slo)
            log("  thunderkv: no phase-split plan serves requests here; planning again with "
                "colocated groups allowed")
            hybrid = System(name, req.cluster, SearchSpace(HYBRID), req.params.kv_bits)
            raw[name] = evaluate_system(hybrid, req, stats, log)
            notes.append("no phase-split plan serves requests on this cluster ("
                         + "; ".join(why) + "); this plan may use colocated groups")
    ours = raw["thunderkv"]
    if ours["goodput_req_per_s"] <= 0:
        notes += zero_goodput_notes(ours["plan"], ours["ev"], req.workload, req.slo)
    rate = req.rate if req.rate is not None else ours["goodput_req_per_s"]
    pred = public(ours)
    at_rate = (ours["metrics_at_goodput"] if rate == ours["goodput_req_per_s"] else  # replayed
               _metrics(ours["plan"], ours["ev"], req.workload, req.slo, rate, req.arrivals,
                        req.seed))
    pred.update({"rate_req_per_s": round(rate, 4), "at_rate": _clean(at_rate)})
    doc: dict[str, Any] = {
        "plan": ours["plan"].to_dict(), "predicted": pred,
        "cost_per_hour": round(ours["cost_per_hour"], 4),
        "solve_seconds": round(ours["solve_seconds"], 3),
        "baselines": {n: public(raw[n]) for n in names if n in ("vllm", "distserve", "hexgen")},
        "ablations": {n: public(raw[n]) for n in names if n not in ("thunderkv", "vllm", "distserve", "hexgen")},
        "workload": {"name": req.workload.name, **{k: round(v, 3) for k, v in req.workload.stats().items()},
                     "arrivals": req.arrivals, "replay_seconds": req.workload.min_replay_s,
                     "seed": req.seed},
        "slo": {"ttft": req.slo.ttft, "tpot": req.slo.tpot, "target_attainment": 0.9},
        "inputs": inputs_to_dict(req.cluster, req.model, req.params, req.slo),
    }
    doc["ratios"] = ratios(raw, req)
    if notes:
        doc["notes"] = notes
    return doc, raw


def ratios(raw: dict[str, dict], req: PlanRequest) -> dict[str, Any]:
    """Goodput, goodput-per-dollar and latency-deadline ratios of ours over each other system.

    Latency deadline, pairwise: at the lower of the two goodputs (the highest rate the other
    system sustains, usually), the SLO scale the other system needs for 90 % attainment over
    the one ours needs at that rate (``slo_scale_needed[n]``). Each ratio depends only on the
    two systems compared, not on which others ran (until 2026-11-29h one common rate -- the
    lowest goodput of every system, ablations included -- served them all)."""
    ours = raw["thunderkv"]
    run_ours = sim_runner(ours["plan"], ours["ev"], req.workload, req.arrivals, req.seed)
    # rate -> our SLO scale there (systems share rates; at our goodput it was replayed already)
    ours_scale = {ours["goodput_req_per_s"]: ours["metrics_at_goodput"].get(
        "slo_scale_needed", float("inf"))}
    out: dict[str, Any] = {}
    needed: dict[str, dict[str, float | None]] = {}
    for n in (n for n in raw if n != "thunderkv"):
        g = raw[n]["goodput_req_per_s"]
        ent = {"goodput": round(ours["goodput_req_per_s"] / g, 3) if g > 0 else None}
        c = raw[n]["cost_per_hour"]
        if g > 0 and c > 0:
            ent["goodput_per_dollar"] = round(ours["goodput_req_per_s"] / ours["cost_per_hour"] / (g / c), 3)
        rate = min(g, ours["goodput_req_per_s"])
        if rate > 0:
            theirs = (raw[n]["metrics_at_goodput"]["slo_scale_needed"] if rate == g else
                      required_scale(sim_runner(raw[n]["plan"], raw[n]["ev"], req.workload,
                                                req.arrivals, req.seed)(rate), req.slo))
            if rate not in ours_scale:
                ours_scale[rate] = required_scale(run_ours(rate), req.slo)
            mine = ours_scale[rate]
            needed[n] = {"rate_req_per_s": round(rate, 4),
                         "thunderkv": round(mine, 3) if np.isfinite(mine) else None,
                         n: round(theirs, 3) if np.isfinite(theirs) else None}
            if np.isfinite(theirs) and np.isfinite(mine) and mine > 0:
                ent["latency_deadline"] = round(theirs / mine, 3)
        out[n] = ent
    out["slo_scale_needed"] = needed
    return out


def _clean(d: dict[str, float]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else
                (None if isinstance(v, float) else v)) for k, v in d.items()}
