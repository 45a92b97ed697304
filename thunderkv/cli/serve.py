"""``thunderkv serve``: the OpenAI-compatible server over prefill/decode worker processes."""

from __future__ import annotations

import argparse

from .bench import sink_tokens


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (OpenAI completions) with prefill/decode workers",
        description="Starts N prefill and M decode worker processes (or colocated ones) and an "
        "OpenAI-compatible HTTP API on 127.0.0.1. KV moves prefill -> decode over "
        "thunderkv.transfer, 4-bit by default.")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a local "
                   "HF model directory")
    # None: not given (1, 1, 0), so that one given along with --plan can be refused
    p.add_argument("--prefill", type=int, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, help="decode workers (default 1)")
    p.add_argument("--colocated", type=int,
                   help="run this many colocated workers instead (comparison mode)")
    p.add_argument("--plan", help="planner JSON (`thunderkv plan --json`): one worker per "
                   "planned group with its phase; the router follows the plan's routing rates "
                   "(not with --prefill/--decode/--colocated)")
    p.add_argument("--kv-bits", type=int, default=4, choices=[4, 16])
    p.add_argument("--kv-group-size", type=int, default=32, choices=[16, 32, 64],
                   help="format v1 group size of 4-bit KV (16: closer to 16-bit, fewer savings)")
    p.add_argument("--kv-sink-tokens", type=sink_tokens, default=0, metavar="N",
                   help="first tokens of a 4-bit KV message sent exact (attention sink)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (0: torch's default)")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP bind address (no authentication: keep it on loopback)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    p.set_defaults(func=run)


def plan_for_serving(path: str) -> tuple[list[str], list[dict]]:
    """Worker phases and routing from a planner JSON (``thunderkv plan --json``): one worker per
    planned group, in group order (worker id = group index), and the plan's ``routing`` entries
    (prefill group -> decode group request rates) for the router to follow."""
    import json

    with open(path) as f:
        try:
            doc = json.load(f)
        except ValueError as exc:  # not JSON (UnicodeDecodeError is a ValueError too)
            raise ValueError(f"{path}: not a planner JSON: {exc}") from None
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


def worker_counts_given(args: argparse.Namespace) -> str:
    """The worker-count options given on the command line, e.g. "--colocated" ("" if none)."""
    return ", ".join(f"--{name}" for name in ("prefill", "decode", "colocated")
                     if getattr(args, name) is not None)


def run(args: argparse.Namespace) -> int:
    """Validate everything that can be checked cheaply, bind the HTTP port, then start the
    workers (the slow part: each loads the model). Ordinary mistakes end with one line and exit
    code 2 before any model loads; Ctrl-C or SIGTERM stops quietly, workers included. While the
    workers load, the HTTP server already answers: 503, "starting"."""
    import signal
    import threading

    from rich.console import Console
    from rich.markup import escape

    from ..serve.engine import Engine, ServeConfig
    from ..serve.http import ApiServer, is_loopback
    from ..serve.tokenizer import check_model

    console = Console(soft_wrap=True)  # one line per message, however long
    _configure_logging()

    def error(message: str, code: int = 2) -> int:
        console.print(f"[red]error:[/red] {escape(str(message))}")
        return code

    if not 0 <= args.port <= 65535:
        return error(f"--port must be in 0..65535, got {args.port}")
    if args.plan and (given := worker_counts_given(args)):
        return error(f"--plan starts one worker per planned group; {given} would be ignored "
                     "(drop it, or drop --plan)")
    counts = {"prefill": 1, "decode": 1, "colocated": 0}
    counts.update({k: getattr(args, k) for k in counts if getattr(args, k) is not None})
    roles = routing = None
    if args.plan:
        try:
            roles, routing = plan_for_serving(args.plan)
        except (OSError, ValueError) as exc:
            return error(f"cannot use the plan: {exc}")
    try:
        config = ServeConfig(model=args.model, **counts, kv_bits=args.kv_bits,
                             kv_group_size=args.kv_group_size,
                             kv_sink_tokens=args.kv_sink_tokens,
                             threads=args.threads,
                             role_list=roles, routing=routing)
        check_model(args.model)
    except (ValueError, FileNotFoundError) as exc:
        return error(exc)
    try:  # bound before the workers start: a port in use or a bad host fails at once
        server = ApiServer(None, args.host, args.port)
    except OSError as exc:
        return error(f"cannot listen on {args.host}:{args.port}: "
                     f"{exc.strerror or exc}")
    if not is_loopback(server.host):
        console.print(f"[yellow]warning:[/yellow] listening on {escape(server.host)}, not "
                      "loopback: there is no authentication, anyone who can reach port "
                      f"{server.port} can run completions and reconfigure the workers "
                      "(/admin/reschedule); put an authenticating proxy in front")

    serving = False
    stop = threading.Event()
    all_dead = threading.Event()  # every worker died: stop, and exit 1 for the supervisor

    def on_all_dead() -> None:
        all_dead.set()
        stop.set()

    def on_sigterm(*_) -> None:
        stop.set()
        if not serving:
            raise KeyboardInterrupt  # still starting: stop the workers now, not after loading

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    previous_int = signal.getsignal(signal.SIGINT)
    engine = None
    try:
        console.print(f"starting {', '.join(config.roles())} workers for "
                      f"{escape(args.model)} ...")
        server.start()  # no engine yet: /health and the rest answer 503 "starting" meanwhile
        try:
            engine = Engine(config, progress=lambda line: console.print(f"  {escape(line)}"),
                            on_all_dead=on_all_dead)
        except FileNotFoundError as exc:  # a missing GGUF, or a model whose tokenizer won't load
            return error(exc)
        except (RuntimeError, TimeoutError, OSError) as exc:  # a worker failed to start
            return error(exc, code=1)
        server.engine = engine
        # colocated workers only: no KV crosses between workers, so there is no KV format
        kv = ("" if all(r == "colocated" for r in config.roles())
              else f" (KV {args.kv_bits}-bit)")
        console.print(f"serving {escape(args.model)} at {server.url}/v1{kv}; "
                      "GET /health /metrics /admin/workers, POST /admin/reschedule; Ctrl-C stops")
        serving = True
        stop.wait()
    except KeyboardInterrupt:
        if not serving:  # Engine() stopped the workers it had started
            console.print("interrupted while starting; stopped")
            return 130
    finally:
        # A second Ctrl-C or SIGTERM (an impatient operator, a supervisor that repeats it)
        # must not cut the shutdown short: the clients' 503s, stopping the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if serving:
                console.print("stopping ...")
            server.close()
            if engine is not None:
                engine.close()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)
    if all_dead.is_set():
        return error("every worker died, so nothing could serve any more: stopped (a "
                     "supervisor can restart the server)", code=1)
    return 0


def _configure_logging() -> None:
    """The router's log lines (worker deaths, refused peers, ...) with time and level, at
    ``$THUNDERKV_LOG`` (default WARNING; the workers read the same variable)."""
    import logging
    import os

    logging.basicConfig(level=os.environ.get("THUNDERKV_LOG", "WARNING").upper(),
                        format="%(asctime)s [router] %(levelname)s %(message)s")
