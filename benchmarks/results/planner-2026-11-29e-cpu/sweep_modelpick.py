"""Ran before pick_by_simulation was removed (see README.md); kept as the record of the
model-only pick. python sweep_modelpick.py conv.json out.json"""
import argparse
import json
import sys

import thunderkv.scheduler.reschedule as R
from thunderkv.scheduler.plan import load_plan_json

from thunderkv.cli.plan import load_workload

orig = R.pick_by_simulation
R.pick_by_simulation = lambda res, g, alternatives=2, deadline=None: orig(res, g, 0, None)
doc, plan = load_plan_json(sys.argv[1])
ns = argparse.Namespace(trace="examples/traces/AzureLLMInferenceTrace_conv.csv", workload=None, requests=2000, replay_seconds=800.0, seed=0)
wl, _ = load_workload(ns)
out = R.failure_sweep(doc, plan, wl, compare=True, log=print)
json.dump(out, open(sys.argv[2], "w"), indent=1)
for r in out["sweep"]:
    print(r["failed"], r["lightweight_goodput_req_per_s"], r["full_replan_goodput_req_per_s"], r["ratio_to_full_replan"], r["reschedule_seconds"])
print(out["summary"])
