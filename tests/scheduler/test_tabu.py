"""Upper level: tabu search reaches the exhaustive optimum on small clusters; deterministic."""

from __future__ import annotations

import pytest
from conftest import tiny_cluster
from thunderkv.scheduler.evaluate import HYBRID, Evaluator, SearchSpace, canonical
from thunderkv.scheduler.exhaustive import exhaustive_best, set_partitions
from thunderkv.scheduler.model import PRESETS
from thunderkv.scheduler.tabu import TabuConfig, initial_state, neighbours, tabu_search
from thunderkv.scheduler.workload import SLO

FIVE = """
name: five
catalog:
  A6000: {fp16_tflops: 155, mem_gb: 48, mem_bw_gbs: 768, price_per_hour: 0.39}
  L40S: {fp16_tflops: 362, mem_gb: 48, mem_bw_gbs: 864, price_per_hour: 0.44}
  RTX3090: {fp16_tflops: 71, mem_gb: 24, mem_bw_gbs: 936, price_per_hour: 0.13}
nodes:
  - {name: a, gpu: A6000, count: 2, intra_node_gbps: 200}
  - {name: b, gpu: L40S, count: 2, intra_node_gbps: 200}
  - {name: c, gpu: RTX3090, count: 1, intra_node_gbps: 100}
network: {inter_node_gbps: 2, links: [{a: a, b: b, gbps: 40}]}
"""


def test_set_partitions_counts():
    assert [sum(1 for _ in set_partitions(list(range(n)))) for n in range(1, 7)] == [1, 2, 5, 15, 52, 203]


def _valid(state, cluster) -> bool:
    gpus = [g for grp, _ in state for g in grp]
    return sorted(gpus) == sorted(cluster.gpus)


@pytest.mark.parametrize("text,slo", [(None, SLO(1.5, 0.1)), (FIVE, SLO(1.0, 0.06)),
                                      (FIVE, SLO(3.0, 0.2))])
@pytest.mark.parametrize("space", ["split", "colocated", "hybrid"])
@pytest.mark.parametrize("model", ["llama-7b", "llama-13b"])
def test_tabu_finds_exhaustive_optimum(model, params, stats, text, slo, space):
    c = tiny_cluster() if text is None else tiny_cluster(text)
    sp = SearchSpace({"split": ("prefill", "decode"), "colocated": ("colocated",),
                      "hybrid": HYBRID}[space])
    ev = Evaluator(c, PRESETS[model], params, stats, slo, sp)
    _, opt, scored = exhaustive_best(ev)
    assert opt > 0 and scored > 1
    assert ev.value(initial_state(ev)) < opt  # the search has work to do
    for seed in range(3):
        res = tabu_search(ev, TabuConfig(max_iters=60, seed=seed, time_limit_s=60))
        assert _valid(res.state, c)
        assert res.value == pytest.approx(opt, rel=1e-6), f"seed {seed}"


def test_deterministic_per_seed(model7b, params, stats, slo):
    ev = Evaluator(tiny_cluster(FIVE), model7b, params, stats, slo)
    a = tabu_search(ev, TabuConfig(max_iters=15, seed=4, time_limit_s=60))
    b = tabu_search(Evaluator(tiny_cluster(FIVE), model7b, params, stats, slo),
                    TabuConfig(max_iters=15, seed=4, time_limit_s=60))
    assert a.state == b.state and a.history == b.history


def test_moves_keep_every_gpu_exactly_once(model7b, params, stats, slo):
    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, slo)
    assert _valid(initial_state(ev), c)
    s0 = canonical([(("n0:0", "n0:1", "n1:0"), "prefill"), (("n1:1",), "decode"),
                    (("n2:0", "n2:1"), "decode")])
    kinds = set()
    for s, removed, added in neighbours(ev, s0):
        assert _valid(s, c)
        kinds.add((len(removed), len(added)))
    assert {(1, 1), (1, 2), (2, 1), (2, 2)} <= kinds  # flip, split, merge, move


def test_initial_state_is_network_aware(model7b, params, stats, slo):
    ev = Evaluator(tiny_cluster(), model7b, params, stats, slo)
    for grp, _ in initial_state(ev):  # llama-7b fits one GPU: groups never straddle nodes
        assert len({g.split(":")[0] for g in grp}) == 1


