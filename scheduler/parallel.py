"""Lower level, part 1: the best parallel configuration of one GPU group for its phase.

A group's GPUs are split per node into *segments*; each segment is cut into TP sets of size
``tp`` (a power of two dividing the segment; TP never crosses nodes), and the TP sets are chained
into a pipeline along the fastest links (network-aware order). Layers are split unevenly across
stages (greedy, proportional to stage speed or memory, capped by memory). Each candidate is scored
by the request rate it sustains within the SLO for the phase:

* prefill: latency-driven -- the highest rate at which >= TTFT_TARGET of the prompts (per prompt
  quantile: own latency + M/G/1 queueing wait, exponential tail) meet the TTFT SLO;
* decode: throughput-driven -- the largest continuous batch whose iteration time meets the TPOT SLO
  and whose KV fits in memory, converted to req/s by Little's law;
* colocated (baselines, and survivors when rescheduling): both, with prefill stalling decode
  iterations (vLLM's default).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .cluster import Cluster, GpuType
from .costmodel import CostParams, Pipeline, build_pipeline
from .model import ModelSpec
from .workload import SLO, Workload

PHASES = ("prefill", "decode", "colocated")
DECODE_TPOT_MARGIN = 0.85   # share of the TPOT SLO the decode iteration may use (rest: transfer, jitter)
TTFT_TARGET = 0.92          # share of prompts a prefill group plans to serve within the TTFT SLO
                            # (the goal is 0.90 for TTFT and TPOT together; 0.95 left capacity
                            # unused, 0.90 overfilled, in simulation on cloud-32 / LLaMA-30B)
MAX_BATCH_TOKENS = 4096     # prefill tokens in flight per group (memory reserve for activations)
PREFILL_BATCH_TOKENS = 512  # queued prompts are batched only up to this many tokens: beyond it
                            # prefill is compute-bound, so batching adds latency, not throughput
                            # (a pipelined group takes each longer prompt as its own micro-batch)
MAX_LAYOUTS = 24            # cap on TP combinations tried per group


@dataclass(slots=True, frozen=True)
class WorkloadStats:
    """What the capacity formulas need from a workload (deterministic quantiles, not samples)."""

    prompt_q: tuple[float, ...]
    output_mean: float
    ctx_eff: float  # output-weighted mean context of a decoding request
    prompt_mean: float = 0.0
    output_p50: float = 0.0
    ctx_mem: float = 0.0  # output-weighted mean of prompt+output (KV reserved per request)

    @classmethod
    def of(cls, w: Workload, n_quantiles: int = 16) -> WorkloadStats:
        qs = np.quantile(w.prompts, (np.arange(n_quantiles) + 0.5) / n_quantiles)
        o, p = w.outputs.astype(float), w.prompts.astype(float)
        ctx = float((o * (p + o / 2)).sum() / o.sum())
        mem = float((o * (p + o)).sum() / o.sum())
        return cls(tuple(float(x) for x in qs), float(o.mean()), ctx, float(p.mean()),
                   float(np.median(o)), mem)


@dataclass(slots=True)
class GroupPerf:
    """Result of the lower level for one group and phase (capacity 0 = infeasible)."""

    phase: str
    capacity: float                     # req/s within the SLO
    pipeline: Pipeline | None = None
    prefill_latency: float = 0.0        # mean single-request prefill latency, s
    tpot: float = 0.0                   # decode iteration time at the chosen batch, s
    batch: int = 0
    kv_tokens: int = 0
    note: str = ""
    stage_gpus: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.capacity > 0 and self.pipeline is not None


def segments(cluster: Cluster, gpus: list[str]) -> list[tuple[str, list[str]]]:
    """GPUs grouped by node, nodes chained greedily along the fastest links."""
    by_node: dict[str, list[str]] = {}
    for g in sorted(gpus, key=lambda g: (cluster.node_rank(g.rsplit(":", 1)[0]), g)):
        by_node.setdefault(g.rsplit(":", 1)[0], []).append(g)
    order = [next(iter(by_node))]
    rest = [n for n in by_node if n != order[0]]
    while rest:
        nxt = max(rest, key=lambda n: (cluster.link_gbps(order[-1], n), -cluster.node_rank(n)))
        order.append(nxt)
        rest.remove(nxt)
    return [(n, by_node[n]) for n in order]


def _tp_options(n: int, model: ModelSpec) -> list[int]:
    return [t for t in (1, 2, 4, 8) if n % t == 0 and model.heads % t == 0 and model.kv_heads % t == 0]


def layouts(cluster: Cluster, model: ModelSpec, gpus: list[str],
            pp: bool = True) -> list[list[tuple[str, ...]]]:
    """Candidate stage layouts (list of per-stage GPU tuples) of a group; ``pp=False``: TP only."""
    segs = segments(cluster, gpus)
    if not pp:
        n = len(gpus)
        ok = len(segs) == 1 and n in _tp_options(n, model)
        return [[tuple(segs[0][1])]] if ok else []
    opts = [_tp_options(len(gs), model) for _, gs in segs]
    if math.prod(len(o) for o in opts) <= MAX_LAYOUTS:
        combos = list(itertools.product(*opts))
    else:  # "as uniform as possible" TP (never materialise the product: 3^30 for 30 nodes)
        combos = sorted({tuple(max(x for x in o if x <= t) for o in opts) for t in (1, 2, 4, 8)})
    out = []
    for combo in combos:
        stages = [tuple(gs[i:i + t]) for (_, gs), t in zip(segs, combo) for i in range(0, len(gs), t)]
        if len(stages) <= model.layers:
            out.append(stages)
    return out


def split_layers(cluster: Cluster, model: ModelSpec, params: CostParams,
                 stage_gpus: list[tuple[str, ...]], weight: str) -> list[int] | None:
    """Uneven layer split: greedy by ``weight`` ('compute', 'bandwidth' or 'memory'), memory-capped."""
    layers = _split_layers(tuple((cluster.gpu_type(gs[0]), len(gs)) for gs in stage_gpus),
                           model, params, weight, MAX_BATCH_TOKENS)
    return None if layers is None else list(layers)


@functools.lru_cache(maxsize=1 << 14)
def _split_layers(stages: tuple[tuple[GpuType, int], ...], model: ModelSpec, params: CostParams,
                  weight: str, batch_tokens: int) -> tuple[int, ...] | None:
    """:func:`split_layers` of stages given as (GPU type, TP) -- all it depends on (with the
    KV room it reserves, ``batch_tokens``), so the search's many groups of the same shape
    share one result."""
    n = len(stages)
    lw = model.layer_params * model.dtype_bytes
    kvl = model.kv_bytes_per_token(1)
    caps, speed = [], []
    for i, (gt, tp) in enumerate(stages):
        usable = gt.mem_gb * 1e9 * params.mem_util - params.reserve_gb * 1e9
        emb = ((i == 0) + (i == n - 1)) * model.vocab * model.hidden * model.dtype_bytes / tp
        caps.append(int((usable - emb) / ((lw + batch_tokens * kvl) / tp)))
        speed.append({"compute": gt.flops, "bandwidth": gt.bw, "memory": usable}[weight] * tp)
    if min(caps) < 1 or sum(caps) < model.layers:
        return None
    # Each extra layer goes to the stage that would finish it soonest, ((layers + 1) / speed, i)
    # smallest, among stages below their cap: a heap of those keys (stages at the cap leave it).
    layers = [1] * n
    heap = [(2 / speed[i], i) for i in range(n) if caps[i] > 1]
    heapq.heapify(heap)
    for _ in range(model.layers - n):
        _, i = heapq.heappop(heap)
        layers[i] += 1
        if layers[i] < caps[i]:
            heapq.heappush(heap, ((layers[i] + 1) / speed[i], i))
    return tuple(layers)


def _prefill_profile(pipe: Pipeline, st: WorkloadStats) -> tuple[tuple[float, ...], float, float]:
    """Single-prompt prefill latency per prompt quantile, and mean / mean square of the busy
    time (bottleneck stage) per prompt."""
    lat, busy = pipe.prefill_each(st.prompt_q)
    return tuple(lat), sum(busy) / len(busy), sum(b * b for b in busy) / len(busy)


def ttft_attainment(lats, extra: float, lam: float, es: float, es2: float,
                    ttft: float) -> float:
    """Fraction of requests whose TTFT (own prefill latency ``lats`` per prompt quantile + a fixed
    ``extra`` + M/G/1 queueing wait) meets ``ttft`` at arrival rate ``lam``. The wait is 0 with
    probability 1 - rho, else exponential with the Pollaczek-Khinchine mean (P(W > x) =
    rho exp(-x rho / E[W])). Plain Python: called ~10^5 times per search on 16 quantiles."""
    room = ttft - extra
    rho = lam * es
    if rho >= 1:
        return 0.0
    if rho <= 0:
        return sum(1 for x in lats if x <= room) / len(lats)
    k = rho * 2 * (1 - rho) / (lam * es2)  # rho / E[W]
    return sum(1 - rho * math.exp(-(room - x) * k) for x in lats if x <= room) / len(lats)


def _max_rate(ok, hi: float, iters: int = 20) -> float:
    """Largest rate in (0, hi] with ``ok(rate)`` (monotone: true below some threshold), 0 if
    none."""
    lo = 0.0
    if not ok(hi * 1e-6):
        return 0.0
    if ok(hi):
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _batches(bmax: int) -> list[int]:
    """Candidate colocated batch sizes: 1..8, then steps of 1.25x, and ``bmax`` itself (a
    memory-bound group must not be credited with the grid point below its memory limit)."""
    out, b = [], 1
    while b <= bmax:
        out.append(b)
        b = b + 1 if b < 8 else int(b * 1.25)
    if out and out[-1] < bmax:
        out.append(bmax)
    return out


def _largest_decode_batch(pipe: Pipeline, st: WorkloadStats, bmax: int, limit: float) -> int:
    """Largest batch ``b <= bmax`` whose decode iteration takes ``<= limit`` s (0 if none).
    The iteration time grows with ``b`` (every stage term is affine in it), so bisect."""
    def ok(b: int) -> bool:
        return pipe.decode_iter(b, b * st.ctx_eff) <= limit

    if bmax < 1 or not ok(1):
        return 0
    if ok(bmax):
        return bmax
    lo, hi = 1, bmax  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def capacity(pipe: Pipeline, phase: str, st: WorkloadStats, slo: SLO) -> GroupPerf:
    """Sustainable req/s of ``pipe`` in ``phase`` within ``slo`` (0 when it cannot meet it)."""
    kv = pipe.kv_token_capacity()
    if kv < MAX_BATCH_TOKENS:
        return GroupPerf(phase, 0.0, note="does not fit in memory")
    lats, es, es2 = _prefill_profile(pipe, st)
    perf = GroupPerf(phase, 0.0, pipe, sum(lats) / len(lats), kv_tokens=kv)
    if phase == "prefill":
        perf.capacity = _max_rate(lambda lam: ttft_attainment(lats, 0.0, lam, es, es2, slo.ttft)
                                  >= TTFT_TARGET, 0.95 / es)
        return perf
    bmax = int((kv - (MAX_BATCH_TOKENS if phase == "colocated" else 0)) / st.ctx_mem)
    if phase == "decode":
        # Little's law at the largest batch that fits in memory and meets the TPOT margin:
        # b / t(b) only grows with b (t(b)/b falls: every term of t is affine in b with a
        # non-negative intercept), so no smaller batch does better.
        b = _largest_decode_batch(pipe, st, bmax, DECODE_TPOT_MARGIN * slo.tpot)
        if b:
            t = pipe.decode_iter(b, b * st.ctx_eff)
            perf.capacity, perf.tpot, perf.batch = b / (st.output_mean * t), t, b
        return perf
    for b in _batches(bmax):  # colocated: prefill stalls the decode iterations
        t = pipe.decode_iter(b, b * st.ctx_eff)
        lam = b / (st.output_mean * t + b * es)
        rho = lam * es
        if rho >= 1 or t / (1 - rho) > DECODE_TPOT_MARGIN * slo.tpot:
            continue
        if ttft_attainment(lats, t, lam, es, es2, slo.ttft) < TTFT_TARGET:
            continue
        if lam > perf.capacity:
            perf.capacity, perf.tpot, perf.batch = lam, t, b
    return perf


def best_config(cluster: Cluster, model: ModelSpec, params: CostParams, gpus: list[str],
                phase: str, st: WorkloadStats, slo: SLO, pp: bool = True) -> GroupPerf:
    """Best (layout, layer split) of ``gpus`` for ``phase``: max capacity, then min latency.
    ``pp=False`` restricts to one TP stage (vLLM-like uniform TP)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    weights = ("compute",) if phase == "prefill" else ("bandwidth", "memory")
    best = GroupPerf(phase, 0.0, note="no feasible layout")
    for stage_gpus in layouts(cluster, model, gpus, pp):
        for w in weights:
            layers = split_layers(cluster, model, params, stage_gpus, w)
            if layers is None:
                continue
            pipe = build_pipeline(cluster, model, params, stage_gpus, layers)
            perf = capacity(pipe, phase, st, slo)
            key = (perf.capacity, -perf.prefill_latency if phase == "prefill" else -perf.tpot)
            if perf.pipeline is not None and (best.pipeline is None or key > (
                    best.capacity, -best.prefill_latency if phase == "prefill" else -best.tpot)):
                perf.stage_gpus = stage_gpus
                best = perf
    return best
