"""Lightweight rescheduling: keep the surviving groups and their parallel configs (no weight
reload for them), re-solve phase designation (flip moves) and routing (LP). The surviving GPUs of
groups that lost a GPU ("orphans") must reload weights anyway, so they are re-grouped freely
(split / merge / move among orphan groups only) with fresh parallel configs.

Between that and a full re-plan (every GPU reloads) sits a *partial reload*
(:func:`reschedule_with_reload`): also dissolve up to K intact groups, chosen greedily by the
goodput they buy, and re-group their GPUs with the orphans (only those GPUs reload). It helps
where the surviving groups' layouts no longer fit: a lost node that carried much of one phase,
or a workload shift (for one as large as conversation -> coding, a full re-plan still wins).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .cluster import Cluster
from .costmodel import CostParams, Pipeline
from .evaluate import HYBRID, Evaluator, SearchSpace, State, canonical
from .model import ModelSpec
from .parallel import GroupPerf, WorkloadStats, capacity
from .plan import Plan, PlanGroup
from .tabu import TabuConfig, initial_state, tabu_search
from .workload import SLO


class FixedConfigEvaluator(Evaluator):
    """An :class:`Evaluator` whose given groups keep their stage layouts and layer splits; any
    other GPU set (re-formed orphans) gets the usual best configuration."""

    def __init__(self, cluster: Cluster, model: ModelSpec, params: CostParams,
                 stats: WorkloadStats, slo: SLO, groups: list[PlanGroup],
                 space: SearchSpace | None = None) -> None:
        super().__init__(cluster, model, params, stats, slo, space or SearchSpace())
        self._fixed: dict[tuple[str, ...], PlanGroup] = {tuple(sorted(g.gpus)): g for g in groups}
        self._pipes: dict[tuple[str, ...], Pipeline] = {}

    @property
    def frozen(self) -> frozenset:
        return frozenset(self._fixed)

    def signature(self, gpus) -> tuple:
        t = tuple(sorted(gpus))
        return ("fixed",) + t if t in self._fixed else super().signature(gpus)

    def perf(self, gpus, phase: str) -> GroupPerf:
        sig = self.signature(gpus)
        if sig[0] != "fixed":
            return super().perf(gpus, phase)
        key = (sig, phase)
        if key not in self._perf:
            g = self._fixed[sig[1:]]
            if sig not in self._pipes:
                self._pipes[sig] = g.pipeline(self.cluster, self.model, self.params)
            perf = capacity(self._pipes[sig], phase, self.stats, self.slo)
            perf.stage_gpus = list(g.stage_gpus)
            self._perf[key] = perf
        return self._perf[key]


@dataclass(slots=True)
class RescheduleResult:
    plan: Plan
    evaluator: Evaluator
    seconds: float
    dropped_groups: int
    kept_gpus: int
    regrouped_gpus: int = 0   # orphans placed in new groups (these reload weights)
    idle_gpus: int = 0        # orphans left out (no feasible group)
    dissolved: tuple[int, ...] = ()  # indices of intact plan groups dissolved to be re-grouped
    goodput: float | None = None  # simulated goodput of ``plan``, once replayed


def replayed_goodput(r: RescheduleResult, wl, slo: SLO, arrivals: str = "poisson",
                     seed: int = 0) -> float:
    """Simulated goodput of ``r.plan`` on ``wl`` (0 for a plan with no capacity), kept in
    ``r.goodput`` so a result is replayed once."""
    from .systems import system_goodput

    if r.goodput is None:
        r.goodput = (system_goodput(r.plan, r.evaluator, wl, slo, arrivals, seed)[0]
                     if r.plan.objective > 0 else 0.0)
    return r.goodput


def lost_gpus(cluster: Cluster, fail_nodes: set[str] | None, fail_gpus: set[str] | None
              ) -> set[str]:
    """Every GPU ("node:index") lost with ``fail_nodes`` plus the single ``fail_gpus``."""
    nodes = set(fail_nodes or ())
    return set(fail_gpus or ()) | {g for g in cluster.gpus if g.rsplit(":", 1)[0] in nodes}


def surviving_cluster(cluster: Cluster, fail_nodes: set[str] | None,
                      fail_gpus: set[str] | None) -> Cluster:
    """``cluster`` without the lost nodes and with one GPU fewer on a node per lost single GPU
    (GPUs of a node are interchangeable: the survivors are renumbered from 0). What a full
    re-plan may use and what is still paid for; the lightweight plan keeps the original GPU
    ids, in :func:`reschedule`'s cluster minus ``fail_nodes``."""
    c = cluster.without_nodes(set(fail_nodes)) if fail_nodes else cluster
    lost: dict[str, int] = {}
    for g in set(fail_gpus or ()) - lost_gpus(cluster, fail_nodes, None):
        node = g.rsplit(":", 1)[0]
        lost[node] = lost.get(node, 0) + 1
    if not lost:
        return c
    gone = {n.name for n in c.nodes if lost.get(n.name, 0) >= n.count}
    c = c.without_nodes(gone) if gone else c
    return dataclasses.replace(c, nodes=[dataclasses.replace(n, count=n.count - lost.get(n.name, 0))
                                         for n in c.nodes])


