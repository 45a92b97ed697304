"""`thunderkv plan` / `thunderkv simulate` end to end on a tiny cluster, and rescheduling."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
from conftest import TINY, plan_tiny, tiny_cluster
from thunderkv.scheduler.evaluate import HYBRID, Evaluator, SearchSpace, canonical
from thunderkv.scheduler.reschedule import reschedule

from thunderkv.cli import main

# 100 s replays keep these CLI runs short (the default 800 s is for 32-GPU plans; the
# simulate test below runs it)
COMMON = ["--model", "llama-7b", "--workload", "conversation", "--requests", "200",
          "--replay-seconds", "100", "--iters", "15", "--time-limit", "10", "--slo-ttft", "1.5",
          "--slo-tpot", "0.1", "--quiet"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    return d, plan_tiny(d, COMMON)


def test_plan_json_has_required_keys(planned):
    _, doc = planned
    groups = doc["plan"]["groups"]
    assert groups and all({"gpus", "phase", "tp", "pp", "layers"} <= set(g) for g in groups)
    assert all(":" in g for grp in groups for g in grp["gpus"])
    assert isinstance(doc["plan"]["routing"], list)
    for key in ("goodput_req_per_s", "tokens_per_s", "slo_attainment", "ttft_p50", "ttft_p90",
                "tpot_p50", "tpot_p90"):
        assert key in doc["predicted"]
        for b in ("vllm", "distserve", "hexgen"):
            assert key in doc["baselines"][b]
    assert doc["cost_per_hour"] == pytest.approx(1.92)
    assert doc["solve_seconds"] > 0 and doc["predicted"]["goodput_req_per_s"] > 0


def test_latency_deadline_ratios_are_pairwise(planned):
    """Each baseline's latency-deadline ratio is its SLO scale over ours, both at the lower of
    the two goodputs: it depends on the two systems only."""
    _, doc = planned
    ours = doc["predicted"]["goodput_req_per_s"]
    compared = 0
    for b in ("vllm", "distserve", "hexgen"):
        if doc["baselines"][b]["goodput_req_per_s"] <= 0:  # nothing to compare at
            assert b not in doc["ratios"]["slo_scale_needed"]
            assert "latency_deadline" not in doc["ratios"][b]
            continue
        compared += 1
        need = doc["ratios"]["slo_scale_needed"][b]
        assert need["rate_req_per_s"] == pytest.approx(
            min(ours, doc["baselines"][b]["goodput_req_per_s"]), rel=1e-3)
        if "latency_deadline" in doc["ratios"][b]:
            assert doc["ratios"][b]["latency_deadline"] == pytest.approx(
                need[b] / need["thunderkv"], rel=2e-3)
        # at its own goodput a system meets the SLO as set, or needs it only a little looser
        if doc["baselines"][b]["goodput_req_per_s"] <= ours and need[b] is not None:
            assert need[b] <= 1.0 + 1e-9
    assert compared


def test_reschedule_full_replan_gets_the_plan_search_effort(planned):
    d, _ = planned
    out = d / "re-effort.json"
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--fail", "n1", "--json", str(out),
                 "--quiet", "--requests", "200", "--replay-seconds", "100", "--iters", "3", "--time-limit", "5"]) == 0
    full = json.loads(out.read_text())["full_replan"]
    assert full["iterations"] <= 3 and full["goodput_req_per_s"] > 0


def test_simulate_replays_plan(planned, capsys):
    d, doc = planned
    out = d / "sim.json"
    assert main(["simulate", "--plan", str(d / "plan.json"), "--workload", "conversation",
                 "--requests", "200", "--replay-seconds", "800", "--rate", "1.0",
                 "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    # the replay spans 800 s of arrivals (the flag beats the plan's 100): 200 requests cycled
    # to 801 at 1 req/s
    assert m["finished"] == 801 and 0 <= m["slo_attainment"] <= 1
    assert "simulated 801 requests" in capsys.readouterr().out


def test_reschedule_cli_after_node_failure(planned):
    d, doc = planned
    out = d / "re.json"
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--fail", "n1", "--json", str(out),
                 "--quiet", "--requests", "200", "--replay-seconds", "100"]) == 0
    new = json.loads(out.read_text())
    assert new["reschedule_seconds"] < 2.0
    assert all(not g.startswith("n1:") for grp in new["plan"]["groups"] for g in grp["gpus"])
    assert "ratio_to_full_replan" in new and "full_replan" in new
    assert new["full_replan"]["iterations"] > 3  # default search effort (--iters 5000, 30 s)
    kept = {tuple(g["gpus"]) for g in new["plan"]["groups"]}
    hit = [g["gpus"] for g in doc["plan"]["groups"] if any(x.startswith("n1:") for x in g["gpus"])]
    old = {tuple(g["gpus"]) for g in doc["plan"]["groups"]} - {tuple(g) for g in hit}
    assert kept >= old  # surviving groups (and so weights) kept; only phases/routing re-solved
    orphans = {x for g in hit for x in g if not x.startswith("n1:")}
    assert {x for g in kept - old for x in g} <= orphans  # new groups only from orphans
    assert new["regrouped_gpus"] == len({x for g in kept - old for x in g})


def test_bad_inputs_exit_2_with_message(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text(TINY.replace("count: 2, intra_node_gbps: 100", "count: two, intra_node_gbps: 100"))
    assert main(["plan", "--cluster", str(bad), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "nodes[1].count" in err and "c.yaml:9" in err
    assert main(["plan", "--cluster", str(bad), "--model", "nope", "--workload", "coding"]) == 2


def test_reschedule_cli_no_regroup(planned):
    d, _ = planned
    out = d / "re-noregroup.json"
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--fail", "n1", "--json", str(out),
                 "--quiet", "--requests", "200", "--replay-seconds", "100", "--no-compare", "--no-regroup"]) == 0
    new = json.loads(out.read_text())
    assert new["regrouped_gpus"] == 0 and "full_replan" not in new


def test_fail_each_sweeps_every_node_of_the_plan(planned, capsys):
    d, doc = planned
    out, png = d / "sweep.json", d / "sweep.png"
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--fail", "each", "--json",
                 str(out), "--plot", str(png), "--quiet", "--requests", "200", "--replay-seconds", "100"]) == 0
    sweep = json.loads(out.read_text())
    used = sorted({g.rsplit(":", 1)[0] for grp in doc["plan"]["groups"] for g in grp["gpus"]})
    assert sorted(r["failed"] for r in sweep["sweep"]) == used
    for r in sweep["sweep"]:
        assert r["reschedule_seconds"] > 0 and r["full_replan_goodput_req_per_s"] > 0
        assert r["ratio_to_full_replan"] == pytest.approx(
            r["lightweight_goodput_req_per_s"] / r["full_replan_goodput_req_per_s"], abs=1e-3)
    ratios = [r["ratio_to_full_replan"] for r in sweep["sweep"]]
    assert sweep["summary"]["min_ratio"] == min(ratios)
    assert sweep["summary"]["within_10_percent"] == sum(x >= 0.9 for x in ratios)
    # the sweep's row for a node is what a single --fail of that node gives
    single = d / "single.json"
    first = sweep["sweep"][0]
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--fail", first["failed"],
                 "--json", str(single), "--quiet", "--requests", "200", "--replay-seconds", "100", "--no-compare"]) == 0
    assert json.loads(single.read_text())["predicted"]["goodput_req_per_s"] == pytest.approx(
        first["lightweight_goodput_req_per_s"])
    captured = capsys.readouterr()
    if importlib.util.find_spec("matplotlib"):
        assert png.stat().st_size > 0
    else:  # --plot is optional: a clear warning, the rest still written
        assert "needs matplotlib" in captured.err and not png.exists()
    assert "one node lost at a time" in captured.out


def test_reschedule_keeps_configs_and_is_fast(model7b, params, stats, slo):
    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, slo)
    plan = ev.plan(canonical([(("n0:0", "n0:1"), "prefill"), (("n1:0", "n1:1"), "decode"),
                              (("n2:0",), "decode"), (("n2:1",), "decode")]))
    t = time.perf_counter()
    r = reschedule(plan, c, model7b, params, stats, slo, fail_nodes={"n0"})
    assert time.perf_counter() - t < 2.0
    assert r.dropped_groups == 1 and r.kept_gpus == 4
    phases = sorted(g.phase for g in r.plan.groups)
    assert "prefill" in phases and "decode" in phases  # lost the prefill group: one decode flips
    assert r.plan.objective > 0
    before = {tuple(g.stage_gpus): g.layers for g in plan.groups if "n0:0" not in g.gpus}
    assert {tuple(g.stage_gpus): g.layers for g in r.plan.groups} == before


def test_planner_imports_no_torch():
    import os
    import subprocess
    import sys

    code = ("import sys, thunderkv.scheduler.driver, thunderkv.scheduler.reschedule, "
            "thunderkv.cli.plan, thunderkv.cli.simulate; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('thunderkv._C')]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-P", "-c", code], check=True, env=env, timeout=60)


def test_reschedule_regroups_orphans_and_keeps_survivors(model7b, params, stats, slo):
    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, slo)
    plan = ev.plan(canonical([(("n0:0", "n1:0"), "prefill"), (("n0:1",), "decode"),
                              (("n1:1",), "decode"), (("n2:0", "n2:1"), "prefill")]))
    t = time.perf_counter()
    r = reschedule(plan, c, model7b, params, stats, slo, fail_nodes={"n0"})
    assert time.perf_counter() - t < 2.0
    assert r.dropped_groups == 2 and r.kept_gpus == 3
    assert r.regrouped_gpus + r.idle_gpus == 1  # n1:0 lost its group partner
    assert not {g for grp in r.plan.groups for g in grp.gpus} & {"n0:0", "n0:1"}
    survivors = {tuple(g.stage_gpus): g.layers for g in plan.groups if not {"n0:0", "n0:1"} & set(g.gpus)}
    after = {tuple(g.stage_gpus): g.layers for g in r.plan.groups}
    assert all(after.get(k) == v for k, v in survivors.items())  # no weight reload for them
    frozen_only = reschedule(plan, c, model7b, params, stats, slo, fail_nodes={"n0"}, regroup=False)
    assert r.plan.objective >= frozen_only.plan.objective - 1e-9
    assert frozen_only.regrouped_gpus == 0


def test_reschedule_hybrid_finds_best_phases_of_survivors(model7b, params, stats, slo):
    """Survivors may also become colocated replicas (no reload): the flip-only search finds the
    best of all 3^k phase designations of the kept groups, never worse than split-only."""
    import itertools

    from thunderkv.scheduler.reschedule import FixedConfigEvaluator

    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, slo)
    # losing n2 leaves a 3-GPU prefill group and a 1-GPU prefill group: as split groups one of
    # them must flip to decode; as colocated replicas both serve (found by enumerating plans)
    plan = ev.plan(canonical([(("n0:0", "n0:1", "n1:0"), "prefill"), (("n1:1",), "prefill"),
                              (("n2:0",), "prefill"), (("n2:1",), "decode")]))
    hyb = reschedule(plan, c, model7b, params, stats, slo, fail_nodes={"n2"})
    split = reschedule(plan, c, model7b, params, stats, slo, fail_nodes={"n2"}, hybrid=False)
    assert {g.phase for g in split.plan.groups} <= {"prefill", "decode"}
    assert "colocated" in {g.phase for g in hyb.plan.groups}
    assert hyb.plan.objective > 1.5 * split.plan.objective
    kept = [g for g in plan.groups if not {"n2:0", "n2:1"} & set(g.gpus)]
    fev = FixedConfigEvaluator(c.without_nodes({"n2"}), model7b, params, stats, slo, kept,
                               SearchSpace(HYBRID))
    best = max(fev.value(canonical(zip((g.gpus for g in kept), ph)))
               for ph in itertools.product(HYBRID, repeat=len(kept)))
    assert hyb.plan.objective == pytest.approx(best, rel=1e-6)  # LP tie-break: same optimum


def test_partial_reload_dissolves_a_mis_sized_group(model7b, params, slo):
    """A plan sized for conversation meets a coding mix: phase flips alone cannot re-shape the
    4-GPU pipeline; dissolving it (its GPUs reload) must beat the lightweight result, and the
    groups not dissolved keep their layouts."""
    from thunderkv.scheduler.parallel import WorkloadStats
    from thunderkv.scheduler.reschedule import reschedule_with_reload
    from thunderkv.scheduler.workload import synthetic

    c = tiny_cluster()
    conv = WorkloadStats.of(synthetic("conversation", 300, 1.0, seed=1))
    coding = WorkloadStats.of(synthetic("coding", 300, 1.0, seed=1))
    big = ("n0:0", "n0:1", "n1:0", "n1:1")
    plan = Evaluator(c, model7b, params, conv, slo).plan(
        canonical([(big, "decode"), (("n2:0",), "prefill"), (("n2:1",), "prefill")]))
    light = reschedule(plan, c, model7b, params, coding, slo)
    assert light.dissolved == () and light.regrouped_gpus == 0
    seen: list[str] = []
    r = reschedule_with_reload(plan, c, model7b, params, coding, slo, 1, step_time_s=0.5,
                               progress=seen.append)
    assert r.dissolved == (plan.groups.index(next(g for g in plan.groups if tuple(g.gpus) == big)),)
    assert r.plan.objective > 1.1 * light.plan.objective
    assert r.regrouped_gpus + r.idle_gpus == 4 and r.dropped_groups == 0
    assert tuple(sorted(big)) not in {tuple(sorted(g.gpus)) for g in r.plan.groups}
    kept = {tuple(g.stage_gpus): g.layers for g in plan.groups if tuple(g.gpus) != big}
    after = {tuple(g.stage_gpus): g.layers for g in r.plan.groups}
    assert all(after.get(k) == v for k, v in kept.items())
    assert seen and "dissolving group(s)" in seen[0]
    # K=0 is the lightweight path; a round that buys nothing stops the greedy search
    assert reschedule_with_reload(plan, c, model7b, params, coding, slo, 0).dissolved == ()


def test_partial_reload_bad_arguments(model7b, params, stats, slo):
    from thunderkv.scheduler.reschedule import reschedule_with_reload

    c = tiny_cluster()
    plan = Evaluator(c, model7b, params, stats, slo).plan(
        canonical([(("n0:0", "n0:1"), "prefill"), (("n2:0", "n2:1"), "decode")]))
    with pytest.raises(ValueError, match="no group"):
        reschedule(plan, c, model7b, params, stats, slo, dissolve=(2,))
    with pytest.raises(ValueError, match="regroup"):
        reschedule(plan, c, model7b, params, stats, slo, dissolve=(0,), regroup=False)
    with pytest.raises(ValueError, match="reload_groups"):
        reschedule_with_reload(plan, c, model7b, params, stats, slo, -1)


def test_reschedule_cli_reload_groups(planned):
    d, _ = planned
    out = d / "reload.json"
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--workload", "coding",
                 "--reload-groups", "1", "--no-compare", "--json", str(out), "--quiet",
                 "--requests", "200", "--replay-seconds", "100"]) == 0
    new = json.loads(out.read_text())
    assert new["reload_groups"] == 1 and new["dissolved_groups"]  # the conversation plan's
    # layout does not suit coding: one group is worth re-forming
    dissolved = [doc_g for i, doc_g in enumerate(json.loads((d / "plan.json").read_text())
                                                  ["plan"]["groups"]) if i in new["dissolved_groups"]]
    assert new["regrouped_gpus"] + new["idle_gpus"] == sum(len(g["gpus"]) for g in dissolved)
    light = d / "light.json"
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--workload", "coding",
                 "--no-compare", "--json", str(light), "--quiet", "--requests", "200", "--replay-seconds", "100"]) == 0
    light_doc = json.loads(light.read_text())
    assert light_doc["dissolved_groups"] == [] and light_doc["regrouped_gpus"] == 0
    # the greedy keeps a dissolution only when it raises the simulated goodput
    assert (new["predicted"]["goodput_req_per_s"]
            > light_doc["predicted"]["goodput_req_per_s"])
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--reload-groups", "1",
                 "--no-regroup", "--quiet", "--no-compare", "--requests", "200", "--replay-seconds", "100"]) == 2


def test_sweep_table_names_what_was_adjusted():
    from rich.console import Console
    from thunderkv.scheduler.report import sweep_table

    row = {"failed": "n0", "lightweight_goodput_req_per_s": 1.0,
           "full_replan_goodput_req_per_s": 2.0, "ratio_to_full_replan": 0.5,
           "reschedule_seconds": 0.1, "regrouped_gpus": 2}
    for k, header in ((0, "lightweight"), (2, "partial reload (K=2)")):
        doc = {"sweep": [row], "summary": {"nodes": 1, "reload_groups": k, "min_ratio": 0.5,
                                           "within_10_percent": 0}}
        console = Console(width=200, record=True)
        console.print(sweep_table(doc))
        assert header in console.export_text()


def test_plan_table_shows_a_group_that_holds_no_layers_as_idle():
    """An infeasible group (a GPU too small for any layer) used to read as a working
    'colocated' group with 0 layers."""
    from rich.console import Console
    from thunderkv.scheduler.report import plan_table

    groups = [{"phase": "prefill", "gpus": ["a:0", "a:1"], "tp": 2, "pp": 1, "layers": [32],
               "capacity_req_per_s": 3.0},
              {"phase": "colocated", "gpus": ["b:0"], "tp": 1, "pp": 1, "layers": [0],
               "capacity_req_per_s": 0.0}]
    console = Console(width=200, record=True)
    console.print(plan_table({"plan": {"groups": groups}}))
    rows = [line for line in console.export_text().splitlines() if "a:0,1" in line or "b:0" in line]
    assert "prefill" in rows[0] and "32" in rows[0]
    assert "idle" in rows[1] and "colocated" not in rows[1]


def test_plan_resilience_picks_the_candidate_that_best_survives_a_lost_node(tmp_path):
    (tmp_path / "c.yaml").write_text(TINY)
    out = tmp_path / "plan.json"
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), "--json", str(out),
                 "--baselines", "none", "--resilience", "0.5", *COMMON]) == 0
    doc = json.loads(out.read_text())
    res = doc["predicted"]["resilience"]
    rows = res["scored"]
    assert res["tolerance"] == 0.5 and rows and len(rows) <= res["candidates"]
    assert all(r["goodput_req_per_s"] >= 0.5 * res["best_goodput_req_per_s"] - 1e-3 for r in rows)
    picked = next(r for r in rows if r["rank"] == res["picked_rank"])
    assert picked["mean_after_loss_req_per_s"] == max(r["mean_after_loss_req_per_s"] for r in rows)
    assert picked["min_after_loss_req_per_s"] <= picked["mean_after_loss_req_per_s"]
    assert doc["predicted"]["goodput_req_per_s"] == pytest.approx(picked["goodput_req_per_s"],
                                                                  abs=1e-3)


def test_resilience_score_loses_every_used_node(model7b, params, stats, slo, small_wl):
    from thunderkv.scheduler.resilience import resilience_score
    from thunderkv.scheduler.systems import system_goodput

    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, slo)
    # n1 carries the only decode group: losing it leaves survivors that must re-phase
    plan = ev.plan(canonical([(("n0:0", "n0:1"), "prefill"), (("n1:0", "n1:1"), "decode")]))
    score = resilience_score(plan, ev, small_wl, slo)
    assert set(score["per_node"]) == {"n0", "n1"}
    assert score["min"] == min(score["per_node"].values())
    assert score["mean"] == pytest.approx(sum(score["per_node"].values()) / 2)
    whole = system_goodput(plan, ev, small_wl, slo)[0]
    assert 0 <= score["min"] < whole  # a 2-group plan cannot lose a node for free
    from thunderkv.scheduler.driver import PlanRequest
    with pytest.raises(ValueError, match=r"resilience tolerance must be in \[0, 1\)"):
        PlanRequest(c, model7b, small_wl, slo, resilience=1.5)


def test_partial_reload_stops_when_no_group_is_worth_dissolving(model7b, params, stats, slo):
    """Start from the exhaustive optimum of the hybrid space rescheduling searches (split and
    colocated groups): no dissolved group can raise the model value."""
    from thunderkv.scheduler.exhaustive import exhaustive_best
    from thunderkv.scheduler.reschedule import reschedule_with_reload

    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, slo, SearchSpace(HYBRID))
    state, value, _ = exhaustive_best(ev)
    seen: list[str] = []
    r = reschedule_with_reload(ev.plan(state), c, model7b, params, stats, slo, 2,
                               step_time_s=0.3, progress=seen.append)
    assert r.dissolved == () and r.regrouped_gpus == 0
    assert r.plan.objective == pytest.approx(value, rel=1e-6)
    assert len(seen) == 1 and "no group is worth dissolving" in seen[0]


def test_reschedule_refuses_what_it_cannot_do(model7b, params, stats, slo):
    c = tiny_cluster()
    ev = Evaluator(c, model7b, params, stats, slo)
    plan = ev.plan(canonical([(("n0:0", "n0:1"), "prefill"), (("n2:0", "n2:1"), "decode")]))
    with pytest.raises(ValueError, match="every GPU of the cluster is lost"):
        reschedule(plan, c, model7b, params, stats, slo, fail_nodes={"n0", "n1", "n2"})
    with pytest.raises(ValueError, match="every GPU of the cluster is lost"):  # one by one
        reschedule(plan, c, model7b, params, stats, slo, fail_nodes={"n0"},
                   fail_gpus={"n1:0", "n1:1", "n2:0", "n2:1"})
    with pytest.raises(ValueError, match="lost a GPU already"):
        reschedule(plan, c, model7b, params, stats, slo, fail_nodes={"n0"}, dissolve=(0,))
    twice = reschedule(plan, c, model7b, params, stats, slo, dissolve=(1, 1))
    assert twice.dissolved == (1,) and twice.dropped_groups == 0


def test_resilience_on_a_one_node_cluster_scores_the_loss_as_zero(model7b, params, stats, slo,
                                                                     small_wl):
    from thunderkv.scheduler.resilience import resilience_score

    c = tiny_cluster(TINY.replace("""  - {name: n1, gpu: RTX3090, count: 2, intra_node_gbps: 100}
  - {name: n2, gpu: L40S, count: 2, intra_node_gbps: 200}
