"""Discrete-event replay of a workload through a plan (heapq event loop).

Prefill groups serve a FIFO queue in small token-budgeted batches (pipelined: the next batch enters
when the bottleneck stage frees). Each request's KV then crosses the network resources between the
prefill and decode stages holding each layer (``costmodel.KVLeg``: node links, and NICs where the
cluster sets them; bytes compressed or raw per the cost model). Each resource is busy for
``bytes / its bandwidth`` per transfer, and each transfer takes the earliest gap of that length
from when it is ready (``_Calendar``), so concurrent transfers share a NIC's capacity; a
transfer is done when its last leg is. A streamed transfer is booked when its prefill batch
starts, for the times its layers come out. Pipeline activations between a group's stages (each
prefill batch's tokens, each decode iteration's batch) occupy the same resources for their
bytes, in the earliest gap from when they are sent, so they take their share of a NIC from KV
transfers; their own latency stays the cost model's and does not wait for that KV. A prefill
group holds each prompt's KV in its memory until the transfer is done and starts no batch that
would overfill it. Decode groups run continuous batching: a request joins at the next
iteration boundary once its KV has arrived and its KV (prompt + output tokens) fits in memory,
and leaves after its last token. Colocated groups (baselines) interleave
prefill batches and decode iterations, prefill first; a prompt whose prefill ends during an
iteration joins at the next boundary.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from .cluster import Cluster
from .costmodel import CostParams, KVLeg, Pipeline, activation_loads, kv_transfer_legs
from .model import ModelSpec
from .parallel import PREFILL_BATCH_TOKENS
from .plan import Plan
from .workload import Workload

ARRIVAL, PREFILL_DONE, PREFILL_FREE, TRANSFER_DONE, STEP_DONE = range(5)


@dataclass(slots=True)
class SimResult:
    """Per-request timestamps (seconds; NaN = never happened) and counters."""

    arrival: np.ndarray
    first_token: np.ndarray
    transfer_done: np.ndarray
    decode_start: np.ndarray
    finish: np.ndarray
    outputs: np.ndarray
    prompts: np.ndarray
    events: int = 0

    @property
    def ttft(self) -> np.ndarray:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> np.ndarray:
        return self.finish - self.arrival

    @property
    def tpot(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            t = (self.finish - self.first_token) / np.maximum(self.outputs - 1, 1)
        return np.where(self.outputs > 1, t, 0.0)


class _Group:
    __slots__ = ("pipe", "kind", "queue", "busy_until", "free_pending", "running", "k", "ctx",
                 "kv_used", "kv_cap", "stepping", "reserve", "joining", "act")

    def __init__(self, pipe: Pipeline, kind: str, cluster: Cluster) -> None:
        self.pipe, self.kind = pipe, kind
        # (resource, seconds per activation row) of the hops between this group's stages
        self.act = [(k, b / bw) for k, (b, bw) in activation_loads(pipe, cluster).items()]
        self.queue: deque[int] = deque()
        self.busy_until, self.free_pending = 0.0, False
        self.running: list[tuple[int, int]] = []  # heap of (finish iteration, request)
        self.k, self.ctx, self.kv_used = 0, 0.0, 0
        self.kv_cap = pipe.kv_token_capacity()
        self.stepping = False
        self.reserve: dict[int, int] = {}
        self.joining: list[int] = []  # colocated: prefilled mid-iteration, join at the next boundary


class _Calendar:
    """Busy intervals of each network resource: a transfer takes the earliest gap of its
    length that starts no sooner than it is ready (non-preemptive, first come first booked).
    A single busy-until time per resource would lose the gaps: a streamed transfer booked
    when its prefill starts, for layers ready later, would block transfers that are ready
    sooner, and anything booked at a later event could not use the time before it."""

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy: dict[tuple[str, ...], list[list[float]]] = {}

    def book(self, key: tuple[str, ...], ready: float, dt: float, now: float) -> float:
        """Reserve ``dt`` s of ``key`` from the earliest free moment >= ``ready`` (>= ``now``,
        the current event time: intervals that ended by then are forgotten); returns the
        start (``ready`` when ``dt`` <= 0)."""
        if dt <= 0:
            return ready  # nothing to carry
        iv = self.busy.setdefault(key, [])
        k = 0
        while k < len(iv) and iv[k][1] <= now:
            k += 1
        if k:
            del iv[:k]
        s, k = ready, 0
        while k < len(iv):
            a, b = iv[k]
            if b <= s:
                k += 1
            elif s + dt <= a:
                break
            else:
                s, k = b, k + 1
        e = s + dt
        if k > 0 and iv[k - 1][1] >= s:  # touches the interval before: extend it
            iv[k - 1][1] = e
            k -= 1
        else:
            iv.insert(k, [s, e])
        if k + 1 < len(iv) and iv[k + 1][0] <= iv[k][1]:  # touches the next: merge
            iv[k][1] = iv.pop(k + 1)[1]
        return s


def _wrr(weights: list[float]):
    """Smooth weighted round-robin (deterministic, low-variance): each pick adds every weight to
    its route's credit and takes the route with the most credit (the first on ties), which then
    pays the sum of the weights. In numpy: a pick is O(routes), and a 2048-GPU plan has hundreds
    (a Python loop over them took 40 % of such a replay; numpy is faster from 4 routes)."""
    w = np.asarray(weights, dtype=np.float64)
    total = sum(weights)
    credit = np.zeros_like(w)
    while True:
        credit += w
        i = int(credit.argmax())
        credit[i] -= total
        yield i


def simulate(plan: Plan, cluster: Cluster, model: ModelSpec, params: CostParams,
             wl: Workload, *, kv_bytes: np.ndarray | None = None,
             stream_kv: bool | None = None) -> SimResult:
    """Replay ``wl`` through ``plan``; requests with nowhere to go never finish (NaN).

    ``kv_bytes[r]`` (opt-in; default: the planner's model) = wire bytes of request ``r``'s KV
    (default prompt tokens x the cost model's bytes per token), split over the links in the cost
    model's per-layer proportions; ``stream_kv`` (default ``params.kv_streaming``) lets a transfer
    start once the prefill's first layer is done (layer-by-layer streaming, as the serving loop
    does) instead of after the prefill; it still ends no earlier than the prefill plus one
    layer's share.
    """
    n = len(wl)
    P, O = wl.prompts, wl.outputs
    res = SimResult(wl.arrivals.copy(), *(np.full(n, np.nan) for _ in range(4)), O, P)
    P, O = P.tolist(), O.tolist()  # Python numbers: the event loop indexes them ~10^6 times
    groups = [_Group(g.pipeline(cluster, model, params), g.phase, cluster)
              if min(g.layers) > 0 else None for g in plan.groups]
    entries: list[tuple[int, int]] = []
    weights: list[float] = []
    for a, i in enumerate(plan.prefill_ids):
        for b, j in enumerate(plan.decode_ids):
            if plan.flow[a, b] > 0 and groups[i] and groups[j]:
                entries.append((i, j))
                weights.append(float(plan.flow[a, b]))
    for a, i in enumerate(plan.coloc_ids):
        if plan.coloc_flow[a] > 0 and groups[i]:
            entries.append((i, i))
            weights.append(float(plan.coloc_flow[a]))
    if not entries:
        return res
    pair_legs: dict[tuple[int, int], list[KVLeg]] = {
        (i, j): kv_transfer_legs(groups[i].pipe, groups[j].pipe, params, cluster)
        for i, j in set(entries) if i != j}
    if kv_bytes is not None:
        kv_bytes = np.asarray(kv_bytes, dtype=np.float64)
        if kv_bytes.shape != (n,) or (kv_bytes < 0).any():
            raise ValueError("kv_bytes needs one non-negative byte count per request")
        pair_total = {k: sum(leg.bytes_per_token for leg in legs if leg.is_link)
                      for k, legs in pair_legs.items()}
    if stream_kv is None:
        stream_kv = params.kv_streaming
    links = _Calendar()  # per network resource: its busy intervals
    dest = np.zeros(n, dtype=np.int64)
    nl = model.layers

    def send_kv(a: int, pi: int, start: float, lat: float) -> None:
        """Book request ``a``'s KV from prefill group ``pi`` to its decode group on every
        resource it crosses and schedule its TRANSFER_DONE. Streamed (``lat`` > 0, booked when
        the prefill batch starts at ``start``): layer l is ready ``start + lat * (l + 1) / nl``,
        so the layers leave while the prefill runs, ahead of anything booked on the resource
        after the batch started (a decode iteration's activations, a later prefill's KV).
        Otherwise (``lat`` = 0, booked at the prefill's end ``start``): all of it after."""
        di = int(dest[a])
        if di == pi:
            return
        done = start + lat
        for leg in pair_legs[(pi, di)]:
            dt = (P[a] * leg.bytes_per_token if kv_bytes is None
                  else kv_bytes[a] * leg.bytes_per_token / pair_total[(pi, di)]) / leg.bps
            s = links.book(leg.key, start + lat * (leg.first + 1) / nl, dt, start)
            end = max(s + dt, start + lat * (leg.last + 1) / nl + dt / leg.n_layers)
            done = max(done, end)
        push(done, TRANSFER_DONE, a, pi)  # pi: the prefill group holding the KV

    def activations(g: _Group, rows: int, now: float) -> None:
        for key, sec in g.act:
            links.book(key, now, rows * sec, now)
    heap: list = []
    seq = 0

    def push(t: float, kind: int, a: int, b: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, a, b))

    def start_prefill(gi: int, now: float) -> None:
        g = groups[gi]
        if g.free_pending or not g.queue or now < g.busy_until:
            return
        batch, toks, sq = [], 0, 0.0
        while g.queue and (not batch or toks + P[g.queue[0]] <= PREFILL_BATCH_TOKENS):
            r = g.queue[0]
            if g.kv_used + P[r] > g.kv_cap and (g.kv_used or batch):
                break  # held KV not yet transferred: wait for a TRANSFER_DONE to free memory
            g.queue.popleft()
            batch.append(r)
            g.kv_used += int(P[r])
            toks += int(P[r])
            sq += float(P[r]) ** 2
        if not batch:
            return
        lat, busy = g.pipe.prefill(toks, sq)
        if g.act:
            activations(g, toks, now)
        g.busy_until, g.free_pending = now + busy, True
        push(now + busy, PREFILL_FREE, gi)
        for r in batch:
            push(now + lat, PREFILL_DONE, r, gi)
            if stream_kv and O[r] > 1:  # its layers leave as the prefill produces them
                send_kv(r, gi, now, lat)

    def admit(g: _Group, r: int, now: float) -> None:
        need = int(P[r] + O[r])
        g.reserve[r] = need
        g.kv_used += need
        g.ctx += P[r] + 1
        heapq.heappush(g.running, (g.k + int(O[r]) - 1, r))
        res.decode_start[r] = now

    def step(gi: int, now: float) -> None:
        """Start the next action of a decode/colocated group if it is idle."""
        g = groups[gi]
        if g.stepping:
            return
        if g.kind == "colocated" and g.queue:
            batch, toks, sq = [], 0, 0.0
            while g.queue and (not batch or toks + P[g.queue[0]] <= PREFILL_BATCH_TOKENS):
                r = g.queue[0]
                if g.kv_used + P[r] + O[r] > g.kv_cap and (g.running or batch):
                    break
                g.queue.popleft()
                batch.append(r)
                g.kv_used += int(P[r] + O[r])
                toks += int(P[r])
                sq += float(P[r]) ** 2
            if batch:  # the bottleneck stage is free again after `busy` (PP overlaps the rest)
                lat, busy = g.pipe.prefill(toks, sq)
                if g.act:
                    activations(g, toks, now)
                g.stepping = True
                for r in batch:
                    push(now + lat, PREFILL_DONE, r, gi)
                push(now + busy, STEP_DONE, gi, 1)
                return
        while g.joining:
            r = g.joining.pop(0)
            g.kv_used -= int(P[r] + O[r])
            admit(g, r, now)
        if g.kind == "decode":
            while g.queue and (g.kv_used + P[g.queue[0]] + O[g.queue[0]] <= g.kv_cap or not g.running):
                admit(g, g.queue.popleft(), now)
        if g.running:
            g.stepping = True
            if g.act:
                activations(g, len(g.running), now)
            push(now + g.pipe.decode_iter(len(g.running), g.ctx), STEP_DONE, gi, 0)

    def step_done(gi: int, now: float, was_prefill: int) -> None:
        g = groups[gi]
        g.stepping = False
        if not was_prefill:
            g.k += 1
            g.ctx += len(g.running)
            while g.running and g.running[0][0] <= g.k:
                _, r = heapq.heappop(g.running)
                res.finish[r] = now
                g.ctx -= P[r] + O[r]
                g.kv_used -= g.reserve.pop(r, int(P[r] + O[r]))
        step(gi, now)

    src = _wrr(weights)
    for r in range(n):
        push(float(wl.arrivals[r]), ARRIVAL, r)
    while heap:
        now, _, kind, a, b = heapq.heappop(heap)
        res.events += 1
        if kind == ARRIVAL:
            pi, di = entries[next(src)]
            dest[a] = di
            groups[pi].queue.append(a)
            if pi == di:
                step(pi, now)
            else:
                start_prefill(pi, now)
        elif kind == PREFILL_FREE:
            groups[a].free_pending = False
            start_prefill(a, now)
        elif kind == PREFILL_DONE:
            res.first_token[a] = now
            di = int(dest[a])
            if O[a] <= 1:
                res.finish[a] = now
                if b == di:
                    groups[di].kv_used -= int(P[a] + O[a])
                else:  # nothing to send: the prefill group frees the prompt's KV
                    groups[b].kv_used -= int(P[a])
                    start_prefill(b, now)
                continue
            if b == di:  # colocated: joins this group's running batch at its next boundary
                groups[di].joining.append(a)
                step(di, now)  # the group may have gone idle when its pipeline freed up
                continue
            if not stream_kv:
                send_kv(a, b, now, 0.0)
        elif kind == TRANSFER_DONE:
            res.transfer_done[a] = now
            groups[b].kv_used -= int(P[a])  # the prefill group frees the prompt's KV
            start_prefill(b, now)
            di = int(dest[a])
            groups[di].queue.append(a)
            step(di, now)
        else:
            step_done(a, now, b)
    return res