def plan_nodes(plan: Plan, cluster: Cluster) -> list[str]:
    """The nodes ``plan``'s GPUs sit on, in the cluster's order."""
    used = {g.rsplit(":", 1)[0] for g in plan.gpus()}
    return [n.name for n in cluster.nodes if n.name in used]


def reschedule(plan: Plan, cluster: Cluster, model: ModelSpec, params: CostParams,
               stats: WorkloadStats, slo: SLO, fail_nodes: set[str] | None = None,
               fail_gpus: set[str] | None = None, cfg: TabuConfig | None = None,
               regroup: bool = True, time_limit_s: float = 1.5,
               hybrid: bool = True, dissolve: tuple[int, ...] = ()) -> RescheduleResult:
    """Adjust ``plan`` after losing ``fail_nodes``/``fail_gpus`` and/or for new ``stats``.
    ``regroup``: re-form the orphaned GPUs of dropped groups into new groups. ``hybrid``: a
    phase-split plan's groups may also become colocated replicas (prefill and decode their own
    requests; the weights they hold already suffice), e.g. when a lost node carried a whole
    prefill replica and flipping a decode group to prefill would starve decode. ``dissolve``:
    indices into ``plan.groups`` of intact groups whose GPUs are re-grouped like orphans (they
    reload weights; needs ``regroup``)."""
    t0 = time.perf_counter()
    fail_nodes, fail_gpus = set(fail_nodes or ()), set(fail_gpus or ())
    unknown = {n for n in fail_nodes if not cluster.has_node(n)}
    if unknown:
        raise ValueError(f"unknown node(s) {sorted(unknown)}")
    lost = lost_gpus(cluster, fail_nodes, fail_gpus)
    if {n.name for n in cluster.nodes} <= fail_nodes or lost >= set(cluster.gpus):
        raise ValueError("every GPU of the cluster is lost: nothing to reschedule")
    dissolve = tuple(sorted(set(dissolve)))
    bad = [i for i in dissolve if not 0 <= i < len(plan.groups)]
    if bad:
        raise ValueError(f"dissolve: no group(s) {bad} in a plan of {len(plan.groups)}")
    broken = [i for i in dissolve if set(plan.groups[i].gpus) & lost]
    if broken:
        raise ValueError(f"dissolve: group(s) {broken} lost a GPU already (their survivors are "
                         "re-grouped anyway)")
    if dissolve and not regroup:
        raise ValueError("dissolving groups needs regroup=True")
    keep = [g for i, g in enumerate(plan.groups)
            if not (set(g.gpus) & lost) and min(g.layers) > 0 and i not in dissolve]
    kept = {x for g in keep for x in g.gpus}
    orphans = sorted({x for g in plan.groups for x in g.gpus} - kept - lost) if regroup else []
    colocated = bool(plan.groups) and all(g.phase == "colocated" for g in plan.groups)
    new_cluster = cluster.without_nodes(fail_nodes) if fail_nodes else cluster
    space = SearchSpace(("colocated",) if colocated else HYBRID if hybrid else ("prefill", "decode"))
    ev = FixedConfigEvaluator(new_cluster, model, params, stats, slo, keep, space)
    start: State = canonical(list((g.gpus, g.phase) for g in keep)
                             + list(initial_state(ev, orphans) if orphans else ()))
    moves = ("flip",) if not orphans else ("flip", "split", "merge", "move")
    if start and (not colocated or orphans):
        left = max(0.1, time_limit_s - (time.perf_counter() - t0))
        if colocated:  # colocated plans have no phases to flip
            moves = tuple(m for m in moves if m != "flip")
        # a partial reload re-forms whole groups: a longer search (its time limit still binds)
        cfg = cfg or TabuConfig(max_iters=1000 if dissolve else 60, patience=25 if dissolve else 15,
                                time_limit_s=left, moves=moves)
        found = tabu_search(ev, cfg, start=start, frozen=ev.frozen)
        start = found.state

    def feasible(state: State) -> State:
        # orphan groups that cannot hold the model stay idle (no weights to load)
        return canonical((g, ph) for g, ph in state if ev.perf(g, ph).pipeline is not None)
    final = feasible(start)
    new = ev.plan(final) if final else Plan([])
    placed = sum(len(g) for g, _ in final) - len(kept)
    return RescheduleResult(new, ev, time.perf_counter() - t0,
                            len(plan.groups) - len(keep) - len(dissolve), len(kept), placed,
                            len(orphans) - placed, dissolve)


