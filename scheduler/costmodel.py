"""Roofline cost model: prefill and decode latency of a pipeline of TP stages, KV transfer, memory.

A *stage* is ``tp`` GPUs of one type on one node holding ``layers`` consecutive layers (tensor
parallel inside the node, all-reduce over the intra-node link). Stages chained in order form a
pipeline (one model replica); consecutive stages exchange activations over the link between their
nodes. Times come from ``max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth)`` per stage plus
communication; achieved = datasheet peak x per-type efficiency factor (cluster catalog).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .cluster import Cluster, GpuType
from .kv_bytes import kv_bytes_per_element
from .model import ModelSpec


@dataclass(slots=True, frozen=True)
class CostParams:
    """Knobs of the cost model (all documented defaults; change them to calibrate)."""

    mem_util: float = 0.90          # fraction of GPU memory the server may use
    reserve_gb: float = 1.5         # activations / workspace per GPU
    intra_latency_s: float = 10e-6  # per collective step / message inside a node
    inter_latency_s: float = 200e-6  # per message between nodes
    kv_bits: int = 4                # KV bits on the wire (16 = uncompressed)
    kv_group: int = 64              # format v1 group size
    link_util: float = 0.9          # usable fraction of a link for KV transfer (LP capacity)
    kv_streaming: bool = True       # KV leaves layer by layer while prefill runs (as thunderkv
                                    # serve and thunderkv.transfer do); False: after the prefill

    def __post_init__(self) -> None:
        if not 0 < self.mem_util <= 1 or not 0 < self.link_util <= 1:
            raise ValueError("mem_util and link_util must be in (0, 1]")
        kv_bytes_per_element(self.kv_bits, self.kv_group)  # validates bits/group

    def with_kv_bits(self, bits: int) -> CostParams:
        return dataclasses.replace(self, kv_bits=bits)


@dataclass(slots=True, frozen=True)
class Stage:
    """``tp`` GPUs of ``gpu`` on node ``node`` running ``layers`` layers."""

    node: str
    gpu: GpuType
    tp: int
    layers: int
    gpus: tuple[str, ...]
    intra_bps: float  # intra-node link, bytes/s
    first: bool = False
    last: bool = False

    def __post_init__(self) -> None:
        if self.tp < 1 or self.layers < 1 or len(self.gpus) != self.tp:
            raise ValueError(f"bad stage: tp={self.tp} layers={self.layers} gpus={self.gpus}")


def allreduce_time(nbytes: float, tp: int, link_bps: float, latency: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``tp`` GPUs."""
    if tp == 1:
        return 0.0
    return 2 * (tp - 1) / tp * nbytes / link_bps + 2 * (tp - 1) * latency


