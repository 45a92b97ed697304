"""Does simulation-in-the-loop polishing beat the search's pick? Neighbours of the picked plan
(one tabu move away), ranked by model value, the best N replayed by simulation.

    python benchmarks/results/planner-2026-11-29c-cpu/polish.py thunderkv|hexgen N
"""

import sys
import time

from thunderkv.scheduler.cluster import load_cluster
from thunderkv.scheduler.costmodel import CostParams
from thunderkv.scheduler.model import load_model
from thunderkv.scheduler.parallel import WorkloadStats
from thunderkv.scheduler.systems import (
    make_system,
    plan_system,
    replay_candidates,
    search_budget,
    system_goodput,
)
from thunderkv.scheduler.tabu import TabuConfig, neighbours
from thunderkv.scheduler.workload import SLO, load_azure_trace

name = sys.argv[1] if len(sys.argv) > 1 else "thunderkv"
n_sims = int(sys.argv[2]) if len(sys.argv) > 2 else 30
cluster = load_cluster("examples/planner/cloud-32.yaml")
model = load_model("llama-30b")
wl = load_azure_trace("examples/traces/AzureLLMInferenceTrace_conv.csv", limit=2000)
stats, slo, params = WorkloadStats.of(wl), SLO(2.5, 0.15), CostParams()
sys_ = make_system(name, cluster, None, 4)
plan, ev, res = plan_system(sys_, model, params, stats, slo, search_budget(TabuConfig(seed=0)))
rank, _, picked, _ = max(replay_candidates(res, ev, wl, slo), key=lambda r: r[2])
state = res.top[rank][1]
print("picked rank", rank, "model", res.top[rank][0], "sim", picked, flush=True)
nb = neighbours(ev, state)
scored = sorted(((ev.value(s), i) for i, (s, _, _) in enumerate(nb)), reverse=True)
print(len(nb), "neighbours; top model values", [round(v, 2) for v, _ in scored[:10]], flush=True)
t = time.perf_counter()
seen = []
for v, i in scored[:n_sims]:
    if v <= 0:
        break
    seen.append((system_goodput(ev.plan(nb[i][0]), ev, wl, slo)[0], v, i))
print(f"{len(seen)} sims in {time.perf_counter() - t:.1f} s")
for g, v, _ in sorted(seen, reverse=True)[:10]:
    print(f"  model {v:.2f} sim {g:.2f}")
# The best of many replays of one arrival sample is flattered by that sample: the pick and the
# best neighbour on other Poisson samples (same lengths, arrivals regenerated with seeds 1-3).
top = max(seen)
for label, st in (("pick", state), ("best neighbour", nb[top[2]][0])):
    gs = [system_goodput(ev.plan(st), ev, wl, slo, seed=k)[0] for k in (1, 2, 3)]
    print(f"{label}: arrival seeds 1-3 " + " / ".join(f"{g:.2f}" for g in gs))