def reschedule_with_reload(plan: Plan, cluster: Cluster, model: ModelSpec, params: CostParams,
                           stats: WorkloadStats, slo: SLO, reload_groups: int,
                           fail_nodes: set[str] | None = None, fail_gpus: set[str] | None = None,
                           step_time_s: float = 2.0, score=None,
                           progress=lambda s: None) -> RescheduleResult:
    """:func:`reschedule`, then greedily dissolve up to ``reload_groups`` intact groups: each
    round tries dissolving every remaining intact group (a ``step_time_s`` re-grouping search
    each) and keeps the one with the highest ``score(result)`` (default: the model value; the
    CLI passes simulated goodput), stopping early when none improves it.
    ``seconds`` of the result is the whole greedy search; its GPUs that reload weights are
    ``regrouped_gpus`` (orphans of lost groups plus the dissolved groups' GPUs)."""
    if reload_groups < 0:
        raise ValueError("reload_groups must be >= 0")
    t0 = time.perf_counter()
    args = (plan, cluster, model, params, stats, slo, fail_nodes, fail_gpus)
    score = score or (lambda r: r.plan.objective)
    best = reschedule(*args)
    best_s = score(best)
    lost = lost_gpus(cluster, fail_nodes, fail_gpus)
    intact = [i for i, g in enumerate(plan.groups) if not set(g.gpus) & lost]
    chosen: tuple[int, ...] = ()
    for rnd in range(reload_groups):
        trials = [reschedule(*args, time_limit_s=step_time_s, dissolve=chosen + (i,))
                  for i in intact if i not in chosen]
        if not trials:
            break
        top_s, top = max(((score(r), r) for r in trials), key=lambda x: x[0])
        if top_s <= best_s * (1 + 1e-6):
            progress(f"  reload round {rnd + 1}: no group is worth dissolving (best "
                     f"{list(top.dissolved)}: {top_s:.2f} req/s, have {best_s:.2f}); stopping")
            break
        progress(f"  reload round {rnd + 1}: dissolving group(s) {list(top.dissolved)} -> "
                 f"{top_s:.2f} req/s (was {best_s:.2f})")
        best, best_s, chosen = top, top_s, top.dissolved
    best.seconds = time.perf_counter() - t0
    return best


def check_fail_nodes(cluster: Cluster, nodes: set[str]) -> None:
    """Raise ValueError, naming ``--fail`` and the cluster's nodes, unless every one of
    ``nodes`` is a node of ``cluster`` ('each' sweeps them all, so it stands alone)."""
    if "each" in nodes:
        raise ValueError("--fail each loses every node in turn: give it alone, not in a list")
    unknown = sorted(n for n in nodes if not cluster.has_node(n))
    if unknown:
        raise ValueError(f"--fail: unknown node(s) {unknown}; the plan's cluster has "
                         f"{', '.join(n.name for n in cluster.nodes)}")


