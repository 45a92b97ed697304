"""``thunderkv bench <what>``: microbenchmarks (``quant``, ``paged``; more come later)."""

from __future__ import annotations

import argparse
import json
import os


def _count(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def sink_tokens(text: str) -> int:
    """argparse type of the sink-token flags: an integer in 0..MAX_SINK_TOKENS (255, one byte
    in the wire header); one short message when out of range, not 256 listed choices."""
    from ..format import MAX_SINK_TOKENS  # imports torch: only when such a flag is given

    value = _count(0)(text)
    if value > MAX_SINK_TOKENS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_SINK_TOKENS}, got {value}")
    return value


def output_path_problem(path: str | None) -> str | None:
    """Why JSON lines cannot be appended to ``path`` (None when they can, or no path): checked
    before a run, so that a long run does not fail only at its end."""
    if not path:
        return None
    if os.path.isdir(path):
        return "is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"no directory {parent}"
    target = path if os.path.exists(path) else parent
    if not os.access(target, os.W_OK):
        return f"{target} is not writable"
    return None


def outputs_problem(args: argparse.Namespace) -> str | None:
    """One line naming the first of ``--json`` / ``--plot`` (those this command has) that
    cannot be written (:func:`output_path_problem`), or None."""
    for key in ("json", "plot"):
        path = getattr(args, key, None)
        why = output_path_problem(path)
        if why is not None:
            return f"--{key} {path}: {why}"
    return None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="shape preset: default, quick, large")
    p.add_argument("--quick", action="store_true", help="same as --preset quick (seconds)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--backend", action="append", dest="backends",
                   help="backend to time (repeatable); default: every usable one")
    p.add_argument("--threads", type=_count(1), default=None,
                   help="CPU threads (torch.set_num_threads)")
    p.add_argument("--reps", type=_count(1), default=10, help="timed calls per measurement")
    p.add_argument("--json", metavar="PATH", help="append one JSON line per measurement")
    p.add_argument("--plot", metavar="PNG", help="bytes/s of every op and backend as a fraction "
                   "of the same run's copy, per shape, with the issue's target (needs matplotlib)")
    p.add_argument("--no-graph", dest="graph", action="store_false",
                   help="CUDA: skip the CUDA-graph replay timing (the kernels' own speed, "
                        "without per-call Python and host syncs) next to the eager one")


def _request_rate(text: str) -> float:
    """``--rate`` of ``bench e2e``: requests per second, with a pointer for link rates."""
    try:
        value = float(text)
    except ValueError:
        hint = (" (a link rate? use --link-rate for the shaped link)"
                if text.lower().rstrip("ps").endswith(("bit", "bps")) else "")
        raise argparse.ArgumentTypeError(f"not a request rate: {text!r}{hint}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0, got {text!r}")
    return value


