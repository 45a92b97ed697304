"""``thunderkv simulate``: replay a workload through a plan JSON written by ``thunderkv plan``.

Torch-free: imports only ``thunderkv.scheduler``.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
from typing import Any


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
    from rich.markup import escape
    from rich.table import Table

    from thunderkv.scheduler.errors import InputError
    from thunderkv.scheduler.metrics import summarize
    from thunderkv.scheduler.plan import inputs_from_dict, load_plan_json
    from thunderkv.scheduler.simulator import simulate
    from thunderkv.scheduler.workload import SLO

    from .plan import (
        check_workload_flags,
        load_workload,
        positive_flag,
        workload_from_plan,
        writable_flag,
    )

    out, err = Console(), Console(stderr=True)
    try:
        check_workload_flags(args)
        writable_flag(args, "json")
        positive_flag(args, "slo_ttft", "s")
        positive_flag(args, "slo_tpot", "s")
        doc, plan = load_plan_json(args.plan)
        cluster, model, params, slo = inputs_from_dict(doc["inputs"], args.plan)
        slo = SLO(slo.ttft if args.slo_ttft is None else args.slo_ttft,
                  slo.tpot if args.slo_tpot is None else args.slo_tpot)
        workload_from_plan(args, doc)
        wl, source = load_workload(args)
        rate = args.rate if args.rate is not None else _recorded_rate(doc) or wl.rate
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
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # one line, verbatim
        return 2
    t = Table(title=f"simulated {len(replay)} requests at {rate:.3g} req/s (SLO TTFT {slo.ttft:.3g} s, "
                    f"TPOT {slo.tpot:.3g} s)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else escape(str(v)))
    out.print(t)
    if args.json:
        with open(args.json, "w") as fh:  # strict JSON, as `plan` writes: null, never NaN
            json.dump(json_safe(metrics), fh, indent=1, allow_nan=False)
    return 0


def _recorded_rate(doc: dict[str, Any]) -> float | None:
    """The rate the plan was evaluated at, when it recorded a usable one."""
    pred = doc.get("predicted")
    rate = pred.get("rate_req_per_s") if isinstance(pred, dict) else None
    ok = isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate < math.inf
    return float(rate) if ok else None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN: no request finished) made None (JSON null)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        f = float(value)  # numpy floats too
        return f if math.isfinite(f) else None
    return value