def reschedule_document(doc: dict, plan: Plan, fails: list[str], wl, compare: bool = True,
                        log=lambda s: None, regroup: bool = True, reload_groups: int = 0,
                        replan: TabuConfig | None = None, arrivals: str | None = None,
                        seed: int | None = None) -> dict:
    """``thunderkv plan --reschedule``: adjust ``plan`` (from ``doc``) for failed nodes/GPUs and
    workload ``wl``, dissolving up to ``reload_groups`` intact groups (partial reload);
    optionally compare with a full re-plan of the surviving GPUs (its search effort:
    ``replan``, default :class:`TabuConfig`'s; colocated groups allowed where no phase-split
    plan serves, as in planning, and only colocated ones for a colocated plan). The
    lightweight tier decides by the cost model alone (with replays that span a steady state
    the model ranks its candidates as the simulator does, and one replay of a 32-GPU plan
    takes longer than the 2 s the decision may); its plan is then replayed for the report,
    outside ``reschedule_seconds``, with ``arrivals`` and ``seed`` (default: the plan's, as
    recorded in ``doc["workload"]``). ``cost_per_hour``: the GPUs still there, idle or not.
    Returns the new plan document."""
    from .metrics import summarize
    from .plan import inputs_from_dict, inputs_to_dict
    from .systems import search_budget, select_by_simulation, sim_runner
    from .tabu import tabu_search

    cluster, model, params, slo = inputs_from_dict(doc["inputs"])
    nodes = {f for f in fails if ":" not in f}
    gpus = {f for f in fails if ":" in f}
    check_fail_nodes(cluster, nodes)
    bad = [g for g in gpus if g not in cluster.gpus]
    if bad:
        raise ValueError(f"--fail: unknown GPU(s) {bad}")
    stats = WorkloadStats.of(wl)
    recorded = doc.get("workload", {})
    arrivals = arrivals or recorded.get("arrivals") or "poisson"
    seed = seed if seed is not None else int(recorded.get("seed") or 0)
    wl.check_arrivals(arrivals)
    log(f"rescheduling after losing {sorted(fails) or 'nothing'} (kept groups: phases + routing;"
        " orphaned GPUs re-grouped)")

    def simulated(r: RescheduleResult) -> float:
        return replayed_goodput(r, wl, slo, arrivals, seed)

    if reload_groups:
        if not regroup:
            raise ValueError("--reload-groups needs re-grouping (drop --no-regroup)")
        res = reschedule_with_reload(plan, cluster, model, params, stats, slo, reload_groups,
                                     nodes, gpus, score=simulated, progress=log)
    else:
        res = reschedule(plan, cluster, model, params, stats, slo, nodes, gpus, regroup=regroup)
    new_cluster = res.evaluator.cluster
    remaining = surviving_cluster(cluster, nodes, gpus)
    good = simulated(res)  # the reload greedy already replayed its pick
    m = (summarize(sim_runner(res.plan, res.evaluator, wl, arrivals, seed)(good), slo)
         if good > 0 else {})
    out = {"plan": res.plan.to_dict(), "reschedule_seconds": round(res.seconds, 4),
           "failed": sorted(fails), "dropped_groups": res.dropped_groups,
           "kept_gpus": res.kept_gpus, "regrouped_gpus": res.regrouped_gpus,
           "idle_gpus": res.idle_gpus, "reload_groups": reload_groups,
           "dissolved_groups": list(res.dissolved),
           "predicted": {"goodput_req_per_s": round(good, 4),
                         # the metrics below are at this rate (simulate --plan replays it)
                         **({"rate_req_per_s": round(good, 4)} if good > 0 else {}),
                         **{k: round(v, 4) for k, v in m.items() if isinstance(v, float)}},
           "cost_per_hour": round(remaining.price_per_hour(), 4),
           "workload": {**recorded, "arrivals": arrivals, "seed": seed},
           "slo": doc.get("slo", {}), "inputs": inputs_to_dict(new_cluster, model, params, slo)}
    out["inputs"]["workload_stats"] = {k: getattr(stats, k) for k in stats.__slots__}
    log(f"  {'lightweight' if not res.dissolved else 'partial reload'}: {res.seconds:.2f} s, "
        f"{res.regrouped_gpus} GPUs reload, simulated goodput {good:.2f} req/s")
    if compare:
        t0 = time.perf_counter()
        cfg = replan or TabuConfig()  # the same budget split as planning (driver)
        colocated = bool(plan.groups) and all(g.phase == "colocated" for g in plan.groups)
        spaces = [SearchSpace(("colocated",))] if colocated else [SearchSpace(), SearchSpace(HYBRID)]
        for space in spaces:  # the second only where no phase-split plan serves (driver's rule)
            ts = time.perf_counter()
            ev = Evaluator(remaining, model, params, stats, slo, space)
            found = tabu_search(ev, search_budget(cfg))
            full, fg, _, _ = select_by_simulation(found, ev, wl, slo, arrivals, seed,
                                                  deadline=ts + cfg.time_limit_s)
            if full.objective > 0:
                break
        secs = time.perf_counter() - t0
        out["full_replan"] = {"goodput_req_per_s": round(fg, 4), "solve_seconds": round(secs, 3),
                              "model_req_per_s": round(full.objective, 4),
                              "iterations": found.iterations}
        out["ratio_to_full_replan"] = round(good / fg, 4) if fg > 0 else None
        log(f"  full re-plan: {secs:.1f} s, simulated goodput {fg:.2f} req/s")
    return out


