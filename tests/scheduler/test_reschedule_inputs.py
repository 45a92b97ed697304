"""Rescheduling replays with the plan's own arrivals, compares with a full re-plan of exactly
the GPUs that survive (in the design space planning would use), and charges what is still
rented; a trace whose arrivals cannot be time-scaled is refused up front."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY, plan_tiny, tiny_cluster
from thunderkv.scheduler.reschedule import reschedule_document, surviving_cluster
from thunderkv.scheduler.workload import Workload, synthetic

from thunderkv.cli import main

COMMON = ["--model", "llama-7b", "--workload", "conversation", "--requests", "200",
          "--replay-seconds", "100", "--iters", "15", "--time-limit", "4", "--slo-ttft", "1.5",
          "--slo-tpot", "0.1", "--quiet", "--baselines", "none"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    return d, plan_tiny(d, COMMON)


def test_surviving_cluster_drops_lost_gpus_and_nodes():
    c = tiny_cluster()
    s = surviving_cluster(c, {"n2"}, {"n0:1", "n1:0", "n1:1", "n2:0"})
    assert [(n.name, n.count) for n in s.nodes] == [("n0", 1)]  # n1 lost both, n2 as a node
    assert s.gpus == ["n0:0"]
    assert s.price_per_hour() == pytest.approx(c.price_per_hour(["n0:0"]))
    assert surviving_cluster(c, None, None).gpus == c.gpus


def test_reschedule_replays_with_the_arrivals_and_seed_asked_for(planned, np_rng):
    """Trace-shaped arrivals and another seed change the replay; the document says which ran.
    Default: what the plan recorded."""
    d, doc = planned
    from thunderkv.scheduler.plan import load_plan_json
    _, plan = load_plan_json(d / "plan.json")
    wl = synthetic("conversation", 200, 1.0, seed=0)
    wl.min_replay_s = 100
    seed = int(np_rng.integers(1, 1000))
    runs = {}
    for arrivals, s in (("poisson", None), ("poisson", seed), ("trace", None)):
        out = reschedule_document(doc, plan, ["n1"], wl, compare=False, arrivals=arrivals, seed=s)
        assert out["workload"]["arrivals"] == arrivals
        assert out["workload"]["seed"] == (doc["workload"]["seed"] if s is None else s)
        runs[(arrivals, s)] = out["predicted"]
    assert len({json.dumps(v, sort_keys=True) for v in runs.values()}) == 3
    recorded = reschedule_document(doc, plan, ["n1"], wl, compare=False)
    assert recorded["predicted"] == runs[("poisson", None)]


def test_full_replan_after_losing_single_gpus_uses_only_the_survivors(planned):
    """Losing every GPU of n1 one by one is losing n1: the same full re-plan (its search is
    deterministic; which candidates get replayed depends on the clock, so the model value is
    compared) and the same cost (only GPUs still there). Before, the lost GPUs stayed in the
    cluster the re-plan searched and it found the original plan's value."""
    d, doc = planned
    from thunderkv.scheduler.plan import load_plan_json
    _, plan = load_plan_json(d / "plan.json")
    wl = synthetic("conversation", 200, 1.0, seed=0)
    wl.min_replay_s = 100
    from thunderkv.scheduler.tabu import TabuConfig
    cfg = TabuConfig(max_iters=15, time_limit_s=4)
    by_node = reschedule_document(doc, plan, ["n1"], wl, replan=cfg)
    by_gpu = reschedule_document(doc, plan, ["n1:0", "n1:1"], wl, replan=cfg)
    assert by_gpu["full_replan"]["model_req_per_s"] == by_node["full_replan"]["model_req_per_s"]
    want = tiny_cluster().price_per_hour([g for g in tiny_cluster().gpus if not g.startswith("n1:")])
    assert by_node["cost_per_hour"] == by_gpu["cost_per_hour"] == pytest.approx(want)
    assert doc["cost_per_hour"] == pytest.approx(tiny_cluster().price_per_hour())