""", "").replace("""  links:
    - {a: n0, b: n1, gbps: 25}
""", ""))
    assert [n.name for n in c.nodes] == ["n0"]
    ev = Evaluator(c, model7b, params, stats, slo)
    plan = ev.plan(canonical([(("n0:0",), "prefill"), (("n0:1",), "decode")]))
    assert resilience_score(plan, ev, small_wl, slo)["per_node"] == {"n0": 0.0}


@pytest.mark.parametrize("flags", [
    ["--reload-groups", "1"],                                  # only with --reschedule
    ["--resilience", "0.02", "--no-sim-select"],               # it replays candidates itself
    ["--resilience", "1.5"],
])
def test_plan_refuses_flags_it_would_ignore(tmp_path, flags, capsys):
    (tmp_path / "c.yaml").write_text(TINY)
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), *flags, *COMMON]) == 2
    assert "error" in capsys.readouterr().err


def test_reschedule_refuses_planning_flags(planned, capsys):
    d, _ = planned
    for flags in (["--resilience", "0.02"], ["--reload-groups", "-1"]):
        assert main(["plan", "--reschedule", str(d / "plan.json"), *flags, "--quiet"]) == 2
    assert "--reload-groups must be >= 0" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    """CI installs matplotlib (so every --plot above draws); without it the plot is refused
    with an install hint, which the CLI prints while writing everything else."""
    import sys

    from thunderkv.scheduler.report import plot_attainment

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match="needs matplotlib: pip install matplotlib"):
        plot_attainment({"thunderkv": [(1.0, 1.0)]}, str(tmp_path / "a.png"), "t")
    assert not (tmp_path / "a.png").exists()


ONE_GPU = """
catalog:
  A6000: {fp16_tflops: 155, mem_gb: 48, mem_bw_gbs: 768, price_per_hour: 0.39}
  RTX3090: {fp16_tflops: 71, mem_gb: 24, mem_bw_gbs: 936, price_per_hour: 0.13}