class Pipeline:
    """Latency model of one replica: ``stages`` in order, ``hop_bps[i]`` between stage i and i+1."""

    __slots__ = ("model", "stages", "hop_bps", "p", "_dc", "_db", "_dx", "_wb", "_kvl",
                 "_ar", "_arl", "_hop_lat", "_ovp", "_ovl", "_ovs", "_fl", "_bw", "_decode_terms")

    def __init__(self, model: ModelSpec, stages: list[Stage], hop_bps: list[float],
                 params: CostParams) -> None:
        if len(hop_bps) != len(stages) - 1:
            raise ValueError("need one hop bandwidth between consecutive stages")
        if sum(s.layers for s in stages) != model.layers:
            raise ValueError(f"stages hold {sum(s.layers for s in stages)} layers, "
                             f"model has {model.layers}")
        self.model, self.stages, self.hop_bps, self.p = model, stages, hop_bps, params
        m, db = model, model.dtype_bytes
        # Per stage, per-GPU coefficients: FLOPs per token, weight bytes, KV bytes per context token.
        self._dc = [2 * m.layer_params * s.layers / s.tp for s in stages]
        self._dx = [4 * m.hidden * s.layers / s.tp for s in stages]  # attention FLOPs per ctx token
        self._wb = [self.weight_bytes(i) for i in range(len(stages))]
        self._kvl = [m.kv_bytes_per_token(s.layers) / s.tp for s in stages]
        self._db = db
        # all-reduce: 2 per layer of (tokens x hidden) activations
        self._ar = [2 * s.layers * (2 * (s.tp - 1) / s.tp) * m.hidden * db / s.intra_bps
                    if s.tp > 1 else 0.0 for s in stages]
        self._arl = [2 * s.layers * 2 * (s.tp - 1) * params.intra_latency_s for s in stages]
        self._hop_lat = [params.intra_latency_s if a.node == b.node else params.inter_latency_s
                         for a, b in zip(stages, stages[1:])]
        # fixed per-pass / per-sequence overheads (GpuType knobs; 0 for GPUs)
        self._ovl = [s.layers * s.gpu.layer_overhead_s for s in stages]
        self._ovs = [s.layers * s.gpu.seq_overhead_s for s in stages]
        self._ovp = [a + b for a, b in zip(self._ovl, self._ovs)]  # prefill: one sequence
        self._fl = [s.gpu.flops for s in stages]  # achieved FLOP/s and bytes/s per GPU
        self._bw = [s.gpu.bw for s in stages]
        # decode_iter's per-stage operands in one tuple each (it runs ~10^5 times per search)
        self._decode_terms = list(zip(self._dc, self._dx, self._wb, self._kvl,
                                      self._fl, self._bw,
                                      self._ar, self._arl, self._ovl, self._ovs))

    # --- memory ---------------------------------------------------------------------------
    def weight_bytes(self, i: int) -> float:
        """Weight bytes per GPU of stage ``i`` (embedding on the first, LM head on the last)."""
        s, m = self.stages[i], self.model
        w = s.layers * m.layer_params + (s.first + s.last) * m.vocab * m.hidden
        return w * m.dtype_bytes / s.tp

    def kv_token_capacity(self) -> int:
        """Tokens of KV cache the replica can hold (<= 0 means the weights do not fit)."""
        cap = None
        for i, s in enumerate(self.stages):
            free = s.gpu.mem_gb * 1e9 * self.p.mem_util - self.p.reserve_gb * 1e9 - self._wb[i]
            toks = int(free / self._kvl[i]) if free > 0 else -1
            cap = toks if cap is None else min(cap, toks)
        return cap

    # --- prefill --------------------------------------------------------------------------
    def _prefill_stage_times(self, tokens, sq_tokens, maximum=max) -> list:
        """Per-stage seconds; floats, or numpy arrays elementwise with ``maximum=np.maximum``."""
        out = []
        for i in range(len(self.stages)):
            flops = self._dc[i] * tokens + self._dx[i] * sq_tokens / 2  # causal: half of s^2
            nbytes = self._wb[i] + self._kvl[i] * tokens
            t = maximum(flops / self._fl[i], nbytes / self._bw[i])
            out.append(t + self._ar[i] * tokens + self._arl[i] + self._ovp[i])
        return out

    def _hop(self, i: int, rows: float) -> float:
        return rows * self.model.hidden * self._db / self.hop_bps[i] + self._hop_lat[i]

    def prefill(self, tokens: float, sq_tokens: float | None = None) -> tuple[float, float]:
        """(latency, busy) of prefilling ``tokens`` prompt tokens (``sq_tokens`` = sum of s^2).

        ``busy`` is how long the bottleneck stage is occupied: the interval at which a pipelined
        replica can accept the next batch.
        """
        sq = tokens * tokens if sq_tokens is None else sq_tokens
        st = self._prefill_stage_times(tokens, sq)
        hops = [self._hop(i, tokens) for i in range(len(self.hop_bps))]
        return sum(st) + sum(hops), max(max(st), max(hops, default=0.0))

    def prefill_each(self, prompts: Sequence[float]) -> tuple[list[float], list[float]]:
        """:meth:`prefill` of each single prompt in ``prompts`` (token counts): the same
        arithmetic, elementwise over a float64 array, so the results are identical."""
        q = np.asarray(prompts, dtype=np.float64)
        st = self._prefill_stage_times(q, q * q, np.maximum)
        hops = [self._hop(i, q) for i in range(len(self.hop_bps))]
        lat = sum(st) + sum(hops)
        return lat.tolist(), functools.reduce(np.maximum, st + hops).tolist()

    # --- decode ---------------------------------------------------------------------------
    def decode_iter(self, batch: int, ctx_tokens: float) -> float:
        """Seconds between consecutive tokens of a request when ``batch`` requests holding
        ``ctx_tokens`` context tokens in total decode together (PP: batch split into micro-batches).
        """
        if batch <= 0:
            return 0.0
        n = len(self.stages)
        mb = min(n, batch)
        b, c = batch / mb, ctx_tokens / mb
        tsum, tmax = 0.0, 0.0
        for dc, dx, wb, kvl, fl, bw, ar, arl, ovl, ovs in self._decode_terms:
            flops = dc * b + dx * c
            nbytes = wb + kvl * c
            t = max(flops / fl, nbytes / bw) + ar * b + arl + ovl + ovs * b
            tsum += t
            tmax = t if t > tmax else tmax
        hidden, db = self.model.hidden, self._db
        for bps, lat in zip(self.hop_bps, self._hop_lat):
            tsum += b * hidden * db / bps + lat  # = _hop, inlined
        return max(tsum, mb * tmax)


def build_pipeline(cluster: Cluster, model: ModelSpec, params: CostParams,
                   stage_gpus: list[tuple[str, ...]], layers: list[int]) -> Pipeline:
    """Pipeline from per-stage GPU tuples (each on one node) and a layer split."""
    stages = []
    n = len(stage_gpus)
    for i, (gs, nl) in enumerate(zip(stage_gpus, layers, strict=True)):
        node = cluster.node_of(gs[0])
        stages.append(Stage(node.name, cluster.catalog[node.gpu], len(gs), nl, tuple(gs),
                            cluster.link_bytes_per_s(node.name, node.name), i == 0, i == n - 1))
    hops = [min(bw for _, bw in network_resources(cluster, a.node, b.node))  # link or NIC
            for a, b in zip(stages, stages[1:])]
    return Pipeline(model, stages, hops, params)


