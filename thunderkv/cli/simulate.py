"""``thunderkv simulate``: replay a workload through a plan JSON written by ``thunderkv plan``.

Torch-free: imports only ``thunderkv.scheduler``.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    from .plan import add_workload_args

    p = subparsers.add_parser("simulate", help="replay a workload through a plan",
                              description=__doc__)
    p.add_argument("--plan", required=True, help="plan JSON from `thunderkv plan --json`")
    add_workload_args(p)
    p.add_argument("--slo-ttft", type=float, help="override the plan's TTFT deadline, s")
    p.add_argument("--slo-tpot", type=float, help="override the plan's TPOT deadline, s")
    p.add_argument("--goodput", action="store_true", help="also search the goodput (several runs)")
    p.add_argument("--json", help="write the metrics here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from thunderkv.scheduler.errors import InputError
    from thunderkv.scheduler.metrics import summarize
    from thunderkv.scheduler.plan import inputs_from_dict, load_plan_json
    from thunderkv.scheduler.simulator import simulate
    from thunderkv.scheduler.workload import SLO

    from .plan import load_workload, workload_from_plan

    out, err = Console(), Console(stderr=True)
    try:
        doc, plan = load_plan_json(args.plan)
        cluster, model, params, slo = inputs_from_dict(doc["inputs"])
        slo = SLO(args.slo_ttft or slo.ttft, args.slo_tpot or slo.tpot)
        workload_from_plan(args, doc)
        wl, source = load_workload(args)
        rate = args.rate or doc.get("predicted", {}).get("rate_req_per_s") or wl.rate
        replay = wl.arrivals_at(rate, args.arrivals, args.seed)
        res = simulate(plan, cluster, model, params, replay)
        metrics = {"rate_req_per_s": rate, "source": source, **summarize(res, slo),
                   "events": res.events}
        if args.goodput:
            from thunderkv.scheduler.evaluate import Evaluator
            from thunderkv.scheduler.parallel import WorkloadStats
            from thunderkv.scheduler.systems import system_goodput

            ev = Evaluator(cluster, model, params, WorkloadStats.of(wl), slo)
            metrics["goodput_req_per_s"] = system_goodput(plan, ev, wl, slo, args.arrivals, args.seed)[0]
    except (InputError, ValueError, RuntimeError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    t = Table(title=f"simulated {len(replay)} requests at {rate:.3g} req/s (SLO TTFT {slo.ttft:.3g} s, "
                    f"TPOT {slo.tpot:.3g} s)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(t)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(metrics, fh, indent=1)
    return 0