def failure_sweep(doc: dict, plan: Plan, wl, compare: bool = True, log=lambda s: None,
                  regroup: bool = True, reload_groups: int = 0,
                  replan: TabuConfig | None = None, arrivals: str | None = None,
                  seed: int | None = None) -> dict:
    """``thunderkv plan --reschedule PLAN.json --fail each``: reschedule after losing each node
    the plan uses, one at a time, each compared with a full re-plan of the surviving cluster.
    Returns {"sweep": [one row per node], "summary": {...}, "original_goodput_req_per_s"}."""
    from .plan import inputs_from_dict

    cluster = inputs_from_dict(doc["inputs"])[0]
    nodes = plan_nodes(plan, cluster)
    rows = []
    workload = dict(doc.get("workload", {}))  # with the arrivals and seed replayed, once known
    if len(cluster.nodes) == 1:
        raise ValueError("--fail each needs a cluster of two or more nodes: losing the only one "
                         "leaves nothing to reschedule")
    for i, node in enumerate(nodes, 1):
        log(f"[{i}/{len(nodes)}] losing {node}")
        r = reschedule_document(doc, plan, [node], wl, compare=compare, log=log, regroup=regroup,
                                reload_groups=reload_groups, replan=replan, arrivals=arrivals,
                                seed=seed)
        workload = r["workload"]
        rows.append({"failed": node,
                     "lightweight_goodput_req_per_s": r["predicted"]["goodput_req_per_s"],
                     "full_replan_goodput_req_per_s": r.get("full_replan", {}).get(
                         "goodput_req_per_s"),
                     "ratio_to_full_replan": r.get("ratio_to_full_replan"),
                     "reschedule_seconds": r["reschedule_seconds"],
                     "dropped_groups": r["dropped_groups"], "regrouped_gpus": r["regrouped_gpus"],
                     "dissolved_groups": r["dissolved_groups"],
                     "idle_gpus": r["idle_gpus"]})
    ratios = [x["ratio_to_full_replan"] for x in rows if x["ratio_to_full_replan"] is not None]
    summary = {"nodes": len(rows), "reload_groups": reload_groups,
               "max_reschedule_seconds": max((x["reschedule_seconds"] for x in rows), default=0.0)}
    if ratios:
        summary.update({"min_ratio": min(ratios), "mean_ratio": round(sum(ratios) / len(ratios), 4),
                        "within_10_percent": sum(x >= 0.9 for x in ratios)})
    return {"sweep": rows, "summary": summary,
            "original_goodput_req_per_s": doc.get("predicted", {}).get("goodput_req_per_s"),
            "workload": workload, "plan": doc["plan"]}
