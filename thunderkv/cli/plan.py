"""``thunderkv plan``: phase-split planning on a GPU cluster (and lightweight rescheduling).

Torch-free: imports only ``thunderkv.scheduler`` (numpy, scipy, pyyaml; matplotlib for --plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPLAY_SECONDS = 800.0  # goodput of cloud-32 plans stops moving beyond ~800 s (docs/history/planner.md)


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


def check_workload_flags(args: argparse.Namespace) -> None:
    """Refuse workload flags (shared by ``plan`` and ``simulate``) that cannot be used, naming
    the flag, before anything is loaded."""
    from thunderkv.scheduler.workload import MAX_REPLAY_REQUESTS

    if args.trace and args.workload:
        raise ValueError("give --trace or --workload, not both (the trace's lengths would "
                         "replace the synthetic ones)")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.requests is not None and args.requests < 10:
        raise ValueError(f"--requests must be >= 10, got {args.requests}")
    if args.requests is not None and args.requests > MAX_REPLAY_REQUESTS:
        raise ValueError(f"--requests must be <= {MAX_REPLAY_REQUESTS} (the most one replay "
                         f"runs), got {args.requests}")
    if args.replay_seconds is not None and not 0 <= args.replay_seconds < math.inf:
        raise ValueError(f"--replay-seconds must be a finite number >= 0, got {args.replay_seconds:g}")
    positive_flag(args, "rate", "req/s")


def writable_flag(args: argparse.Namespace, key: str) -> None:
    """``--key PATH``, when given, must name a file that can be written (checked as the bench
    commands check theirs), before anything is planned: the output is written last."""
    from .bench import output_path_problem

    why = output_path_problem(getattr(args, key, None))
    if why is not None:
        raise ValueError(f"{_flag(key)}: cannot write {getattr(args, key)} ({why})")


def positive_flag(args: argparse.Namespace, key: str, unit: str = "") -> None:
    """``--key``, when given, must be a finite number > 0 (0 is not "not given")."""
    v = getattr(args, key)
    if v is not None and not 0 < v < math.inf:
        flag = "--" + key.replace("_", "-")
        raise ValueError(f"{flag} must be a finite number > 0{f' ({unit})' if unit else ''}, "
                         f"got {v:g}")


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
            from thunderkv.scheduler.workload import SYNTHETIC

            if source.split(":", 1)[1] not in SYNTHETIC:
                raise ValueError(f"the plan's workload.source {source!r} names no synthetic "
                                 f"workload (choose from {sorted(SYNTHETIC)}): give --trace or "
                                 "--workload")
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
    p.add_argument("--model", help="preset (llama-7b/13b/30b/70b) or model YAML (default "
                   f"{PLAN_DEFAULTS['model']})")
    add_workload_args(p)
    s = p.add_argument_group("SLOs")
    s.add_argument("--slo-ttft", type=float, help="TTFT deadline, s")
    s.add_argument("--slo-tpot", type=float, help="TPOT deadline, s")
    s.add_argument("--slo-scale", type=float,
                   help="DistServe-style: K x single-request latency on A100-80GB (default 2.5/0.15 s)")
    k = p.add_argument_group("KV transfer and baselines")
    k.add_argument("--kv-bits", type=int, choices=(2, 4, 8, 16),
                   help=f"16 = uncompressed (default {PLAN_DEFAULTS['kv_bits']})")
    k.add_argument("--kv-group", type=int, help="format v1 group size: > 0, a multiple of "
                   f"8/--kv-bits, dividing the model's head_dim (default {PLAN_DEFAULTS['kv_group']})")
    k.add_argument("--no-kv-streaming", action="store_true",
                   help="KV leaves after the whole prefill (default: layer by layer, overlapping it)")
    k.add_argument("--baseline-cluster", help="same-price homogeneous cluster for vllm/distserve "
                   "(default: A100-80GB NVLink nodes at --a100-price matching this cluster's $/h)")
    k.add_argument("--a100-price", type=float, help="$/A100-hour for the default baseline "
                   f"cluster (default {PLAN_DEFAULTS['a100_price']:g})")
    k.add_argument("--baselines", help="comma list of vllm, distserve, hexgen (and ablations "
                   f"no-compression, no-netaware, no-split), or 'none' (default "
                   f"{PLAN_DEFAULTS['baselines']})")
    k.add_argument("--ablations", action="store_true", help="also run no-compression, no-netaware, no-split")
    t = p.add_argument_group("search")
    t.add_argument("--iters", type=int, default=5000,
                   help="tabu iterations per system (the time limit usually binds first)")
    t.add_argument("--time-limit", type=float, default=30.0, help="seconds of planning per system: the search, then replays of its best "
                   "candidates while time is left (the best one is always replayed, so a very "
                   "small limit runs over by one goodput search: minutes on thousands of GPUs, "
                   "see --replay-seconds)")
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
        return SLO(base.ttft if args.slo_ttft is None else args.slo_ttft,
                   base.tpot if args.slo_tpot is None else args.slo_tpot)
    return SLO(2.5 if args.slo_ttft is None else args.slo_ttft,
               0.15 if args.slo_tpot is None else args.slo_tpot)


# planning flags whose default is filled in by _check_flags, so that `--reschedule` can tell
# them given (and refuse them: a reschedule replays the plan's recorded inputs)
PLAN_DEFAULTS = {"model": "llama-30b", "kv_bits": 4, "kv_group": 64, "a100_price": 1.69,
                 "baselines": "vllm,distserve,hexgen"}
# flags that only planning uses (value None/False: not given)
PLAN_ONLY = ("cluster", "model", "slo_ttft", "slo_tpot", "slo_scale", "kv_bits", "kv_group",
             "no_kv_streaming", "baseline_cluster", "a100_price", "baselines", "ablations",
             "resilience", "no_sim_select", "rate")
# flags that only --reschedule uses (value falsy: not given)
RESCHEDULE_ONLY = ("fail", "no_compare", "no_regroup", "reload_groups")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations that would otherwise be silently ignored, and values that
    cannot be used, naming the flag, before anything is loaded or planned."""
    writable_flag(args, "json")
    writable_flag(args, "plot")
    if args.reload_groups < 0:
        raise ValueError("--reload-groups must be >= 0")
    if not args.time_limit > 0:
        raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit:g}")
    if args.iters < 0:
        raise ValueError(f"--iters must be >= 0, got {args.iters}")
    check_workload_flags(args)
    if args.reschedule:
        _check_reschedule_flags(args)
        return
    for key in RESCHEDULE_ONLY:
        if getattr(args, key):
            raise ValueError(f"{_flag(key)} applies to --reschedule PLAN.json")
    if args.resilience is not None:
        if args.no_sim_select:
            raise ValueError("--resilience replays the candidates itself: drop --no-sim-select")
        if not 0 <= args.resilience < 1:
            raise ValueError(f"--resilience must be in [0, 1), got {args.resilience:g}")
    for key, value in PLAN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("slo_ttft", "slo_tpot", "slo_scale"):
        positive_flag(args, key, "s" if key != "slo_scale" else "")
    positive_flag(args, "a100_price", "$/hour")
    if args.kv_group <= 0 or (args.kv_bits < 16 and args.kv_group * args.kv_bits % 8):
        raise ValueError(f"--kv-group must be a format v1 group size: > 0 and a multiple of "
                         f"{8 // math.gcd(8, args.kv_bits)} at --kv-bits {args.kv_bits}, got "
                         f"{args.kv_group}")
    args.baselines = _check_baselines(args.baselines)