def _link_rate(text: str) -> str:
    """``--link-rate`` of ``bench e2e``: a tc-style rate (checked here, passed on as given)."""
    from ..transfer.netshape import parse_rate

    try:
        parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def register(subparsers) -> None:
    p = subparsers.add_parser("bench",
                              help="benchmarks (quant, paged, attention, transfer, e2e)")
    sub = p.add_subparsers(dest="bench", metavar="WHAT")
    sub.required = True

    q = sub.add_parser(
        "quant",
        help="quantize/dequantize throughput per backend vs a plain copy",
        description="Times format v1 quantize and dequantize on realistic per-layer KV shapes "
        "for every usable backend, next to a plain copy of the same tensor in the same run.",
    )
    _common(q)
    q.add_argument("--axis", type=int, default=-1, choices=[-1, -2])
    q.add_argument("--reference-reps", type=_count(1), default=3,
                   help="timed calls for the reference")
    q.set_defaults(func=run_quant)

    at = sub.add_parser(
        "attention",
        help="decode attention over a 4-bit KIVI cache: fused vs SDPA (fp) vs dequantize+SDPA",
        description="Times one decode step's attention for one layer at each context length: "
        "the fused kernel over the packed cache (C++ on CPU, Triton on a GPU), torch SDPA over "
        "full-precision K/V, and "
        "dequantize-then-SDPA, in the same run.")
    at.add_argument("--geometry", default="smollm2-135m",
                    help="smollm2-135m (3 KV heads x 3, D=64), llama-7b, llama3-8b")
    at.add_argument("--context", type=_count(1), action="append", dest="contexts",
                    help="cached tokens (repeatable; default 1024, 4096, 16384)")
    at.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    at.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    at.add_argument("--group-size", type=_count(1), default=64)
    at.add_argument("--residual", type=_count(0), default=128,
                    help="full-precision newest tokens")
    at.add_argument("--batch", type=_count(1), default=1)
    at.add_argument("--reps", type=_count(1), default=50)
    at.add_argument("--device", default="cpu",
                    help="cpu (the C++ kernel) or cuda[:N] (the Triton kernel); default cpu")
    at.add_argument("--json", metavar="PATH", help="append one JSON line per measurement")
    at.add_argument("--plot", metavar="PNG",
                    help="time per step against context for each method (needs matplotlib)")
    at.set_defaults(func=run_attention)

    pg = sub.add_parser(
        "paged",
        help="paged-cache write / gather / transfer packing vs a plain copy",
        description="Times quantize_to_paged, gather_dequantize and pack_for_transfer on a "
        "paged compressed cache, next to a plain copy of the dense K/V in the same run.",
    )
    _common(pg)
    pg.set_defaults(func=run_paged)

    tr = sub.add_parser(
        "transfer",
        help="KV transfer over UCX: raw 16-bit vs 4-bit, vs ucx_perftest",
        description="Sends realistic per-request KV (model presets x prompt tokens) raw and "
        "4-bit with thunderkv.transfer and reports seconds, effective KV throughput and the "
        "4-bit speed-up. Without --role, spawns a server and a client here (optionally across "
        "a rate-limited veth link, --rate) and measures ucx_perftest on loopback alongside.",
    )
    tr.add_argument("--role", choices=["server", "client"],
                    help="run one side only (two machines); default: both here")
    tr.add_argument("--host", default="127.0.0.1", help="server address (bind / connect)")
    tr.add_argument("--port", type=int, default=13337, help="server side-channel port")
    tr.add_argument("--preset", default="default", help="cases preset: quick, default")
    tr.add_argument("--quick", action="store_true", help="same as --preset quick (< 40 s)")
    tr.add_argument("--model", action="append", dest="models",
                    help="model preset (llama-7b/13b/30b/70b, smollm2-135m, or a model .yaml)")
    tr.add_argument("--tokens", action="append", type=int, help="prompt tokens per request")
    tr.add_argument("--case", action="append", dest="cases", metavar="MODEL:TOKENS",
                    help="one request's KV (repeatable), e.g. llama-7b:1024")
    tr.add_argument("--bits", action="append", type=int, choices=[2, 4, 8, 16],
                    help="bits on the wire (repeatable; default 16 and 4)")
    tr.add_argument("--group-size", type=int, default=64)
    tr.add_argument("--reps", type=int, default=3, help="timed sends per case (after a warm-up)")
    tr.add_argument("--inflight", type=int, default=1,
                    help="requests in flight at once (one connection each; --reps sends each): "
                    "adds aggregate throughput and its ratio to perftest")
    tr.add_argument("--timeout", type=float, default=5.0, help="seconds without progress (> 0)")
    tr.add_argument("--rate", help="shape the link, e.g. 100mbit or 1gbit (needs netns + tc); "
                    "where shaping is unavailable the run fails with exit code 3")
    tr.add_argument("--allow-skip", action="store_true",
                    help="with --rate: where shaping is unavailable, skip (exit 0, no --json) "
                    "instead of failing with exit code 3")
    tr.add_argument("--pool-bytes", type=int, default=1 << 30,
                    help="--role server: receive pool size (bytes)")
    tr.add_argument("--device", default="cpu",
                    help="where both sides' pools live: cpu, or cuda[:N] (GPU memory: UCX's CUDA "
                    "transports; perftest then uses GPU buffers too)")
    tr.add_argument("--no-perftest", action="store_true", help="skip the ucx_perftest baseline")
    tr.add_argument("--perftest-runs", type=int, default=3,
                    help="ucx_perftest runs per message size; ratios use their median (default 3)")
    tr.add_argument("--json", metavar="PATH", help="append one JSON line per measurement")
    tr.add_argument("--plot", metavar="PNG",
                    help="write a PNG: effective KV GB/s raw vs 4-bit, raw path vs perftest "
                    "(needs matplotlib)")
    tr.add_argument("--rows-out", help=argparse.SUPPRESS)
    tr.add_argument("--interleave-perftest", action="store_true", help=argparse.SUPPRESS)
    tr.set_defaults(func=run_transfer)

    e2e = sub.add_parser(
        "e2e",
        help="serve a workload colocated vs disaggregated 16-bit vs 4-bit (real model)",
        description="Replays a workload (Azure conversation trace lengths scaled to this "
        "machine, Poisson arrivals) through the serving engine in each mode and reports "
        "TTFT/TPOT p50/p90, tokens/s, KV bytes moved and agreement with colocated 16-bit.",
    )
    e2e.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a local "
                     "HF model directory")
    e2e.add_argument("--preset", default="default", help="quick or default")
    e2e.add_argument("--quick", action="store_true", help="same as --preset quick (< 3 min)")
    e2e.add_argument("--mode", action="append", dest="modes",
                     choices=["colocated", "disagg-16", "disagg-4"],
                     help="modes to run (repeatable; default all three)")
    e2e.add_argument("--rate", type=_request_rate,
                     help="request rate (req/s; default: the preset's); a link rate such as "
                     "100mbit goes to --link-rate")
    e2e.add_argument("--threads", type=_count(0), default=1,
                     help="torch threads per worker (0: torch's default)")
    e2e.add_argument("--seed", type=int, default=0)
    e2e.add_argument("--kv-group-size", type=int, default=32, choices=[16, 32, 64],
                     help="format v1 group size of 4-bit KV messages")
    e2e.add_argument("--kv-sink-tokens", type=sink_tokens, default=0, metavar="N",
                     help="first tokens of a 4-bit KV message sent exact (attention sink)")
    e2e.add_argument("--link-rate", type=_link_rate,
                     help="put decode workers across a veth link shaped to this "
                     "rate (e.g. 30mbit; needs netns + tc; where shaping is unavailable the run "
                     "fails with exit code 3); default: loopback")
    e2e.add_argument("--allow-skip", action="store_true",
                     help="with --link-rate: where shaping is unavailable, skip (exit 0, no "
                     "--json) instead of failing with exit code 3")
    e2e.add_argument("--json", metavar="PATH", help="append one JSON line per mode")
    e2e.add_argument("--plot", metavar="PNG", help="write a TTFT/TPOT/KV bytes plot")
    e2e.set_defaults(func=run_e2e)


