"""The search objective: a grouping + phases -> best configs (lower level) -> routed req/s.

A *state* is a canonical tuple of groups ``((gpu, ...), phase)``. Its value is the maximum rate
the routing LP can push from prefill groups to decode groups (plus colocated groups' own rates),
each group contributing the SLO-constrained capacity of its best parallel configuration.
GPUs of one node are interchangeable, so results are cached per (node, count) signature.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .cluster import Cluster
from .costmodel import CostParams, activation_loads, exposed_transfer_time, kv_transfer_legs
from .model import ModelSpec
from .parallel import DECODE_TPOT_MARGIN, GroupPerf, WorkloadStats, best_config
from .plan import Plan, PlanGroup
from .routing import RoutingProblem, max_throughput, proportional, solve
from .workload import SLO

Group = tuple[tuple[str, ...], str]
State = tuple[Group, ...]


def canonical(groups) -> State:
    """Sort GPUs inside groups and groups among themselves."""
    return tuple(sorted((tuple(sorted(g)), ph) for g, ph in groups))


HYBRID = ("prefill", "decode", "colocated")  # split groups and colocated groups side by side


@dataclass(slots=True)
class SearchSpace:
    """Which plans a search may produce (ours, ablations and baselines differ only here)."""

    phases: tuple[str, ...] = ("prefill", "decode")
    network_aware: bool = True
    pp: bool = True  # False: one TP stage per group (vLLM-like)

    def __post_init__(self) -> None:
        ok = {("prefill", "decode"), ("colocated",), HYBRID}
        if tuple(self.phases) not in ok:
            raise ValueError(f"phases must be one of {ok}")

    @property
    def split(self) -> bool:
        return "prefill" in self.phases


class Evaluator:
    """Caches lower-level results and scores states."""

    def __init__(self, cluster: Cluster, model: ModelSpec, params: CostParams,
                 stats: WorkloadStats, slo: SLO, space: SearchSpace | None = None) -> None:
        self.cluster, self.model, self.params = cluster, model, params
        self.stats, self.slo = stats, slo
        self.space = space or SearchSpace()
        self._perf: dict[tuple, GroupPerf] = {}
        self._pair: dict[tuple, tuple[dict, dict, float]] = {}
        self._cap: dict[Group, float] = {}
        self._value: dict[frozenset, float] = {}
        self.evaluations = 0

    # --- lower level ----------------------------------------------------------------------
    def signature(self, gpus) -> tuple:
        counts: dict[str, int] = {}
        for g in gpus:
            n = g.rsplit(":", 1)[0]
            counts[n] = counts.get(n, 0) + 1
        return tuple(sorted(counts.items(), key=lambda kv: self.cluster.node_rank(kv[0])))

    def perf(self, gpus, phase: str) -> GroupPerf:
        key = (self.signature(gpus), phase)
        if key not in self._perf:
            self._perf[key] = best_config(self.cluster, self.model, self.params, sorted(gpus),
                                          phase, self.stats, self.slo, self.space.pp)
        return self._perf[key]

    @property
    def transfer_budget(self) -> float:
        """Mean KV transfer time a pair may add after the prefill, or it is not routed: twice
        the TPOT slack a median request leaves over its tokens after the planned decode
        iteration, ``2 x (1 - DECODE_TPOT_MARGIN) x tpot x (p50 outputs - 1)``. A loose cap
        that only drops pairs whose transfers are plainly too slow; the simulator charges each
        routed pair its actual transfer."""
        return (1 - DECODE_TPOT_MARGIN) * 2 * self.slo.tpot * max(self.stats.output_p50 - 1, 1)

    def activation_bytes(self, gpus, phase: str) -> dict[tuple[str, ...], tuple[float, float]]:
        """Per network resource, (bytes per mean request, bytes/s) of the pipeline activations
        group ``gpus`` in ``phase`` moves between its stages: prompt rows in a prefill, one row
        per generated token after the first in decode iterations, both when colocated."""
        pipe = self.perf(gpus, phase).pipeline
        if pipe is None:
            return {}
        st = self.stats
        decode_rows = max(st.output_mean - 1, 0.0)
        rows = {"prefill": st.prompt_mean, "decode": decode_rows,
                "colocated": st.prompt_mean + decode_rows}[phase]
        return {k: (b * rows, bw) for k, (b, bw) in activation_loads(pipe, self.cluster).items()}

    def _pair_info(self, pg, dg) -> tuple[dict, dict, float]:
        """(bytes per mean request, bytes/s) per network resource, and the exposed transfer
        time, of shipping KV from prefill group ``pg`` to decode group ``dg``. The bytes include
        both groups' pipeline activations for that request (:meth:`activation_bytes`)."""
        key = (self.signature(pg), self.signature(dg))
        if key not in self._pair:
            p, d = self.perf(pg, "prefill").pipeline, self.perf(dg, "decode").pipeline
            legs = kv_transfer_legs(p, d, self.params, self.cluster)
            load = {leg.key: leg.bytes_per_token * self.stats.prompt_mean for leg in legs}
            bps = {leg.key: leg.bps for leg in legs}
            for gpus, phase in ((pg, "prefill"), (dg, "decode")):
                for k, (b, bw) in self.activation_bytes(gpus, phase).items():
                    load[k] = load.get(k, 0.0) + b
                    bps[k] = bw
            t = exposed_transfer_time(self.stats.prompt_mean, legs,
                                      self.perf(pg, "prefill").prefill_latency, self.model.layers,
                                      self.params.kv_streaming)
            self._pair[key] = (load, bps, t)
        return self._pair[key]

    def routing_problem(self, pre: list, dec: list, coloc: list = ()) -> RoutingProblem:
        """The routing LP of prefill groups ``pre`` and decode groups ``dec``; colocated groups
        ``coloc`` (at their capacity) only take their activations' share of the resources."""
        pcap = [self.perf(g, "prefill").capacity for g in pre]
        dcap = [self.perf(g, "decode").capacity for g in dec]
        pb, pt, caps = [], [], {}
        for pg, pc in zip(pre, pcap):
            rb, rt = [], []
            for dg, dc in zip(dec, dcap):
                if pc > 0 and dc > 0:
                    load, bps, t = self._pair_info(pg, dg)
                else:
                    load, bps, t = {}, {}, float("inf")
                rb.append(load)
                rt.append(t)
                for k, bw in bps.items():
                    caps[k] = bw * self.params.link_util
            pb.append(rb)
            pt.append(rt)
        for g in coloc:
            rate = self.perf(g, "colocated").capacity
            for k, (b, _) in self.activation_bytes(g, "colocated").items():
                if k in caps:
                    caps[k] = max(caps[k] - rate * b, 0.0)
        return RoutingProblem(pcap, dcap, pb, pt, caps, self.transfer_budget)

    # --- objective ------------------------------------------------------------------------
    def value(self, state: State) -> float:
        """Routed req/s of ``state`` (the search maximises this). It depends only on each
        group's node signature and phase, so states that differ by interchangeable GPUs share
        one routing LP (memoised)."""
        self.evaluations += 1
        key = frozenset(Counter((self.signature(g), ph) for g, ph in state).items())
        v = self._value.get(key)
        if v is None:
            v = self._value[key] = self._route_value(state)
        return v

    def _route_value(self, state: State) -> float:
        pre = [g for g, ph in state if ph == "prefill"]
        dec = [g for g, ph in state if ph == "decode"]
        col = [g for g, ph in state if ph == "colocated"]
        total = sum(self.perf(g, "colocated").capacity for g in col)
        if pre and dec:
            pcap = sum(self.perf(g, "prefill").capacity for g in pre)
            dcap = sum(self.perf(g, "decode").capacity for g in dec)
            if min(pcap, dcap) > 0:
                prob = self.routing_problem(pre, dec, col)
                total += (max_throughput(prob) if self.space.network_aware
                          else proportional(prob).total)
        return total

    def upper_bound(self, state: State) -> float:
        """Cheap bound on :meth:`value` (no LP) used to prune neighbours."""
        pc = sum(self.perf(g, "prefill").capacity for g, ph in state if ph == "prefill")
        dc = sum(self.perf(g, "decode").capacity for g, ph in state if ph == "decode")
        co = sum(self.perf(g, "colocated").capacity for g, ph in state if ph == "colocated")
        return min(pc, dc) + co

    def cap(self, group: Group) -> float:
        """Capacity of one (gpus, phase) group (memoised per group)."""
        c = self._cap.get(group)
        if c is None:
            c = self._cap[group] = self.perf(group[0], group[1]).capacity
        return c

    def bound_terms(self, state: State) -> dict[str, float]:
        """Per-phase capacity sums of ``state`` (for :meth:`bound_delta`)."""
        t = {"prefill": 0.0, "decode": 0.0, "colocated": 0.0}
        for g in state:
            t[g[1]] += self.cap(g)
        return t

    def bound_delta(self, terms: dict[str, float], removed, added) -> float:
        """:meth:`upper_bound` of the state with ``removed`` replaced by ``added``, from the
        current state's :meth:`bound_terms` (only the changed groups are looked up)."""
        t = dict(terms)
        for g in removed:
            t[g[1]] -= self.cap(g)
        for g in added:
            t[g[1]] += self.cap(g)
        return round(min(t["prefill"], t["decode"]) + t["colocated"], 9)

    # --- materialise ----------------------------------------------------------------------
    def _group(self, gpus, phase: str) -> PlanGroup:
        perf = self.perf(gpus, phase)
        pool: dict[str, list[str]] = {}
        for g in sorted(gpus):
            pool.setdefault(g.rsplit(":", 1)[0], []).append(g)
        if perf.pipeline is None:  # infeasible group: keep it visible, one stage per node
            stages = [tuple(v) for v in pool.values()]
            return PlanGroup(phase, stages, [0] * len(stages), 0.0)
        if sorted(x for s in perf.stage_gpus for x in s) == sorted(gpus):
            stages = [tuple(s) for s in perf.stage_gpus]  # keep the exact GPUs (fixed configs)
        else:  # same node signature, other GPUs of those nodes
            stages = [tuple(pool[s[0].rsplit(":", 1)[0]].pop(0) for _ in s) for s in perf.stage_gpus]
        return PlanGroup(phase, stages, [st.layers for st in perf.pipeline.stages], perf.capacity)

    def plan(self, state: State) -> Plan:
        """Materialise ``state`` with concrete stages and the tie-broken LP routing."""
        groups = [self._group(g, ph) for g, ph in state]
        plan = Plan(groups)
        pre = [g for g, ph in state if ph == "prefill"]
        dec = [g for g, ph in state if ph == "decode"]
        plan.flow = np.zeros((len(pre), len(dec)))
        if pre and dec:
            prob = self.routing_problem(pre, dec, [g for g, ph in state if ph == "colocated"])
            r = solve(prob) if self.space.network_aware else proportional(prob)
            plan.flow = r.flow
        plan.coloc_flow = [self.perf(g, ph).capacity for g, ph in state if ph == "colocated"]
        plan.objective = float(plan.flow.sum() + sum(plan.coloc_flow))
        return plan