def _check_reschedule_flags(args: argparse.Namespace) -> None:
    given = [_flag(k) for k in PLAN_ONLY if getattr(args, k) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to "
                         f"--reschedule: it uses the cluster, model, SLOs and KV settings recorded "
                         f"in {args.reschedule} (plan afresh to change them)")
    fails = [x.strip() for x in args.fail.split(",") if x.strip()]
    if not fails and not (args.trace or args.workload):
        raise ValueError("--reschedule needs a change: --fail NODES (or 'each'), or a new "
                         "--trace/--workload (a workload shift)")
    if args.plot and fails != ["each"]:
        raise ValueError("--plot with --reschedule draws the --fail each sweep; a single "
                         "reschedule has no plot")


def _check_baselines(text: str) -> str:
    """``--baselines``, checked (a typo is caught before ours is planned) and normalised."""
    from thunderkv.scheduler.systems import ABLATIONS, BASELINES

    if text.strip() == "none":
        return "none"
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise ValueError("--baselines: give a comma list of systems, or 'none'")
    for name in names:
        if name == "thunderkv":
            raise ValueError("--baselines: ours (thunderkv) is always planned; list the others")
        if name not in BASELINES + ABLATIONS:
            raise ValueError(f"--baselines: unknown system {name!r}; choose from "
                             f"{', '.join(BASELINES + ABLATIONS)}, or 'none'")
    return ",".join(dict.fromkeys(names))


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
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # one line, verbatim
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
    homogeneous = {"vllm", "distserve"} & set(names)  # the others plan on --cluster
    base = (load_cluster(args.baseline_cluster) if args.baseline_cluster
            else same_price_a100(cluster, args.a100_price) if homogeneous else None)
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
                              replan=replan, arrivals=args.arrivals, seed=args.seed)
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
                              replan=replan, arrivals=args.arrivals, seed=args.seed)
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