def _setup(args: argparse.Namespace, presets: dict):
    import torch
    from rich.console import Console

    console = Console()
    preset = "quick" if args.quick else args.preset
    if preset not in presets:
        console.print(f"[red]unknown preset {preset!r}; choose from {sorted(presets)}")
        return console, None, None
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        why = _device_problem(args.device, "the kernels run")
        if why is not None:
            console.print(f"[red]--device {args.device}: {why}")
            return console, None, None
        device = torch.device(args.device)
    why = outputs_problem(args)
    if why is not None:
        _error(console, why)
        return console, None, None
    from ..bench.common import backend_problem

    for name in args.backends or []:  # before any timing, not after the first backend's
        why = backend_problem(name, device)
        if why is not None:
            _error(console, f"--backend {name}: {why}")
            return console, None, None
    if args.threads:
        torch.set_num_threads(args.threads)
    return console, presets[preset], device


def _measure(console, run_fn):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not console.is_terminal:  # piped: a spinner only leaves a blank line behind
        return run_fn(lambda msg: None)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        return run_fn(lambda msg: bar.update(task, description=msg))


def _save(console, args, rows: list[dict], plot=None) -> None:
    """``--json``: append one line per row; ``--plot``: ``plot(rows, path)`` (a one-line hint
    instead where matplotlib is missing)."""
    from ..bench.timing import write_json_lines

    if args.json:
        write_json_lines(args.json, rows)
        console.print(f"wrote {len(rows)} JSON lines to {args.json}")
    if plot is not None and args.plot:
        try:
            plot(rows, args.plot)
            console.print(f"wrote {args.plot}")
        except ImportError:
            console.print("[yellow]no plot: pip install matplotlib")


