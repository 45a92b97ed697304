"""Cost model: monotone in hardware, compression cuts transfer by format v1's ratio, memory."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from conftest import tiny_cluster
from thunderkv.scheduler.cluster import Cluster, GpuType, NodeSpec
from thunderkv.scheduler.costmodel import (
    CostParams,
    activation_loads,
    build_pipeline,
    exposed_transfer_time,
    kv_transfer_legs,
    kv_transfer_time,
)
from thunderkv.scheduler.kv_bytes import compression_ratio, kv_bytes_per_element
from thunderkv.scheduler.model import PRESETS
from thunderkv.scheduler.parallel import best_config, split_layers

M = PRESETS["llama-13b"]
BASE = GpuType("X", 150.0, 48.0, 800.0, 0.5)


def _cluster(gt: GpuType = BASE, n: int = 2, intra: float = 200.0, inter: float = 10.0,
             nodes: int = 2) -> Cluster:
    ns = [NodeSpec(f"n{i}", gt.name, n, intra) for i in range(nodes)]
    return Cluster({gt.name: gt}, ns, inter)


def _pipe(c: Cluster, stages: list[tuple[str, ...]], layers: list[int], p: CostParams | None = None):
    return build_pipeline(c, M, p or CostParams(), stages, layers)


def test_kv_bytes_format_v1():
    assert kv_bytes_per_element(4, 64, 2) == 0.5625
    assert kv_bytes_per_element(16) == 2.0
    assert kv_bytes_per_element(2, 32, 2) == 0.25 + 4 / 32
    assert kv_bytes_per_element(8, 128, 4) == 1 + 8 / 128
    assert compression_ratio(4, 64) == pytest.approx(2 / 0.5625)
    for bad, words in (((3, 64), "bits must be one of"), ((4, 0), "group_size must be > 0"),
                       ((4, 3), "group_size must be > 0")):
        with pytest.raises(ValueError, match=words):
            kv_bytes_per_element(*bad)


@pytest.mark.parametrize("field", ["fp16_tflops", "mem_bw_gbs"])
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_faster_gpu_never_slower(field, layout):
    def times(gt):
        c = _cluster(gt)
        stages, layers = ((("n0:0", "n0:1"),), [M.layers]) if layout == "tp2" else \
            ((("n0:0",), ("n1:0",)), [M.layers // 2, M.layers - M.layers // 2])
        p = _pipe(c, list(stages), layers)
        return [p.prefill(t)[0] for t in (16, 512, 4096)] + \
               [p.decode_iter(b, b * 1000) for b in (1, 8, 64)]

    slow = times(BASE)
    for k in (1.5, 2.0, 4.0):
        fast = times(dataclasses.replace(BASE, **{field: getattr(BASE, field) * k}))
        assert all(f <= s for f, s in zip(fast, slow))
        slow = fast


@pytest.mark.parametrize("which", ["intra", "inter"])
def test_more_bandwidth_never_slower(which):
    prev = None
    for bw in (5.0, 10.0, 50.0, 400.0):
        c = _cluster(intra=bw if which == "intra" else 200.0, inter=bw if which == "inter" else 10.0)
        stages = [("n0:0", "n0:1"), ("n1:0", "n1:1")]
        p = _pipe(c, stages, [20, 20])
        d = _pipe(c, [("n1:0",), ("n0:0",)], [20, 20])
        t = [p.prefill(2048)[0], p.decode_iter(16, 16 * 900),
             kv_transfer_time(2048, kv_transfer_legs(p, d, CostParams(), c))]
        if prev is not None:
            assert all(a <= b for a, b in zip(t, prev))
            assert t != prev
        prev = t


def test_compression_cuts_transfer_time_by_format_ratio():
    c = _cluster(inter=10.0)
    src = _pipe(c, [("n0:0", "n0:1")], [M.layers])
    dst = _pipe(c, [("n1:0", "n1:1")], [M.layers])
    raw = kv_transfer_time(1000, kv_transfer_legs(src, dst, CostParams(kv_bits=16), c))
    q4 = kv_transfer_time(1000, kv_transfer_legs(src, dst, CostParams(kv_bits=4), c))
    assert raw / q4 == pytest.approx(compression_ratio(4, 64))
    # raw bytes: 2 (K,V) x layers x kv_dim x 2 B per token over 10 Gbit/s
    assert raw == pytest.approx(1000 * M.kv_bytes_per_token() / (10e9 / 8))


def test_nic_caps_a_node_sending_over_several_links():
    """Two stages on n0 send to decode stages on n1 and n2 (10 Gbit/s links each): without a
    NIC the links run in parallel; a 10 Gbit/s NIC on n0 carries both, so it takes twice as
    long; a 40 Gbit/s NIC does not bind. Each NIC direction is its own leg."""
    def transfer(nic_default=None, nic_n0=None):
        ns = [NodeSpec("n0", BASE.name, 2, 200, nic_n0)] + \
             [NodeSpec(f"n{i}", BASE.name, 2, 200) for i in (1, 2)]
        c = Cluster({BASE.name: BASE}, ns, 10, nic_gbps=nic_default)
        half = M.layers // 2
        src = _pipe(c, [("n0:0",), ("n0:1",)], [half, M.layers - half])
        dst = _pipe(c, [("n1:0",), ("n2:0",)], [half, M.layers - half])
        legs = kv_transfer_legs(src, dst, CostParams(), c)
        return kv_transfer_time(1000, legs), {leg.key for leg in legs}

    free, keys = transfer()
    assert keys == {("n0", "n1"), ("n0", "n2")}
    slow, keys = transfer(nic_n0=10)
    assert slow == pytest.approx(2 * free)
    assert keys == {("n0", "n1"), ("n0", "n2"), ("nic", "n0", "out")}
    assert transfer(nic_default=10)[0] == pytest.approx(2 * free)  # the cluster default
    wide, keys = transfer(nic_default=40)
    assert wide == pytest.approx(free) and ("nic", "n1", "in") in keys
    assert transfer(nic_default=10, nic_n0=40)[0] == pytest.approx(free)  # the node overrides


def test_streaming_leg_waits_for_its_layers():
    """A leg carrying only the last stage's layers cannot start before they exist: its
    exposed time is at least its own transfer share per layer, and a leg of the first stage's
    layers hides behind the rest of the prefill."""
    c = _cluster(nodes=4)
    half = M.layers // 2
    src = _pipe(c, [("n0:0",), ("n1:0",)], [half, M.layers - half])
    dst = _pipe(c, [("n2:0",), ("n3:0",)], [half, M.layers - half])
    legs = kv_transfer_legs(src, dst, CostParams(), c)
    by = {leg.key: leg for leg in legs}
    assert (by[("n0", "n2")].first, by[("n0", "n2")].last) == (0, half - 1)
    assert (by[("n1", "n3")].first, by[("n1", "n3")].n_layers) == (half, M.layers - half)
    dt = kv_transfer_time(1000, [by[("n1", "n3")]])
    prefill = 10 * dt  # long prefill: the first stage's leg is long done by its end
    got = exposed_transfer_time(1000, legs, prefill, M.layers, True)
    assert got == pytest.approx(dt / (M.layers - half))
    assert exposed_transfer_time(1000, legs, prefill, M.layers, False) == pytest.approx(dt)
    # one leg with every layer: the old single-link rule
    one = kv_transfer_legs(_pipe(c, [("n0:0",)], [M.layers]), _pipe(c, [("n1:0",)], [M.layers]),
                           CostParams(), c)
    t = kv_transfer_time(1000, one)
    for p in (0.1 * t, t, 5 * t):
        assert exposed_transfer_time(1000, one, p, M.layers, True) == pytest.approx(
            max(t - p * (M.layers - 1) / M.layers, t / M.layers))


def test_pipeline_activations_occupy_links_and_nics():
    """Stage hops n0 -> n1 -> n1: the first crosses the link and both NICs, the second only
    n1's intra-node link; one row is hidden x dtype bytes per hop. A hop runs at the slower of
    its link and the NICs it crosses."""
    ns = [NodeSpec("n0", BASE.name, 2, 200), NodeSpec("n1", BASE.name, 2, 100)]
    row = M.hidden * M.dtype_bytes
    for nic, hop in ((None, 40e9 / 8), (5.0, 5e9 / 8), (80.0, 40e9 / 8)):
        c = Cluster({BASE.name: BASE}, ns, 40, nic_gbps=nic)
        pipe = _pipe(c, [("n0:0", "n0:1"), ("n1:0",), ("n1:1",)], [20, 10, M.layers - 30])
        assert pipe.hop_bps == pytest.approx([hop, 100e9 / 8])
        want = {("n0", "n1"): (row, 40e9 / 8), ("n1", "n1"): (row, 100e9 / 8)}
        if nic is not None:
            want |= {("nic", "n0", "out"): (row, nic * 1e9 / 8),
                     ("nic", "n1", "in"): (row, nic * 1e9 / 8)}
        assert activation_loads(pipe, c) == want
    # two hops over one resource add up; a one-stage pipeline moves no activations
    c = Cluster({BASE.name: BASE}, ns, 40, nic_gbps=10)
    back = _pipe(c, [("n0:0",), ("n1:0",), ("n0:1",)], [10, 10, M.layers - 20])
    loads = activation_loads(back, c)
    assert loads[("n0", "n1")][0] == 2 * row
    assert loads[("nic", "n0", "out")][0] == loads[("nic", "n0", "in")][0] == row
    assert activation_loads(_pipe(c, [("n0:0",)], [M.layers]), c) == {}


def test_pipeline_hop_latency_by_placement():
    """A hop between stages on one node pays the intra-node latency, across nodes the
    inter-node one."""
    c = _cluster(intra=1e9, inter=1e9)  # bandwidth terms vanish
    p = CostParams(intra_latency_s=1e-5, inter_latency_s=1e-3)
    same = _pipe(c, [("n0:0",), ("n0:1",)], [20, M.layers - 20], p)
    cross = _pipe(c, [("n0:0",), ("n1:0",)], [20, M.layers - 20], p)
    assert cross.prefill(16)[0] - same.prefill(16)[0] == pytest.approx(1e-3 - 1e-5, rel=1e-6)


def test_memory_feasibility_enforced():
    m30 = PRESETS["llama-30b"]
    small = GpuType("S", 71, 24, 936, 0.1)
    c = Cluster({"S": small}, [NodeSpec("n", "S", 4, 100)], 10)
    assert split_layers(c, m30, CostParams(), [("n:0",)], "compute") is None
    from thunderkv.scheduler.parallel import WorkloadStats
    from thunderkv.scheduler.workload import SLO, synthetic
    st = WorkloadStats.of(synthetic("conversation", 200))
    assert not best_config(c, m30, CostParams(), ["n:0", "n:1"], "decode", st, SLO(5, 1)).feasible
    four = best_config(c, m30, CostParams(), ["n:0", "n:1", "n:2", "n:3"], "decode", st, SLO(5, 1))
    assert four.feasible and four.kv_tokens > 0
    pipe = four.pipeline
    for i, s in enumerate(pipe.stages):  # weights + KV of the batch fit in every GPU
        need = pipe.weight_bytes(i) + pipe._kvl[i] * pipe.kv_token_capacity()
        assert need <= s.gpu.mem_gb * 1e9 * CostParams().mem_util


def test_uneven_split_gives_faster_gpu_more_layers():
    fast = GpuType("F", 300, 80, 2000, 1.0)
    c = Cluster({"X": BASE, "F": fast}, [NodeSpec("a", "X", 1, 100), NodeSpec("b", "F", 1, 100)], 10)
    layers = split_layers(c, M, CostParams(), [("a:0",), ("b:0",)], "compute")
    assert layers is not None and sum(layers) == M.layers and layers[1] > layers[0]
    even = _pipe(c, [("a:0",), ("b:0",)], [M.layers // 2, M.layers // 2])
    uneven = build_pipeline(c, M, CostParams(), [("a:0",), ("b:0",)], layers)
    assert uneven.prefill(2048)[1] < even.prefill(2048)[1]  # bottleneck stage is shorter


def test_tp_allreduce_costs_more_on_slow_links():
    fastlink = _pipe(_cluster(intra=4800), [("n0:0", "n0:1")], [M.layers])
    slowlink = _pipe(_cluster(intra=50), [("n0:0", "n0:1")], [M.layers])
    assert slowlink.prefill(2048)[0] > fastlink.prefill(2048)[0]
    single = _pipe(_cluster(gt=dataclasses.replace(BASE, mem_gb=80)), [("n0:0",)], [M.layers])
    assert fastlink.prefill(2048)[0] < single.prefill(2048)[0]  # TP2 on NVLink beats 1 GPU


def test_ttft_attainment_is_exact_for_mm1_and_monotone():
    """With exponential service (E[S^2] = 2 E[S]^2) the model's wait tail rho exp(-x rho / E[W])
    is the exact M/M/1 one, rho exp(-(mu - lambda) x)."""
    from thunderkv.scheduler.parallel import ttft_attainment

    es, ttft = 0.2, 1.0
    for lam in (0.5, 2.0, 4.0):
        rho, mu = lam * es, 1 / es
        want = 1 - rho * math.exp(-(mu - lam) * ttft)
        assert ttft_attainment(np.zeros(4), 0.0, lam, es, 2 * es**2, ttft) == pytest.approx(want)
    lats = np.linspace(0.1, 1.2, 16)
    assert ttft_attainment(lats, 0.0, 0.0, es, 2 * es**2, ttft) == pytest.approx((lats <= ttft).mean())
    assert ttft_attainment(lats, 0.3, 0.0, es, 2 * es**2, ttft) == pytest.approx((lats <= 0.7).mean())
    vals = [ttft_attainment(lats, 0.0, lam, es, 2 * es**2, ttft) for lam in np.linspace(0, 4.99, 30)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert ttft_attainment(lats, 0.0, 5.0, es, 2 * es**2, ttft) == 0.0  # rho = 1


def test_prefill_capacity_grows_with_the_ttft_deadline(stats):
    from thunderkv.scheduler.workload import SLO

    c = tiny_cluster()
    caps = [best_config(c, PRESETS["llama-7b"], CostParams(), ["n0:0", "n0:1"], "prefill", stats,
                        SLO(t, 1)).capacity for t in (0.2, 0.5, 1.0, 2.0, 5.0)]
    assert caps[-1] > 0 and all(a <= b for a, b in zip(caps, caps[1:]))


@pytest.mark.parametrize("tpot", [0.02, 0.05, 0.2, 10.0])
def test_decode_capacity_uses_the_largest_feasible_batch(stats, tpot):
    """Memory-bound: exactly the batch that fits; TPOT-bound: one more request would miss the
    margin. (A coarse grid of batch sizes once credited up to 20 % less than either.)"""
    from thunderkv.scheduler.parallel import DECODE_TPOT_MARGIN, capacity
    from thunderkv.scheduler.workload import SLO

    c = _cluster()
    pipe = _pipe(c, [("n0:0", "n0:1")], [M.layers])
    perf = capacity(pipe, "decode", stats, SLO(5.0, tpot))
    bmax = int(pipe.kv_token_capacity() / stats.ctx_mem)
    limit = DECODE_TPOT_MARGIN * tpot

    def t(b):
        return pipe.decode_iter(b, b * stats.ctx_eff)

    if t(1) > limit:
        assert perf.capacity == 0 and perf.batch == 0
        return
    b = perf.batch
    assert 1 <= b <= bmax and t(b) <= limit and (b == bmax or t(b + 1) > limit)
    assert perf.capacity == pytest.approx(b / (stats.output_mean * t(b)))
    # no smaller batch sustains more requests
    assert all(x / t(x) <= b / t(b) * (1 + 1e-12) for x in range(1, b))


def test_layouts_of_a_group_across_many_nodes_stay_few(monkeypatch):
    """A group on 30 nodes has 2^30 per-node TP combinations: they must never be listed (a
    320-GPU search once merged such a group and ran out of 24 GB in itertools.product)."""
    import itertools

    from thunderkv.scheduler import parallel

    real = itertools.product

    def bounded_product(*opts):
        assert math.prod(len(o) for o in opts) <= parallel.MAX_LAYOUTS, "listed a huge product"
        return real(*opts)

    monkeypatch.setattr(parallel.itertools, "product", bounded_product)
    c = _cluster(n=4, nodes=30)
    gpus = [f"n{i}:{k}" for i in range(30) for k in range(2)]
    out = parallel.layouts(c, M, gpus)
    assert 1 <= len(out) <= 4
    assert all(sorted(x for st in lay for x in st) == sorted(gpus) for lay in out)
    small = parallel.layouts(c, M, ["n0:0", "n0:1", "n1:0", "n1:1"])  # 2 x 2 combinations
    assert len(small) == 4


def _greedy_split_oracle(caps: list[int], speed: list[float], layers: int) -> list[int]:
    """The split's definition, one layer at a time by linear scan (the heap must match it)."""
    out = [1] * len(caps)
    for _ in range(layers - len(caps)):
        i = min((i for i in range(len(caps)) if out[i] < caps[i]),
                key=lambda i: ((out[i] + 1) / speed[i], i))
        out[i] += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_split_layers_matches_the_greedy_definition(seed):
    rng = np.random.default_rng(seed)
    kinds = [GpuType(f"T{k}", float(rng.uniform(20, 400)), float(rng.choice([24, 48, 80])),
                     float(rng.uniform(300, 3000)), 1.0) for k in range(3)]
    n = int(rng.integers(2, 7))
    nodes = [NodeSpec(f"n{i}", kinds[int(rng.integers(3))].name, 4, 100) for i in range(n)]
    c = Cluster({k.name: k for k in kinds}, nodes, 10)
    stages = [tuple(f"n{i}:{j}" for j in range(int(rng.choice([1, 2, 4])))) for i in range(n)]
    p, lw = CostParams(), M.layer_params * M.dtype_bytes
    from thunderkv.scheduler.parallel import MAX_BATCH_TOKENS
    for weight in ("compute", "bandwidth", "memory"):
        caps, speed = [], []
        for i, gs in enumerate(stages):
            gt, tp = c.gpu_type(gs[0]), len(gs)
            usable = gt.mem_gb * 1e9 * p.mem_util - p.reserve_gb * 1e9
            emb = ((i == 0) + (i == n - 1)) * M.vocab * M.hidden * M.dtype_bytes / tp
            caps.append(int((usable - emb) / ((lw + MAX_BATCH_TOKENS * M.kv_bytes_per_token(1)) / tp)))
            speed.append({"compute": gt.flops, "bandwidth": gt.bw, "memory": usable}[weight] * tp)
        got = split_layers(c, M, p, stages, weight)
        if min(caps) < 1 or sum(caps) < M.layers:
            assert got is None
        else:
            assert got == _greedy_split_oracle(caps, speed, M.layers)


def test_prefill_each_is_prefill_bit_for_bit():
    fast = GpuType("F", 300, 80, 2000, 1.0)
    c = Cluster({"X": BASE, "F": fast}, [NodeSpec("a", "X", 2, 100), NodeSpec("b", "F", 2, 600)], 10)
    prompts = [1, 7, 100, 1023.5, 2048, 8191, 32768]
    for stages, layers in (([("a:0", "a:1")], [M.layers]),
                           ([("a:0",), ("b:0", "b:1")], [12, M.layers - 12])):
        pipe = build_pipeline(c, M, CostParams(), stages, layers)
        lat, busy = pipe.prefill_each(prompts)
        assert (lat, busy) == tuple(map(list, zip(*(pipe.prefill(q) for q in prompts))))