nodes:
  - {name: n0, gpu: A6000, count: 1, intra_node_gbps: 200}
network:
  inter_node_gbps: 10
"""


def test_one_replica_cluster_falls_back_to_colocated_and_says_why(tmp_path, capsys):
    """One GPU cannot hold a prefill and a decode replica: instead of a lone prefill group
    serving nothing, ours is planned with colocated groups and the JSON says why."""
    (tmp_path / "c.yaml").write_text(ONE_GPU)
    out = tmp_path / "p.json"
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), "--json", str(out),
                 "--baselines", "hexgen", *COMMON]) == 0
    doc = json.loads(out.read_text())
    assert [g["phase"] for g in doc["plan"]["groups"]] == ["colocated"]
    assert doc["predicted"]["goodput_req_per_s"] > 0
    assert "no decode group" in doc["notes"][0]
    assert "note:" in capsys.readouterr().err


def test_zero_goodput_is_explained(tmp_path):
    (tmp_path / "c.yaml").write_text(ONE_GPU.replace("gpu: A6000", "gpu: RTX3090"))
    out = tmp_path / "p.json"
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), "--json", str(out),
                 "--baselines", "none", *COMMON[:-1], "--model", "llama-70b", "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["predicted"]["goodput_req_per_s"] == 0
    assert any("holds llama-70b" in n for n in doc["notes"])


def test_reschedule_and_simulate_use_the_recorded_workload(planned, tmp_path):
    """Without workload flags they replay what was planned (here 200 requests over 100 s),
    not the defaults (2000 requests over 800 s); flags still override."""
    d, doc = planned
    assert doc["workload"]["requests"] == 200 and doc["workload"]["seed"] == 0
    out = tmp_path / "re.json"
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--fail", "n1", "--json", str(out),
                 "--quiet", "--no-compare"]) == 0
    assert json.loads(out.read_text())["workload"]["requests"] == 200
    sim = tmp_path / "sim.json"
    assert main(["simulate", "--plan", str(d / "plan.json"), "--rate", "1.0",
                 "--json", str(sim)]) == 0
    assert json.loads(sim.read_text())["finished"] == 200  # 200 requests span 100 s at 1 req/s


def test_simulate_finds_a_recorded_trace(tmp_path):
    from conftest import TRACE
    (tmp_path / "c.yaml").write_text(TINY)
    out = tmp_path / "p.json"
    common = [c if c != "--workload" else "--trace" for c in COMMON]
    common[common.index("--trace") + 1] = str(TRACE)
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), "--json", str(out),
                 "--baselines", "none", *common]) == 0
    assert main(["simulate", "--plan", str(out), "--rate", "0.5"]) == 0  # no --trace needed


@pytest.mark.parametrize("mutate,field", [
    (lambda g: g["stages"][0].__setitem__(0, "zzz:0"), "plan.groups[0].stages[0]"),
    (lambda g: g.__setitem__("tp", -1), "plan.groups[0].tp"),
    (lambda g: g["layers"].__setitem__(0, g["layers"][0] + 1), "plan.groups[0].layers"),
])
def test_bad_plan_json_names_the_field(planned, tmp_path, capsys, mutate, field):
    d, doc = planned
    bad = json.loads(json.dumps(doc))
    mutate(bad["plan"]["groups"][0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert main(["simulate", "--plan", str(path), "--rate", "1.0"]) == 2
    assert field in capsys.readouterr().err


def test_a_gpu_in_two_groups_is_refused(planned, tmp_path, capsys):
    d, doc = planned
    bad = json.loads(json.dumps(doc))
    groups = bad["plan"]["groups"]
    assert len(groups) >= 2
    groups[1]["stages"][0][0] = groups[0]["stages"][0][0]
    groups[1]["gpus"] = [g for s in groups[1]["stages"] for g in s]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert main(["simulate", "--plan", str(path), "--rate", "1.0"]) == 2
    assert "is also used by group 0" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("flags,words", [
    (["--kv-group", "48"], "does not divide"),
    (["--time-limit", "0"], "--time-limit must be > 0"),
])
def test_plan_refuses_settings_it_cannot_use(tmp_path, capsys, flags, words):
    (tmp_path / "c.yaml").write_text(TINY)
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), *COMMON, *flags]) == 2
    assert words in " ".join(capsys.readouterr().err.split())


# --- flags checked up front (review): each refused before anything is loaded, naming the flag
QUICK = ["--model", "llama-7b", "--workload", "coding", "--requests", "200", "--time-limit", "2",
         "--baselines", "none", "--quiet"]


@pytest.mark.parametrize("flags,words", [
    (["--kv-group", "0"], "--kv-group must be a format v1 group size"),      # was ZeroDivisionError
    (["--kv-group", "3"], "--kv-group must be a format v1 group size"),
    (["--a100-price", "0"], "--a100-price must be a finite number > 0"),     # was ZeroDivisionError
    (["--a100-price", "inf"], "--a100-price must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--slo-ttft", "0"], "--slo-ttft must be a finite number > 0"),         # was: the default
    (["--slo-tpot", "-1"], "--slo-tpot must be a finite number > 0"),
    (["--slo-scale", "0"], "--slo-scale must be a finite number > 0"),
    (["--rate", "0"], "--rate must be a finite number > 0"),
    (["--replay-seconds", "inf"], "--replay-seconds must be a finite number >= 0"),
    (["--resilience", "-0.1"], "--resilience must be in [0, 1)"),
    (["--baselines", "vlm"], "--baselines: unknown system 'vlm'"),
    (["--baselines", "vllm,no-compresion"], "unknown system 'no-compresion'"),
    (["--baselines", ","], "--baselines: give a comma list"),
    (["--fail", "n1"], "--fail applies to --reschedule"),
    (["--no-regroup"], "--no-regroup applies to --reschedule"),
    (["--no-compare"], "--no-compare applies to --reschedule"),
    (["--trace", "t.csv"], "give --trace or --workload, not both"),
])
def test_plan_checks_flags_before_loading_anything(flags, words, capsys):
    """The cluster path does not exist: each flag is refused before it is read (a --baselines
    typo used to surface only after ours had been planned; --fail/--no-regroup/--no-compare
    without --reschedule and --trace with --workload were ignored; 0 fell back to defaults)."""
    assert main(["plan", "--cluster", "missing.yaml", *QUICK, *flags]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert words in err and "missing.yaml" not in err


@pytest.mark.parametrize("flags,words", [
    (["--cluster", "c.yaml", "--fail", "n1"], "--cluster does not apply to --reschedule"),
    (["--model", "llama-7b", "--slo-ttft", "3", "--kv-bits", "8", "--fail", "n1"],
     "--model, --slo-ttft, --kv-bits do not apply to --reschedule: it uses the cluster, model, "
     "SLOs and KV settings recorded in P.json"),
    (["--slo-tpot", "0.2", "--fail", "n1"], "--slo-tpot does not apply"),
    (["--baselines", "none", "--fail", "n1"], "--baselines does not apply"),
    (["--rate", "2", "--fail", "n1"], "--rate does not apply"),
    ([], "--reschedule needs a change"),
    (["--fail", " , "], "--reschedule needs a change"),
    (["--fail", "n1", "--plot", "x.png"], "--plot with --reschedule draws the --fail each sweep"),
    (["--fail", "n1", "--trace", "t.csv", "--workload", "coding"], "not both"),
])
def test_reschedule_refuses_flags_it_would_ignore(flags, words, capsys):
    assert main(["plan", "--reschedule", "P.json", "--quiet", *flags]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert words in err and "cannot read file" not in err


@pytest.mark.parametrize("flags", [["--workload", "conversation"], ["--fail", "each", "--plot", "x.png"]])
def test_reschedule_accepts_a_workload_shift_and_the_sweep_plot(flags, capsys):
    """No failed node but a new workload is a workload shift: the flags pass (P.json is then
    missing)."""
    assert main(["plan", "--reschedule", "P.json", "--quiet", *flags]) == 2
    assert "P.json: cannot read file" in capsys.readouterr().err


def test_plan_refuses_an_infinite_price_even_without_baselines(tmp_path, capsys):
    """.inf prices crashed the same-price A100 baseline sizing with OverflowError, even with
    --baselines none."""
    (tmp_path / "c.yaml").write_text(TINY.replace("price_per_hour: 0.44", "price_per_hour: .inf"))
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), *QUICK]) == 2
    assert "catalog.L40S.price_per_hour: must be a finite number" in \
        " ".join(capsys.readouterr().err.split())


def test_plan_refuses_a_colon_in_a_node_name(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(TINY.replace("{name: n1,", '{name: "n1:x",'))
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), *QUICK]) == 2
    assert "c.yaml:9: nodes[1].name: node name 'n1:x'" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("flags,words", [
    (["--rate", "0"], "--rate must be a finite number > 0"),
    (["--slo-ttft", "0"], "--slo-ttft must be a finite number > 0"),
    (["--slo-tpot", "-0.1"], "--slo-tpot must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--trace", "t.csv", "--workload", "coding"], "give --trace or --workload, not both"),
])
def test_simulate_checks_flags_before_loading(flags, words, capsys):
    """0 used to fall back silently to the plan's rate / SLO (negatives were refused)."""
    assert main(["simulate", "--plan", "missing.json", *flags]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert words in err and "missing.json" not in err


def test_simulate_json_writes_null_not_nan(planned, tmp_path, monkeypatch):
    """No finished request gives NaN latencies: `simulate --json` wrote NaN (invalid JSON)
    where `plan` writes null."""
    import thunderkv.scheduler.metrics as metrics

    real = metrics.summarize
    monkeypatch.setattr(metrics, "summarize",
                        lambda res, slo: {**real(res, slo), "ttft_p90": float("nan"),
                                          "tpot_p90": float("inf")})
    d, _ = planned
    out = tmp_path / "sim.json"
    assert main(["simulate", "--plan", str(d / "plan.json"), "--rate", "1.0", "--replay-seconds",
                 "0", "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert m["ttft_p90"] is None and m["tpot_p90"] is None and m["finished"] > 0


def test_errors_print_verbatim_on_one_line(tmp_path, capsys):
    """Rich markup in a name (``[b]``) used to be swallowed, and long errors wrapped."""
    (tmp_path / "c.yaml").write_text(TINY.replace("{name: n1,", '{name: "[b]n1",'))
    assert main(["plan", "--cluster", str(tmp_path / "c.yaml"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "node name '[b]n1' may hold only" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("cmd,flag", [(["plan", "--cluster", "c.yaml", *QUICK], "--json"),
                                      (["plan", "--cluster", "c.yaml", *QUICK], "--plot"),
                                      (["simulate", "--plan", "missing.json"], "--json")])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys,
                                                                          cmd, flag):
    """``--json /no/such/dir/p.json`` crashed with FileNotFoundError after the whole plan
    (minutes on a big cluster) had been computed."""
    assert main([*cmd, flag, str(tmp_path / "no-such-dir" / "p.out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{flag}: cannot write" in err
    assert "c.yaml" not in err and "missing.json" not in err  # nothing was loaded


@pytest.mark.parametrize("fail,words", [
    ("node3", "--fail: unknown node(s) ['node3']; the plan's cluster has n0, n1, n2"),
    ("each,n1", "--fail each loses every node in turn: give it alone"),
])
def test_fail_naming_no_node_of_the_plan_says_which_exist(planned, capsys, fail, words):
    """``--fail node3`` (the issue's own example) said only "unknown node(s) ['node3']": no
    flag, no hint of the names; 'each' among other names was an unknown node 'each'."""
    d, _ = planned
    assert main(["plan", "--reschedule", str(d / "plan.json"), "--fail", fail, "--quiet",
                 "--no-compare"]) == 2
    assert words in " ".join(capsys.readouterr().err.split())


def test_requests_beyond_any_replay_are_refused(capsys):
    """``--requests 1000000000000`` with a synthetic workload tried to allocate terabytes
    (numpy _ArrayMemoryError traceback)."""
    assert main(["plan", "--cluster", "c.yaml", *QUICK, "--requests", "1000000000000"]) == 2
    assert "--requests must be <= 2000000" in " ".join(capsys.readouterr().err.split())


def test_a_plan_naming_an_unknown_synthetic_workload_names_its_field(planned, tmp_path, capsys):
    """A plan JSON whose workload.source is ``synthetic:chat`` was reported as ``--workload:
    unknown synthetic workload 'chat'``, naming a flag nobody gave."""
    d, _ = planned
    doc = json.loads((d / "plan.json").read_text())
    doc["workload"]["source"] = "synthetic:chat"
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(doc))
    assert main(["simulate", "--plan", str(bad), "--rate", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the plan's workload.source 'synthetic:chat' names no synthetic workload" in err