def _reps_note(rows: list[dict]) -> str:
    """How each row's p50 was taken: "p50 of 10 calls after a warm-up call", with the
    reference's own count where it differs (``--reference-reps``)."""
    reps = {r["reps"] for r in rows if r["backend"] != "reference"}
    ref = {r["reps"] for r in rows if r["backend"] == "reference"} - reps
    counts = "/".join(str(n) for n in sorted(reps))
    if ref:
        counts += f" ({'/'.join(str(n) for n in sorted(ref))} for the reference)"
    return f"p50 of {counts} timed calls after a warm-up call"


def _report(console, args, rows, what: str, target: float) -> int:
    """Print the table and write --json / --plot; 1 when a backend's output did not match the
    reference (its timing is of a wrong result), else 0."""
    from ..bench.common import plot_vs_copy, print_table, reference_mismatches, render_table

    title = (f"{what}: format v1 {args.bits}-bit G={args.group_size} {args.dtype} on "
             f"{rows[0]['device']} ({rows[0]['threads']} threads); GB/s = bytes read + written; "
             f"{_reps_note(rows)}")
    print_table(console, render_table(rows, title))
    _save(console, args, rows, lambda rows, path: plot_vs_copy(
        rows, path, f"{what}, {args.bits}-bit G={args.group_size} {args.dtype}, "
        f"{rows[0]['device']}", target))
    bad = reference_mismatches(rows)
    for where in bad:
        _error(console, f"{where}: output differs from the reference (timed anyway)")
    return 1 if bad else 0


def run_quant(args: argparse.Namespace) -> int:
    import torch

    from ..bench import quant

    console, shapes, device = _setup(args, quant.PRESETS)
    if shapes is None:
        return 2
    try:
        rows = _measure(console, lambda progress: quant.run(
            shapes, device=device, dtype=getattr(torch, args.dtype), bits=args.bits,
            group_size=args.group_size, axis=args.axis, backend_names=args.backends,
            reps=args.reps, reference_reps=args.reference_reps, progress=progress,
            graph=args.graph))
    except ValueError as exc:  # bad settings for these shapes (e.g. a group size)
        console.print(f"[red]error:[/red] {exc}")
        return 2
    # the target: >= 85 % of the copy rate on the GPU
    return _report(console, args, rows, f"quantize/dequantize axis={args.axis}", 0.85)


def run_paged(args: argparse.Namespace) -> int:
    import torch

    from ..bench import paged

    console, cases, device = _setup(args, paged.PRESETS)
    if cases is None:
        return 2
    try:
        rows = _measure(console, lambda progress: paged.run(
            cases, device=device, dtype=getattr(torch, args.dtype), bits=args.bits,
            group_size=args.group_size, backend_names=args.backends, reps=args.reps,
            progress=progress, graph=args.graph))
    except ValueError as exc:  # bad settings for these shapes (e.g. a group size)
        console.print(f"[red]error:[/red] {exc}")
        return 2
    return _report(console, args, rows, "paged cache", 0.80)  # target: >= 80 % of copy


