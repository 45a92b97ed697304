"""Routing LP: respects replica and link capacities, matches hand-solved instances."""

from __future__ import annotations

import numpy as np
import pytest
from thunderkv.scheduler.routing import RoutingProblem, max_throughput, proportional, solve


def _check(p: RoutingProblem, x: np.ndarray) -> None:
    assert (x >= -1e-9).all()
    assert (x.sum(1) <= np.asarray(p.pcap) + 1e-6).all()
    assert (x.sum(0) <= np.asarray(p.dcap) + 1e-6).all()
    load: dict = {}
    for i in range(len(p.pcap)):
        for j in range(len(p.dcap)):
            if x[i, j] > 1e-9:
                assert p.allowed(i, j)
            for k, b in p.pair_bytes[i][j].items():
                load[k] = load.get(k, 0.0) + x[i, j] * b
    for k, v in load.items():
        assert v <= p.link_cap[k] * (1 + 1e-6)


def test_hand_solved_link_bound():
    # P0 reaches D0 over a thin link (1 req/s worth), D1 over a fat one; D1 holds only 2 req/s.
    p = RoutingProblem([5.0], [4.0, 2.0], [[{("a", "b"): 100.0}, {("a", "c"): 100.0}]],
                       [[0.1, 0.1]], {("a", "b"): 100.0, ("a", "c"): 1e6})
    r = solve(p)
    assert r.total == pytest.approx(3.0)
    assert r.flow[0, 0] == pytest.approx(1.0) and r.flow[0, 1] == pytest.approx(2.0)
    assert max_throughput(p) == pytest.approx(3.0)
    _check(p, r.flow)


def test_shared_link_counts_all_pairs_and_budget_excludes_slow_pairs():
    link = {("x", "y"): 10.0}
    p = RoutingProblem([4.0, 4.0], [8.0], [[{("x", "y"): 5.0}], [{("x", "y"): 5.0}]],
                       [[0.1], [0.1]], link)
    assert solve(p).total == pytest.approx(2.0)  # both prefill groups share one 10 B/s link
    slow = RoutingProblem([4.0, 4.0], [8.0], [[{}], [{}]], [[0.1], [9.0]], {}, budget=1.0)
    r = solve(slow)
    assert r.total == pytest.approx(4.0) and r.flow[1, 0] == 0


def test_tiebreak_prefers_faster_links():
    p = RoutingProblem([2.0], [2.0, 2.0], [[{}, {}]], [[0.5, 0.1]], {})
    r = solve(p)
    assert r.total == pytest.approx(2.0) and r.flow[0, 1] == pytest.approx(2.0)


@pytest.mark.parametrize("seed", range(8))
def test_random_instances_respect_capacities(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 5), rng.integers(1, 5)
    links = [("l", str(k)) for k in range(3)]
    caps = {k: float(rng.uniform(1, 50)) for k in links}
    pb = [[{links[rng.integers(3)]: float(rng.uniform(1, 20))} for _ in range(m)] for _ in range(n)]
    pt = [[float(rng.uniform(0, 2)) for _ in range(m)] for _ in range(n)]
    p = RoutingProblem(list(rng.uniform(0, 10, n)), list(rng.uniform(0, 10, m)), pb, pt, caps, 1.5)
    r = solve(p)
    _check(p, r.flow)
    assert max_throughput(p) == pytest.approx(r.total, rel=1e-6, abs=1e-9)
    assert r.total <= min(sum(p.pcap), sum(p.dcap)) + 1e-9
    prop = proportional(p)  # the ablation ignores links: may violate them, never the capacities
    assert (prop.flow.sum(1) <= np.asarray(p.pcap) + 1e-9).all()