def link_key(a: str, b: str) -> tuple[str, str]:
    """Undirected key of the link between nodes ``a`` and ``b``."""
    return (a, b) if a <= b else (b, a)


def network_resources(cluster: Cluster, a: str, b: str) -> list[tuple[tuple[str, ...], float]]:
    """``(key, bytes/s)`` of every resource that bytes from node ``a`` to node ``b`` occupy: their
    link (``a == b``: the node's intra-node link) and, between two nodes, ``a``'s NIC out and
    ``b``'s NIC in where the cluster sets a NIC (keys as in :class:`KVLeg`)."""
    uses = [(link_key(a, b), cluster.link_bytes_per_s(a, b))]
    if a != b:
        uses += [(("nic", n, d), bw) for n, d in ((a, "out"), (b, "in"))
                 if (bw := cluster.nic_bytes_per_s(n)) is not None]
    return uses


def activation_loads(pipe: Pipeline, cluster: Cluster) -> dict[tuple[str, ...], tuple[float, float]]:
    """Per network resource the pipeline's stage-to-stage hops cross: ``(bytes per row, bytes/s)``,
    a row being one token's activations (``hidden x dtype bytes``) through every hop that uses
    the resource. A prefill of ``T`` tokens puts ``T`` rows on each, a decode iteration of a
    batch of ``b`` requests ``b`` rows. (Their latency is already in :class:`Pipeline`; this is
    the capacity they take from KV transfers sharing the link or NIC.)"""
    row = pipe.model.hidden * pipe.model.dtype_bytes
    out: dict[tuple[str, ...], tuple[float, float]] = {}
    for s, t in zip(pipe.stages, pipe.stages[1:]):
        for key, bw in network_resources(cluster, s.node, t.node):
            out[key] = (out.get(key, (0.0, bw))[0] + row, bw)
    return out


@dataclass(slots=True, frozen=True)
class KVLeg:
    """One network resource a prefill -> decode KV transfer occupies.

    ``key``: ``(a, b)`` = the link between nodes a and b (:func:`link_key`; ``a == b``: a node's
    intra-node link), ``("nic", node, "out" | "in")`` = one direction of a node's NIC.
    ``bytes_per_token``: wire bytes per prompt token crossing it; ``bps``: its bytes/s;
    layers ``first..last`` (``n_layers`` of them) cross it.
    """

    key: tuple[str, ...]
    bytes_per_token: float
    bps: float
    first: int
    last: int
    n_layers: int

    @property
    def is_link(self) -> bool:
        return len(self.key) == 2


def kv_transfer_legs(src: Pipeline, dst: Pipeline, params: CostParams,
                     cluster: Cluster) -> list[KVLeg]:
    """The resources ``src`` -> ``dst`` KV moves over: each node link once, and between two
    nodes also the sender's NIC out and the receiver's NIC in where the cluster sets a NIC.
    Layer ``l`` goes from the source stage holding it to the destination stage holding it."""
    m = src.model
    per_layer = 2 * m.kv_dim * kv_bytes_per_element(params.kv_bits, params.kv_group,
                                                     m.dtype_bytes)
    a_nodes = [s.node for s in src.stages for _ in range(s.layers)]
    b_nodes = [s.node for s in dst.stages for _ in range(s.layers)]
    acc: dict[tuple[str, ...], list] = {}  # key -> [layers, first, last, bytes/s]
    for layer, (a, b) in enumerate(zip(a_nodes, b_nodes, strict=True)):
        for key, bw in network_resources(cluster, a, b):
            e = acc.setdefault(key, [0, layer, layer, bw])
            e[0] += 1
            e[2] = layer
    return [KVLeg(k, n * per_layer, bw, first, last, n) for k, (n, first, last, bw) in acc.items()]


def kv_transfer_time(tokens: float, legs: Sequence[KVLeg]) -> float:
    """Seconds to move ``tokens`` tokens of KV over ``legs`` on an idle network (legs run in
    parallel; the slowest -- a link or a NIC carrying several links -- sets the time)."""
    return max((tokens * leg.bytes_per_token / leg.bps for leg in legs), default=0.0)


def exposed_transfer_time(tokens: float, legs: Sequence[KVLeg], prefill_s: float,
                          layers: int, streaming: bool) -> float:
    """The part of moving ``tokens`` tokens of KV over ``legs`` that a request waits for after
    its ``prefill_s`` prefill (idle network). Without streaming: the whole transfer. Streaming
    (the simulator's rule): layer ``l``'s KV is ready ``(l + 1) / layers`` into the prefill; a
    leg starts with its first layer and ends no sooner than its last layer plus that layer's
    share of the leg."""
    if not streaming:
        return kv_transfer_time(tokens, legs)
    end = 0.0
    for leg in legs:
        dt = tokens * leg.bytes_per_token / leg.bps
        end = max(end, prefill_s * (leg.first + 1) / layers + dt,
                  prefill_s * (leg.last + 1) / layers + dt / leg.n_layers)
    return max(end - prefill_s, 0.0)