TIGHT = """
name: tight
catalog:
  V100-32: {fp16_tflops: 125, mem_gb: 32, mem_bw_gbs: 900, price_per_hour: 0.3}
nodes:
%s
network:
  inter_node_gbps: 100
"""


def _tight(names):
    return TIGHT % "\n".join(f"  - {{name: {n}, gpu: V100-32, count: 1, intra_node_gbps: 100}}"
                              for n in names)


def test_full_replan_falls_back_to_colocated_groups_where_no_split_serves(tmp_path):
    """Single-GPU nodes too small to split LLaMA-13B's phases: planning falls back to
    colocated groups, and so must the full re-plan a reschedule is compared with (it searched
    phase-split plans only, and reported 0 req/s and no ratio)."""
    from thunderkv.scheduler.plan import load_plan_json
    from thunderkv.scheduler.tabu import TabuConfig
    args = [a if a != "llama-7b" else "llama-13b" for a in COMMON]
    docs = {}
    for name, nodes in (("three", ["n0", "n1", "n2"]), ("two", ["n1", "n2"])):
        (tmp_path / f"{name}.yaml").write_text(_tight(nodes))
        out = tmp_path / f"{name}.json"
        assert main(["plan", "--cluster", str(tmp_path / f"{name}.yaml"), "--json", str(out),
                     *args]) == 0
        docs[name] = json.loads(out.read_text())
    assert docs["two"]["predicted"]["goodput_req_per_s"] > 0
    assert any(g["phase"] == "colocated" for g in docs["two"]["plan"]["groups"])
    _, plan = load_plan_json(tmp_path / "three.json")
    wl = synthetic("conversation", 200, 1.0, seed=0)
    wl.min_replay_s = 100
    new = reschedule_document(docs["three"], plan, ["n0"], wl,
                              replan=TabuConfig(max_iters=15, time_limit_s=4))
    assert new["full_replan"]["goodput_req_per_s"] > 0
    assert new["ratio_to_full_replan"] is not None


def test_trace_arrivals_at_one_instant_are_refused_before_planning(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   + "".join(f"2023-11-16 18:15:46.68,{100 + i},{20 + i}\n" for i in range(12)))
    (tmp_path / "c.yaml").write_text(TINY)
    args = ["plan", "--cluster", str(tmp_path / "c.yaml"), "--model", "llama-7b", "--trace",
            str(csv), "--arrivals", "trace", "--time-limit", "30", "--baselines", "none",
            "--quiet"]
    import time
    t = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - t < 10  # before the 30 s search
    err = " ".join(capsys.readouterr().err.split())
    assert "all 12 arrival time(s) are the same instant" in err and "--arrivals poisson" in err
    with pytest.raises(ValueError, match="finite"):
        Workload(np.array([0.0, np.nan]), np.array([5, 5]), np.array([2, 2]))


def test_simulate_replays_a_rescheduled_plan_at_its_goodput(planned, tmp_path):
    """A rescheduled plan records the rate its metrics are at, so ``simulate --plan`` replays
    it there (it fell back to the trace's own rate) and reproduces its attainment."""
    d, _ = planned
    re_json, sim = tmp_path / "re.json", tmp_path / "sim.json"
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--fail", "n1", "--no-compare",
                 "--json", str(re_json), "--quiet"]) == 0
    pred = json.loads(re_json.read_text())["predicted"]
    assert pred["goodput_req_per_s"] > 0
    assert pred["rate_req_per_s"] == pred["goodput_req_per_s"]
    assert main(["simulate", "--plan", str(re_json), "--json", str(sim)]) == 0
    got = json.loads(sim.read_text())
    assert got["rate_req_per_s"] == pytest.approx(pred["rate_req_per_s"])
    assert got["slo_attainment"] == pytest.approx(pred["slo_attainment"], abs=1e-4)