def run_attention(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..attention import fused_attention_available
    from ..bench import attention

    console = Console()
    why = _device_problem(args.device, "the kernels run")
    if why is not None:
        _error(console, f"--device {args.device}: {why}")
        return 2
    device = torch.device(args.device)
    ok, why = fused_attention_available(device)
    if not ok:
        console.print(f"[red]{why}")
        return 2
    why = outputs_problem(args)
    if why is not None:
        _error(console, why)
        return 2
    try:
        rows = _measure(console, lambda progress: attention.run(
            args.geometry, args.contexts or [1024, 4096, 16384], dtype=getattr(torch, args.dtype),
            bits=args.bits, group_size=args.group_size, residual=args.residual,
            batch=args.batch, reps=args.reps, progress=progress, device=str(device)))
    except ValueError as exc:
        console.print(f"[red]{exc}")
        return 2
    t = Table(title=f"decode attention, one layer of {args.geometry}, batch {args.batch}, "
                    f"{args.dtype}, {args.bits}-bit G={args.group_size}, "
                    f"{rows[0]['threads']} threads; x = SDPA-fp time / method time")
    for col in ("context", "method", "p50 us", "p20-p80 us", "x sdpa-fp"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        t.add_row(str(r["context"]), r["method"], f"{r['us_p50']:.0f}",
                  f"{r['us_p20']:.0f}-{r['us_p80']:.0f}", f"{r['speedup_vs_sdpa_fp']:.2f}")
    console.print(t)
    _save(console, args, rows, attention.plot)
    return 0


# Exit codes of `bench transfer` besides 0 (done) and 1 (a side failed while running):
EXIT_USAGE = 2  # bad arguments, or a peer that cannot be reached / refuses us
EXIT_SKIPPED = 3  # --rate / --link-rate where link shaping is unavailable (no --allow-skip)
EXIT_INTERRUPTED = 130  # Ctrl-C


def _error(console, message: str) -> None:
    """One red line: ``message`` as plain text (no markup: it may quote brackets), unwrapped."""
    from rich.text import Text

    console.print(Text(message, style="red"), soft_wrap=True)


def _shaping_unavailable(console, flag: str, value: str, why: str, allow_skip: bool) -> int:
    """A shaped-link run where namespaces or ``tc`` are missing: one red line and
    :data:`EXIT_SKIPPED`, or with ``--allow-skip`` (asked for) a yellow line and success,
    writing no ``--json``."""
    if allow_skip:
        from rich.markup import escape

        console.print(f"[yellow]skipping {flag} {value} (--allow-skip): {escape(why)}",
                      soft_wrap=True)
        return 0
    _error(console, f"{flag} {value}: link shaping unavailable here: {why} "
           "(--allow-skip skips instead of failing)")
    return EXIT_SKIPPED


def run_transfer(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        return _run_transfer(console, args)
    except KeyboardInterrupt:  # the children (own process groups) are stopped by now
        _error(console, "interrupted")
        return EXIT_INTERRUPTED


def _transfer_problem(args: argparse.Namespace, transfer) -> str | None:
    """Why these ``bench transfer`` arguments cannot run (one line naming the flag), or None;
    resolves ``args.case_list``, ``args.bit_list`` and ``args.rate_bps``. Starts nothing."""
    import math

    args.case_list, args.bit_list, args.rate_bps = [], args.bits or [16, 4], None
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        return f"--timeout must be > 0 seconds, got {args.timeout:g}"
    if not 0 <= args.port <= 65535:
        return f"--port must be in 0..65535, got {args.port}"
    if args.allow_skip and args.rate is None:
        return "--allow-skip applies to --rate (a shaped link that may be unavailable)"
    why = outputs_problem(args)
    if why is not None:
        return why
    if args.rate is not None:
        if args.role:
            return ("--rate shapes the link between the two sides this command starts; it "
                    "does not apply with --role")
        from ..transfer.netshape import parse_rate

        try:
            args.rate_bps = parse_rate(args.rate)
        except ValueError as exc:
            return f"--rate: {exc}"
    if args.role == "server":
        if args.pool_bytes < 1:
            return f"--pool-bytes must be >= 1, got {args.pool_bytes}"
        return None
    if args.perftest_runs < 1:
        return "--perftest-runs must be >= 1 (or use --no-perftest)"
    if args.inflight < 1 or args.reps < 1:
        return "--inflight and --reps must be >= 1"
    preset = "quick" if args.quick else args.preset
    if preset not in transfer.PRESETS:
        return f"unknown preset {preset!r}; choose from {sorted(transfer.PRESETS)}"
    args.preset = preset
    # (flag and value to blame, model, tokens) per case
    cases = [(None, m, t) for m, t in transfer.PRESETS[preset]]
    if args.cases:
        cases = []
        for text in args.cases:
            try:
                model, tokens = transfer.parse_case(text)
            except ValueError as exc:
                return f"--case {text}: {exc}"
            cases.append((f"--case {text}", model, tokens))
    elif args.models or args.tokens:
        models = args.models or sorted({m for _, m, _ in cases})
        tokens = args.tokens or sorted({t for _, _, t in cases})
        for t in tokens:
            why = transfer.tokens_problem(t)
            if why is not None:
                return f"--tokens {t}: {why}"
        cases = [(f"--model {m}" if args.models else None, m, t) for m in models for t in tokens]
    geos = []
    for flag, model, tokens in cases:
        try:
            geos.append(transfer.geometry(model))
        except ValueError as exc:  # an unknown name, or a bad model .yaml (InputError)
            return f"{flag or '--model'}: {exc}"
        why = transfer.tokens_problem(tokens, geos[-1])
        if why is not None:
            return f"{flag or f'case {model}:{tokens}'}: {why}"
    why = transfer.group_size_problem(args.group_size, args.bit_list, geos)
    if why is not None:
        return f"--group-size {args.group_size}: {why}"
    args.case_list = [(m, t) for _, m, t in cases]
    return None


def _transfer_failed(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for what a side of `bench transfer` raised: a peer that
    cannot be reached or refuses us is a usage error (2), a failure while sending is not (1)."""
    from ..transfer import AuthenticationError, ConnectionClosed, TransferError, TransferTimeout

    if isinstance(exc, AuthenticationError):
        return (f"{exc} (both sides need the same $THUNDERKV_TRANSFER_TOKEN)", EXIT_USAGE)
    if isinstance(exc, TransferError):
        hint = ""
        if isinstance(exc.__cause__, ConnectionRefusedError):
            hint = " (is `thunderkv bench transfer --role server` running there?)"
        # connecting failed (refused, no such host), not a drop or a stall mid-transfer
        unreachable = (isinstance(exc.__cause__, OSError)
                       and not isinstance(exc, (ConnectionClosed, TransferTimeout)))
        return f"transfer failed: {exc}{hint}", EXIT_USAGE if unreachable else 1
    return f"{exc}", EXIT_USAGE


def _run_transfer(console, args: argparse.Namespace) -> int:

    from ..bench import transfer
    from ..transfer import TransferError, auth, unavailable_reason

    why = _transfer_problem(args, transfer)
    if why is not None:
        _error(console, why)
        return EXIT_USAGE
    why = _device_problem(args.device)
    if why is not None:
        _error(console, f"--device {args.device}: {why}")
        return EXIT_USAGE
    cases, bits, rate = args.case_list, args.bit_list, args.rate_bps
    why = transfer.memory_problem(cases, args.inflight, args.device,
                                  server=args.role != "client", client=args.role != "server",
                                  pool_bytes=args.pool_bytes if args.role == "server" else None)
    if why is not None:
        _error(console, why)
        return EXIT_USAGE
    if args.role:  # one side: it needs the token both sides share
        try:
            auth.load_token()
        except (ValueError, OSError) as exc:
            _error(console, str(exc))
            return EXIT_USAGE
    why = unavailable_reason()
    if why is not None:
        _error(console, f"UCX transfer unavailable here: {why}")
        return EXIT_USAGE
    if args.role == "server":
        try:
            return transfer.serve(args.host, args.port, args.pool_bytes, args.timeout,
                                  device=args.device)
        except OSError as exc:  # e.g. the port is in use, or not an address of this host
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            _error(console, f"cannot listen on {args.host}:{args.port}: {why}")
            return EXIT_USAGE
        except TransferError as exc:
            _error(console, _transfer_failed(exc)[0])
            return 1
    if args.role == "client":
        try:
            rows = _measure(console, lambda progress: transfer.run_client(
                args.host, args.port, cases, bits=bits, group_size=args.group_size,
                reps=args.reps, timeout=args.timeout, device=args.device,
                inflight=args.inflight,
                perftest_runs=args.perftest_runs if args.interleave_perftest else 0,
                progress=progress))
        except (TransferError, OSError) as exc:
            message, code = _transfer_failed(exc)
            _error(console, message)
            return code
        if args.rows_out:
            with open(args.rows_out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            return 0
        return _report_transfer(console, args, rows, rate=None)
    if rate is not None:
        from ..transfer.netshape import shaping_unavailable_reason

        why = shaping_unavailable_reason()
        if why is not None:
            return _shaping_unavailable(console, "--rate", args.rate, why, args.allow_skip)
    client_args = ["--preset", args.preset, "--group-size", str(args.group_size), "--reps",
                   str(args.reps), "--timeout", str(args.timeout), "--inflight", str(args.inflight)]
    client_args += sum((["--case", f"{m}:{t}"] for m, t in cases), [])
    client_args += sum((["--bits", str(b)] for b in bits), [])
    if rate is None and not args.no_perftest:  # the baseline between the client's send blocks
        client_args += ["--interleave-perftest", "--perftest-runs", str(args.perftest_runs)]
    rows_path = transfer.temp_rows_path()
    try:
        transfer.run_pair(client_args, pool_bytes=transfer.pool_bytes_for(cases, args.inflight),
                          timeout=args.timeout, rate_bps=rate, rows_path=rows_path,
                          device=args.device)
        rows = transfer.load_rows(rows_path)
    except transfer.PeerFailed as exc:
        _error(console, str(exc))
        return exc.exit_code
    finally:
        rows_path.unlink(missing_ok=True)
    if rate is None and not args.no_perftest:  # rows whose client could not interleave it
        memory, gpu = transfer.perftest_memory(args.device)
        _measure(console, lambda progress: transfer.add_perftest(rows, progress,
                                                                 args.perftest_runs, memory, gpu))
    return _report_transfer(console, args, rows, rate=rate)


def _device_problem(device: str, what: str = "pools live") -> str | None:
    """Why ``device`` cannot be used here (None when it can): cpu, or a CUDA device torch
    sees; ``what`` names the use in the message."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"{what} on cpu or cuda"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device here"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def _spread(runs: list[float] | None) -> str:
    """' (lo-hi)' of several perftest runs' GB/s; empty for one run or none."""
    if not runs or len(runs) < 2:
        return ""
    return f" ({min(runs) / 1e9:.1f}-{max(runs) / 1e9:.1f})"


def _report_transfer(console, args, rows: list[dict], rate: int | None) -> int:
    from rich.table import Table

    from ..bench import transfer
    from ..bench.timing import provenance

    transfer.add_speedups(rows)
    console.width = max(console.width, 175)  # a wide table; pipes get 80 columns otherwise
    import torch

    from ..bench.common import device_label

    link = f"veth shaped to {rate / 1e6:g} Mbit/s (UCX over tcp)" if rate else "loopback"
    base = provenance(device_label(torch.device(args.device)))
    for r in rows:
        r.update(base, link=link, rate_bps=rate, pool_device=args.device)
    where = "" if args.device == "cpu" else f", pools on {args.device} ({base['device']})"
    many = args.inflight > 1
    flight = f"{args.inflight} requests in flight" if many else "one request per message"
    interleaved = any(r.get("perftest_interleaved") for r in rows)
    caption = None  # only where perftest ran (not with --no-perftest or --rate)
    if any(r.get("perftest_runs_bytes_per_s") for r in rows):
        caption = "perftest: median (range) of its runs" + (
            ", each run just before a block of the sends" if interleaved else "")
    elif any(r.get("perftest_error") for r in rows):
        caption = "perftest failed: " + next(r["perftest_error"] for r in rows
                                             if r.get("perftest_error"))
    t = Table(title=f"KV transfer, {flight} ({link}{where}); GB = 1e9 bytes; "
              "effective = uncompressed 16-bit KV bytes / second", caption=caption)
    cols = ["model", "tokens", "bits", "wire MB", "p50 ms", "wire GB/s", "put GB/s",
            "effective KV GB/s", "vs raw", "transport", "perftest GB/s", "put/perftest",
            "e2e/perftest"] + (["all GB/s", "all/perftest"] if many else [])
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "transport") else "right")

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        t.add_row(r["model"], str(r["tokens"]), str(r["bits"]), f(r["payload_bytes"] / 1e6, ".2f"),
                  f(r["seconds_p50"] * 1e3, ".1f"), f(r["wire_bytes_per_s"] / 1e9, ".3f"),
                  f(r["put_bytes_per_s"] and r["put_bytes_per_s"] / 1e9, ".2f"),
                  f(r["effective_kv_bytes_per_s"] / 1e9, ".3f"),
                  f(r.get("speedup_vs_raw"), ".2f") + "x", r["transport"],
                  f(r.get("perftest_put_bytes_per_s") and r["perftest_put_bytes_per_s"] / 1e9,
                    ".2f") + _spread(r.get("perftest_runs_bytes_per_s")),
                  f(r.get("put_vs_perftest"), ".2f"), f(r.get("e2e_vs_perftest"), ".2f"),
                  *([f(r["throughput_bytes_per_s"] / 1e9, ".3f"),
                     f(r.get("throughput_vs_perftest"), ".2f")] if many else []))
    console.print(t)
    _save(console, args, rows, transfer.plot)
    return 0


def run_e2e(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..bench.timing import provenance
    from ..serve import bench_e2e

    console = Console()
    if args.allow_skip and not args.link_rate:
        _error(console, "--allow-skip applies to --link-rate (a shaped link that may be "
               "unavailable)")
        return EXIT_USAGE
    why = outputs_problem(args)
    if why is not None:
        _error(console, why)
        return EXIT_USAGE
    from ..serve.tokenizer import check_model

    try:  # cheap: nothing loads; a missing model is one line, not a traceback from a worker
        check_model(args.model)
    except FileNotFoundError as exc:
        _error(console, f"--model {args.model}: {exc}")
        return EXIT_USAGE
    if args.link_rate and bench_e2e.link_from_env() is None:
        return _e2e_across_link(console, args)
    preset_name = "quick" if args.quick else args.preset
    if preset_name not in bench_e2e.PRESETS:
        console.print(f"[red]unknown preset {preset_name!r}; choose from "
                      f"{sorted(bench_e2e.PRESETS)}")
        return 2
    modes = args.modes or list(bench_e2e.MODES)
    rows, jobs = _measure(console, lambda progress: bench_e2e.run(
        args.model, bench_e2e.PRESETS[preset_name], modes, seed=args.seed,
        threads=args.threads, rate=args.rate, progress=progress,
        kv_group_size=args.kv_group_size, kv_sink_tokens=args.kv_sink_tokens))
    base = provenance("cpu")
    for r in rows:
        r.update(base)
    console.width = max(console.width, 150)
    link = rows[0]["link"]
    t = Table(title=f"{args.model}: {len(jobs)} requests (prompts {min(len(j.prompt) for j in jobs)}"
              f"-{max(len(j.prompt) for j in jobs)} tokens, outputs up to "
              f"{max(j.max_tokens for j in jobs)}), {rows[0]['rate_req_s']:g} req/s, {link}")
    cols = ["mode", "TTFT p50", "TTFT p90", "TPOT p50", "TPOT p90", "tok/s", "batch", "KV MB",
            "identical", "top-1", "failed"]
    for c in cols:
        t.add_column(c, justify="left" if c == "mode" else "right")

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        t.add_row(r["mode"], f(r["ttft_p50_s"], ".3f"), f(r["ttft_p90_s"], ".3f"),
                  f(r["tpot_p50_s"], ".3f"), f(r["tpot_p90_s"], ".3f"),
                  f(r["tokens_per_s"], ".1f"), f(r.get("decode_batch_mean"), ".1f"),
                  f(r["kv_bytes_moved"] / 1e6, ".1f"),
                  f(r.get("identical_outputs"), ".2f"), f(r.get("teacher_forced_top1"), ".3f"),
                  str(r["failed"]))
    console.print(t)
    _save(console, args, rows, bench_e2e.plot)
    return 1 if any(r["failed"] for r in rows) else 0


def _e2e_across_link(console, args: argparse.Namespace) -> int:
    """Re-run this benchmark inside the server side of a shaped veth link."""
    import os
    import subprocess

    from .._spawn import module_argv
    from ..serve.netplace import ENV, LinkInfo
    from ..transfer.netshape import (
        ShapedLink,
        parse_rate,
        shaping_unavailable_reason,
        sigterm_unwinds,
    )

    rate = parse_rate(args.link_rate)
    why = shaping_unavailable_reason()
    if why is not None:
        return _shaping_unavailable(console, "--link-rate", args.link_rate, why, args.allow_skip)
    argv = module_argv("thunderkv.cli") + ["bench", "e2e", "--model", args.model,
            "--preset", "quick" if args.quick else args.preset, "--threads", str(args.threads),
            "--seed", str(args.seed), "--link-rate", args.link_rate,
            "--kv-group-size", str(args.kv_group_size),
            "--kv-sink-tokens", str(args.kv_sink_tokens)]
    for m in args.modes or []:
        argv += ["--mode", m]
    for flag, value in (("--rate", args.rate), ("--json", args.json), ("--plot", args.plot)):
        if value is not None:
            argv += [flag, str(value)]
    with sigterm_unwinds(), ShapedLink(rate, control_link=True) as link:
        env = {**os.environ, ENV: LinkInfo.from_link(link).to_env()}
        return subprocess.run(link.command("server", argv), env=env).returncode