def test_frozen_groups_only_flip(model7b, params, stats, slo):
    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, slo)
    fixed = ("n0:0", "n0:1")
    s0 = canonical([(fixed, "prefill"), (("n1:0", "n1:1"), "decode"), (("n2:0", "n2:1"), "decode")])
    nbs = neighbours(ev, s0, frozen=frozenset({fixed}))
    for s, removed, added in nbs:
        assert _valid(s, c)
        if any(g[0] == fixed for g in removed):
            assert len(removed) == 1 and [g[0] for g in added] == [fixed]  # a flip
        assert any(g[0] == fixed for g in s)
    assert len(nbs) < len(neighbours(ev, s0))
    res = tabu_search(ev, TabuConfig(max_iters=20, time_limit_s=60), start=s0, frozen=frozenset({fixed}))
    assert any(g[0] == fixed for g in res.state)


def test_sampled_neighbourhood_is_capped_and_deterministic(model7b, params, stats, slo):
    import random

    from thunderkv.scheduler.tabu import _moves, _sample

    ev = Evaluator(tiny_cluster(), model7b, params, stats, slo)
    s0 = canonical([((g,), "decode" if i % 2 else "prefill")
                    for i, g in enumerate(tiny_cluster().gpus)])
    full = _moves(ev, list(s0))
    lin = [m for m in full if len(m[0]) == 1]
    a = _sample(random.Random(1), full, len(lin) + 5)
    b = _sample(random.Random(1), full, len(lin) + 5)
    assert a == b and len(a) == len(lin) + 5 and all(m in a for m in lin)
    assert _sample(random.Random(1), full, 0) == full


def test_sites_group_nodes_by_their_fastest_links():
    from thunderkv.scheduler.decompose import sites
    text = """
catalog:
  A6000: {fp16_tflops: 155, mem_gb: 48, mem_bw_gbs: 768, price_per_hour: 0.39}
nodes:
""" + "".join(f"  - {{name: n{i}, gpu: A6000, count: 4, intra_node_gbps: 200}}\n" for i in range(6)) + """
network:
  inter_node_gbps: 1
  links:
    - {a: n0, b: n3, gbps: 25}
    - {a: n1, b: n4, gbps: 25}
    - {a: n2, b: n5, gbps: 25}
    - {a: n0, b: n1, gbps: 10}
"""
    c = tiny_cluster(text)
    assert sites(c, 8) == [["n0", "n3"], ["n1", "n4"], ["n2", "n5"]]
    # up to 16 GPUs: the two pairs joined by a 10 Gbit/s link merge, the third stays apart
    assert sites(c, 16) == [["n0", "n3", "n1", "n4"], ["n2", "n5"]]
    assert sites(c, 4) == [[f"n{i}"] for i in range(6)]


def test_site_first_search_covers_every_gpu_and_improves_on_its_start(model7b, params, stats,
                                                                      monkeypatch):
    """Searching sites first (forced here on a 6-GPU cluster) ends with every GPU in exactly
    one group, never below the union of the sites' own best states."""
    from thunderkv.scheduler import decompose
    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, SLO(1.5, 0.1))
    monkeypatch.setattr(decompose, "DECOMPOSE_ABOVE", 0)
    monkeypatch.setattr(decompose, "SITE_GPUS", 4)
    starts = []
    real = decompose.tabu_search

    def spy(ev_, cfg, start=None, progress=None, frozen=frozenset()):
        res = real(ev_, cfg, start=start, progress=progress, frozen=frozen)
        starts.append((start, res.value))
        return res

    monkeypatch.setattr(decompose, "tabu_search", spy)
    sites = decompose.sites(c, 4)
    assert len(sites) > 1
    res = decompose.search(ev, TabuConfig(max_iters=30, time_limit_s=20, seed=1))
    assert len(starts) == len(sites) + 1  # one search per site, then the whole cluster
    assert _valid(res.state, c)
    union = starts[-1][0]
    assert _valid(union, c) and res.value >= ev.value(union) - 1e-9