@pytest.mark.parametrize("seed", range(6))
def test_optimum_matches_a_dense_formulation(seed):
    """solve() builds its constraints sparse (pairs x resources is large at 320 GPUs): same
    optimum as the plain dense LP written out here, with several resources per pair (a link
    and NIC directions) shared among pairs."""
    from scipy.optimize import linprog
    rng = np.random.default_rng(100 + seed)
    n, m = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    res = [("a", str(k)) for k in range(4)] + [("nic", str(k), "out") for k in range(3)]
    caps = {k: float(rng.uniform(5, 60)) for k in res}
    pb = [[{res[int(k)]: float(rng.uniform(1, 20))
            for k in rng.choice(len(res), size=int(rng.integers(1, 4)), replace=False)}
           for _ in range(m)] for _ in range(n)]
    pt = [[float(rng.uniform(0, 2)) for _ in range(m)] for _ in range(n)]
    p = RoutingProblem(list(rng.uniform(0, 10, n)), list(rng.uniform(0, 10, m)), pb, pt, caps, 1.6)
    pairs = [(i, j) for i in range(n) for j in range(m) if p.allowed(i, j)]
    rows = [[1.0 * (a == i) for a, _ in pairs] for i in range(n)]
    rows += [[1.0 * (b == j) for _, b in pairs] for j in range(m)]
    rows += [[p.pair_bytes[a][b].get(k, 0.0) for a, b in pairs] for k in res]
    bound = list(p.pcap) + list(p.dcap) + [caps[k] for k in res]
    want = -linprog(-np.ones(len(pairs)), A_ub=np.array(rows), b_ub=bound, method="highs").fun \
        if pairs else 0.0
    assert solve(p, tiebreak=False).total == pytest.approx(want, rel=1e-9, abs=1e-9)
    r = solve(p)  # the tie-break keeps the rate within 1e-7 of the optimum
    _check(p, r.flow)
    assert want * (1 - 2e-7) - 1e-9 <= r.total <= want * (1 + 1e-9) + 1e-9


def test_routing_charges_each_request_its_pipeline_activations(model7b, params, stats, tiny_text):
    """A prefill group pipelined over n0 -> n1 and a decode group over n1 -> n2, 1 Gbit/s NICs:
    every routed request puts its KV on the NICs plus its prompt's activations on the prefill
    hop and one row per later token on the decode hop; the routed rate is the tightest
    capacity, NICs included."""
    from conftest import tiny_cluster
    from thunderkv.scheduler.costmodel import kv_transfer_legs
    from thunderkv.scheduler.evaluate import Evaluator, canonical
    from thunderkv.scheduler.workload import SLO

    c = tiny_cluster(tiny_text.replace("inter_node_gbps: 10",
                                       "inter_node_gbps: 10\n  nic_gbps: 1"))
    ev = Evaluator(c, model7b, params, stats, SLO(100, 100))
    pg, dg = ("n0:0", "n1:0"), ("n1:1", "n2:0")
    pre, dec = ev.perf(pg, "prefill"), ev.perf(dg, "decode")
    assert len(pre.pipeline.stages) == 2 and len(dec.pipeline.stages) == 2
    load, bps, _ = ev._pair_info(pg, dg)
    kv = {leg.key: leg.bytes_per_token * stats.prompt_mean
          for leg in kv_transfer_legs(pre.pipeline, dec.pipeline, params, c)}
    row = model7b.hidden * model7b.dtype_bytes
    act: dict = {}
    for pipe, rows in ((pre.pipeline, stats.prompt_mean), (dec.pipeline, stats.output_mean - 1)):
        for a, b in zip(pipe.stages, pipe.stages[1:]):
            act[("nic", a.node, "out")] = act.get(("nic", a.node, "out"), 0.0) + row * rows
            act[("nic", b.node, "in")] = act.get(("nic", b.node, "in"), 0.0) + row * rows
    nics = {k for k in load if k[0] == "nic"}
    assert nics == {k for k in kv if k[0] == "nic"} | set(act)
    for k in nics:
        assert load[k] == pytest.approx(kv.get(k, 0.0) + act.get(k, 0.0))
    assert any(k in kv for k in act)  # some NIC carries both KV and activations
    limit = min(params.link_util * bps[k] / v for k, v in load.items())
    state = canonical([(pg, "prefill"), (dg, "decode")])
    assert ev.value(state) == pytest.approx(min(pre.capacity, dec.capacity, limit))
    assert limit < min(pre.capacity, dec.capacity)  # the network binds here
