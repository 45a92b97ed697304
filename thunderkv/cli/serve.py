"""``thunderkv serve``: the OpenAI-compatible server over prefill/decode worker processes."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (OpenAI completions) with prefill/decode workers",
        description="Starts N prefill and M decode worker processes (or colocated ones) and an "
        "OpenAI-compatible HTTP API on 127.0.0.1. KV moves prefill -> decode over "
        "thunderkv.transfer, 4-bit by default.")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a local "
                   "HF model directory")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--colocated", type=int, default=0,
                   help="run this many colocated workers instead (comparison mode)")
    p.add_argument("--plan", help="planner JSON (`thunderkv plan --json`): one worker per "
                   "planned group with its phase; the router follows the plan's routing rates")
    p.add_argument("--kv-bits", type=int, default=4, choices=[4, 16])
    p.add_argument("--kv-group-size", type=int, default=32, choices=[16, 32, 64],
                   help="format v1 group size of 4-bit KV (16: closer to 16-bit, fewer savings)")
    p.add_argument("--kv-sink-tokens", type=int, default=0, choices=range(0, 256),
                   metavar="N",
                   help="first tokens of a 4-bit KV message sent exact (attention sink)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=run)


def plan_for_serving(path: str) -> tuple[list[str], list[dict]]:
    """Worker phases and routing from a planner JSON (``thunderkv plan --json``): one worker per
    planned group, in group order (worker id = group index), and the plan's ``routing`` entries
    (prefill group -> decode group request rates) for the router to follow."""
    import json

    with open(path) as f:
        doc = json.load(f)
    plan = doc.get("plan", doc) if isinstance(doc, dict) else None
    groups = plan.get("groups") if isinstance(plan, dict) else None
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{path}: no 'groups' list in the plan")
    roles = [g.get("phase") if isinstance(g, dict) else None for g in groups]
    bad = sorted({str(r) for r in roles} - {"prefill", "decode", "colocated"})
    if bad:
        raise ValueError(f"{path}: group phases must be prefill/decode/colocated, got {bad}")
    routing = plan.get("routing")
    if not isinstance(routing, list) or not routing:
        raise ValueError(f"{path}: no 'routing' list in the plan")
    return roles, routing


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from rich.console import Console

    from ..serve.engine import Engine, ServeConfig
    from ..serve.http import ApiServer

    console = Console()
    roles = routing = None
    if args.plan:
        try:
            roles, routing = plan_for_serving(args.plan)
        except (OSError, ValueError) as exc:
            console.print(f"[red]cannot use the plan: {exc}")
            return 2
    try:
        config = ServeConfig(model=args.model, prefill=args.prefill, decode=args.decode,
                             colocated=args.colocated, kv_bits=args.kv_bits,
                             kv_group_size=args.kv_group_size,
                             kv_sink_tokens=args.kv_sink_tokens,
                             threads=args.threads,
                             role_list=roles, routing=routing)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print(f"starting {', '.join(config.roles())} workers for {args.model} ...")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        engine = Engine(config)
    except FileNotFoundError as exc:  # an unknown model name or path, a missing GGUF
        console.print(f"[red]error:[/red] {exc}")
        return 2
    with engine, ApiServer(engine, args.host, args.port) as server:
        console.print(f"serving {args.model} at {server.url}/v1 (KV {args.kv_bits}-bit); "
                      "GET /health /metrics /admin/workers, POST /admin/reschedule; Ctrl-C stops")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0
