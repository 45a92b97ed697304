"""``thunderkv plan``: phase-split planning on a GPU cluster (and lightweight rescheduling).

Torch-free: imports only ``thunderkv.scheduler`` (numpy, scipy, pyyaml; matplotlib for --plot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPLAY_SECONDS = 800.0  # goodput of cloud-32 plans stops moving beyond ~800 s (docs/planner.md)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", help="Azure LLM inference trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
    g.add_argument("--workload", choices=("coding", "conversation"),
                   help="synthetic lengths instead of a trace (coding: prompt ~2048, output ~28)")
    # None = not given: `plan` uses WORKLOAD_DEFAULTS, `--reschedule` and `simulate` the
    # values recorded in the plan JSON (then these defaults)
    g.add_argument("--requests", type=int, default=None,
                   help="the workload: first N requests of the trace (or N synthetic); default 2000")
    g.add_argument("--replay-seconds", type=float, default=None, metavar="S",
                   help="each simulation replays at least S seconds of arrivals, cycling the "
                        "workload's requests, so that a rate above a plan's steady-state "
                        f"capacity fails (default {REPLAY_SECONDS:g}; 0 = replay them once)")
    g.add_argument("--arrivals", choices=("poisson", "trace"), default=None,
                   help="Poisson arrivals at each rate (default), or the trace's own arrivals "
                        "time-scaled")
    g.add_argument("--rate", type=float, help="request rate (req/s) to report metrics at")
    g.add_argument("--seed", type=int, default=None, help="search and arrivals seed (default 0)")


WORKLOAD_DEFAULTS = {"requests": 2000, "replay_seconds": REPLAY_SECONDS, "arrivals": "poisson",
                     "seed": 0}


def workload_from_plan(args: argparse.Namespace, doc: dict) -> None:
    """Workload flags left out take the values the plan JSON recorded (its source, request
    count, replay span, arrivals and seed), so a reschedule or replay uses the planned workload."""
    w = doc.get("workload", {})
    for key in WORKLOAD_DEFAULTS:
        if getattr(args, key) is None and w.get(key) is not None:
            setattr(args, key, type(WORKLOAD_DEFAULTS[key])(w[key]))
    if not (args.trace or args.workload):
        source = w.get("source") or ""
        if source.startswith("synthetic:"):
            args.workload = source
        elif source and os.path.exists(source):
            args.trace = source
        else:
            raise ValueError(f"the plan's workload source {source!r} is unavailable: give "
                             "--trace or --workload")


def load_workload(args: argparse.Namespace):
    from thunderkv.scheduler.workload import load_azure_trace, synthetic

    for key, value in WORKLOAD_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.requests < 10:
        raise ValueError("--requests must be >= 10")
    if not args.replay_seconds >= 0:
        raise ValueError("--replay-seconds must be >= 0")
    if args.trace:
        wl, source = load_azure_trace(args.trace, limit=args.requests), args.trace
    else:
        kind = args.workload
        if kind is None:
            raise ValueError("give --trace T.csv or --workload coding|conversation")
        if kind.startswith("synthetic:"):
            kind = kind.split(":", 1)[1]
        wl, source = synthetic(kind, args.requests, 1.0, args.seed), f"synthetic:{kind}"
    wl.min_replay_s = args.replay_seconds
    return wl, source


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan a phase-split deployment on a GPU cluster",
                              description=__doc__)
    p.add_argument("--cluster", help="cluster YAML (catalog, nodes, network)")
    p.add_argument("--model", default="llama-30b", help="preset (llama-7b/13b/30b/70b) or model YAML")
    add_workload_args(p)
    s = p.add_argument_group("SLOs")
    s.add_argument("--slo-ttft", type=float, help="TTFT deadline, s")
    s.add_argument("--slo-tpot", type=float, help="TPOT deadline, s")
    s.add_argument("--slo-scale", type=float,
                   help="DistServe-style: K x single-request latency on A100-80GB (default 2.5/0.15 s)")
    k = p.add_argument_group("KV transfer and baselines")
    k.add_argument("--kv-bits", type=int, choices=(2, 4, 8, 16), default=4, help="16 = uncompressed")
    k.add_argument("--kv-group", type=int, default=64)
    k.add_argument("--no-kv-streaming", action="store_true",
                   help="KV leaves after the whole prefill (default: layer by layer, overlapping it)")
    k.add_argument("--baseline-cluster", help="same-price homogeneous cluster for vllm/distserve "
                   "(default: A100-80GB NVLink nodes at --a100-price matching this cluster's $/h)")
    k.add_argument("--a100-price", type=float, default=1.69, help="$/A100-hour for the default baseline cluster")
    k.add_argument("--baselines", default="vllm,distserve,hexgen", help="comma list or 'none'")
    k.add_argument("--ablations", action="store_true", help="also run no-compression, no-netaware, no-split")
    t = p.add_argument_group("search")
    t.add_argument("--iters", type=int, default=5000,
                   help="tabu iterations per system (the time limit usually binds first)")
    t.add_argument("--time-limit", type=float, default=30.0, help="seconds of planning per system (search + replaying its best candidates)")
    t.add_argument("--resilience", type=float, metavar="TOL",
                   help="failure-aware choice for ours: of the search's candidates within TOL "
                        "(e.g. 0.02) of the best simulated goodput, keep the one with the most "
                        "goodput after losing any one node and rescheduling lightly (runs past "
                        "--time-limit: ~2 s per node per candidate)")
    t.add_argument("--no-sim-select", action="store_true",
                   help="take the search's best model value as is (default: replay its best "
                        "distinct candidates and keep the highest simulated goodput)")
    o = p.add_argument_group("output")
    o.add_argument("--json", help="write the plan document here")
    o.add_argument("--plot", help="PNG of SLO attainment vs request rate (needs matplotlib)")
    o.add_argument("--quiet", action="store_true", help="no progress lines")
    r = p.add_argument_group("rescheduling")
    r.add_argument("--reschedule", metavar="PLAN.json", help="adjust an existing plan instead")
    r.add_argument("--fail", default="",
                   help="comma list of failed nodes (and/or node:index GPUs), or 'each': lose "
                        "every node of the plan in turn and tabulate (--plot: bar chart)")
    r.add_argument("--no-compare", action="store_true", help="skip the full re-plan comparison")
    r.add_argument("--no-regroup", action="store_true",
                   help="leave orphaned GPUs (of groups that lost a GPU) idle instead of re-grouping them")
    r.add_argument("--reload-groups", type=int, default=0, metavar="K",
                   help="partial reload: also dissolve up to K intact groups (chosen greedily) and "
                        "re-group their GPUs, which reload weights (default 0: no reload)")
    p.set_defaults(func=run)


def _slo(args, model, stats, params):
    from thunderkv.scheduler.systems import reference_slo
    from thunderkv.scheduler.workload import SLO

    if args.slo_scale is not None:
        base = reference_slo(model, stats.prompt_mean, args.slo_scale, params)
        return SLO(args.slo_ttft or base.ttft, args.slo_tpot or base.tpot)
    return SLO(args.slo_ttft or 2.5, args.slo_tpot or 0.15)


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations that would otherwise be silently ignored."""
    if args.reload_groups < 0:
        raise ValueError("--reload-groups must be >= 0")
    if not args.time_limit > 0:
        raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit:g}")
    if args.iters < 0:
        raise ValueError(f"--iters must be >= 0, got {args.iters}")
    if args.reload_groups and not args.reschedule:
        raise ValueError("--reload-groups applies to --reschedule PLAN.json")
    if args.resilience is not None:
        if args.reschedule:
            raise ValueError("--resilience applies to planning, not to --reschedule")
        if args.no_sim_select:
            raise ValueError("--resilience replays the candidates itself: drop --no-sim-select")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from thunderkv.scheduler.errors import InputError

    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:  # keep the wide systems table readable in logs and pipes
        out = Console(width=140)
    log = (lambda s: None) if args.quiet else (lambda s: err.print(f"[dim]{s}[/dim]"))
    try:
        _check_flags(args)
        if args.reschedule:
            doc = _run_reschedule(args, log)
        else:
            doc = _run_plan(args, log)
    except (InputError, ValueError, RuntimeError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    from thunderkv.scheduler.report import plan_table, sweep_table, systems_table

    if "sweep" in doc:
        out.print(sweep_table(doc))
    else:
        out.print(plan_table(doc, "plan" if not args.reschedule else "rescheduled plan"))
    if "baselines" in doc:
        out.print(systems_table(doc))
    for note in doc.get("notes", []):
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        log(f"wrote {args.json}")
    return 0


def _run_plan(args, log) -> dict:
    from thunderkv.scheduler.cluster import load_cluster
    from thunderkv.scheduler.costmodel import CostParams
    from thunderkv.scheduler.driver import PlanRequest, run_plan, same_price_a100
    from thunderkv.scheduler.model import load_model
    from thunderkv.scheduler.parallel import WorkloadStats
    from thunderkv.scheduler.tabu import TabuConfig

    if not args.cluster:
        raise ValueError("--cluster is required (or --reschedule PLAN.json)")
    t0 = time.perf_counter()
    cluster = load_cluster(args.cluster)
    model = load_model(args.model)
    if args.kv_bits < 16 and model.head_dim % args.kv_group:
        raise ValueError(f"--kv-group {args.kv_group} does not divide {model.name}'s head_dim "
                         f"{model.head_dim}: format v1 groups run along head_dim")
    wl, source = load_workload(args)
    params = CostParams(kv_bits=args.kv_bits, kv_group=args.kv_group,
                        kv_streaming=not args.no_kv_streaming)
    stats = WorkloadStats.of(wl)
    slo = _slo(args, model, stats, params)
    names = () if args.baselines == "none" else tuple(x for x in args.baselines.split(",") if x)
    if args.ablations:
        names += ("no-compression", "no-netaware", "no-split")
    base = (load_cluster(args.baseline_cluster) if args.baseline_cluster
            else same_price_a100(cluster, args.a100_price))
    req = PlanRequest(cluster, model, wl, slo, params,
                      TabuConfig(max_iters=args.iters, time_limit_s=args.time_limit, seed=args.seed),
                      base, names, args.rate, args.arrivals, args.seed,
                      select_by_simulation=not args.no_sim_select, resilience=args.resilience)
    doc, raw = run_plan(req, log)
    doc["workload"]["source"] = source
    doc["inputs"]["workload_stats"] = {k: getattr(stats, k) for k in stats.__slots__}
    doc["total_seconds"] = round(time.perf_counter() - t0, 2)
    if args.plot:
        _plot(args, doc, raw, req)
    return doc


def _run_reschedule(args, log) -> dict:
    from thunderkv.scheduler.plan import load_plan_json
    from thunderkv.scheduler.reschedule import reschedule_document
    from thunderkv.scheduler.tabu import TabuConfig

    doc, plan = load_plan_json(args.reschedule)
    fails = [x.strip() for x in args.fail.split(",") if x.strip()]
    workload_from_plan(args, doc)
    wl, source = load_workload(args)
    # the full re-plan it is compared with gets the search effort a plan would
    replan = TabuConfig(max_iters=args.iters, time_limit_s=args.time_limit, seed=args.seed)
    if fails == ["each"]:
        from thunderkv.scheduler.report import plot_sweep
        from thunderkv.scheduler.reschedule import failure_sweep

        sweep = failure_sweep(doc, plan, wl, compare=not args.no_compare, log=log,
                              regroup=not args.no_regroup, reload_groups=args.reload_groups,
                              replan=replan)
        sweep["workload"]["source"] = source
        if args.plot:
            try:
                plot_sweep(sweep, args.plot, f"rescheduling after one lost node "
                                             f"({sweep['workload'].get('name', '')})")
                sweep["plot"] = {"path": args.plot}
            except RuntimeError as exc:
                print(f"warning: {exc}; no plot written", file=sys.stderr)
        return sweep
    new = reschedule_document(doc, plan, fails, wl, compare=not args.no_compare, log=log,
                              regroup=not args.no_regroup, reload_groups=args.reload_groups,
                              replan=replan)
    new["workload"]["source"] = source
    return new


def _plot(args, doc, raw, req) -> None:
    from thunderkv.scheduler.report import attainment_curves, plot_attainment
    from thunderkv.scheduler.systems import sim_runner

    top = max(r["goodput_req_per_s"] for r in raw.values()) or 1.0
    rates = [top * f for f in (0.1, 0.25, 0.4, 0.55, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)]
    curves = attainment_curves(
        raw, lambda n: sim_runner(raw[n]["plan"], raw[n]["ev"], req.workload, req.arrivals, req.seed),
        req.slo, rates)
    try:
        plot_attainment(curves, args.plot, f"{req.model.name}, {req.workload.name}, {req.cluster.name}")
    except RuntimeError as exc:
        print(f"warning: {exc}; no plot written", file=sys.stderr)
        return
    doc["plot"] = {"path": args.plot, "curves": {n: [[round(r, 3), round(a, 4)] for r, a in c]
                                                 for n, c in curves.items()}}
