"""How long must a goodput replay be? The search's best candidates (ours and HexGen-like,
conversation trace, cloud-32, LLaMA-30B, the same 30 s planning search as `thunderkv plan`),
each replayed with the workload's 2000 requests once and cycled to span 200-1600 s.

    python benchmarks/results/planner-2026-11-29e-cpu/replay_span.py > .../replay-span.txt
"""

import dataclasses
import time

from thunderkv.scheduler.cluster import load_cluster
from thunderkv.scheduler.costmodel import CostParams
from thunderkv.scheduler.model import load_model
from thunderkv.scheduler.parallel import WorkloadStats
from thunderkv.scheduler.systems import make_system, plan_system, search_budget, system_goodput
from thunderkv.scheduler.tabu import TabuConfig
from thunderkv.scheduler.workload import SLO, load_azure_trace

SPANS = (0, 200, 400, 800, 1600)
cluster = load_cluster("examples/planner/cloud-32.yaml")
model = load_model("llama-30b")
wl = load_azure_trace("examples/traces/AzureLLMInferenceTrace_conv.csv", limit=2000)
stats, slo, params = WorkloadStats.of(wl), SLO(2.5, 0.15), CostParams()
print("goodput (req/s, 1 % bisection) by replay span; span 0 = the 2000 requests once "
      f"(~{2000 / 19:.0f} s at 19 req/s); (s) = seconds per goodput search")
print(f"{'system':10s} {'rank':>4s} {'model':>6s} " + " ".join(f"{s:>12d}" for s in SPANS))
for name in ("thunderkv", "hexgen"):
    sys_ = make_system(name, cluster, None, 4)
    _, ev, res = plan_system(sys_, model, params, stats, slo, search_budget(TabuConfig(seed=0)))
    for rank, (value, state) in enumerate(res.top[:5]):
        plan, cells = ev.plan(state), []
        for span in SPANS:
            t = time.perf_counter()
            g = system_goodput(plan, ev, dataclasses.replace(wl, min_replay_s=span), slo)[0]
            cells.append(f"{g:6.2f} ({time.perf_counter() - t:3.1f})")
        print(f"{name:10s} {rank:4d} {value:6.2f} " + " ".join(f"{c:>12s}" for c in cells),
              flush=True)
