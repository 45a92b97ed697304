"""``thunderkv bench <what>``: microbenchmarks (``quant`` now; transfer and e2e come later)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="microbenchmarks (quant, ...)")
    sub = p.add_subparsers(dest="bench", metavar="WHAT")
    sub.required = True

    q = sub.add_parser(
        "quant",
        help="quantize/dequantize throughput per backend vs a plain copy",
        description="Times format v1 quantize and dequantize on realistic per-layer KV shapes "
        "for every usable backend, next to a plain copy of the same tensor in the same run.",
    )
    q.add_argument("--preset", default="default", help="shape preset: default, quick, large")
    q.add_argument("--quick", action="store_true", help="same as --preset quick (seconds)")
    q.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    q.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    q.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--axis", type=int, default=-1, choices=[-1, -2])
    q.add_argument("--backend", action="append", dest="backends",
                   help="backend to time (repeatable); default: every usable one")
    q.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    q.add_argument("--reps", type=int, default=10, help="timed calls per measurement")
    q.add_argument("--reference-reps", type=int, default=3, help="timed calls for the reference")
    q.add_argument("--json", metavar="PATH", help="append one JSON line per measurement")
    q.set_defaults(func=run_quant)


def run_quant(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..bench import quant
    from ..bench.timing import write_json_lines

    console = Console()
    preset = "quick" if args.quick else args.preset
    if preset not in quant.PRESETS:
        console.print(f"[red]unknown preset {preset!r}; choose from {sorted(quant.PRESETS)}")
        return 2
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        rows = quant.run(
            quant.PRESETS[preset], device=device, dtype=getattr(torch, args.dtype),
            bits=args.bits, group_size=args.group_size, axis=args.axis,
            backend_names=args.backends, reps=args.reps, reference_reps=args.reference_reps,
            progress=lambda msg: bar.update(task, description=msg),
        )
    title = (f"format v1 {args.bits}-bit G={args.group_size} axis={args.axis} {args.dtype} on "
             f"{rows[0]['device']} ({rows[0]['threads']} threads) - GB/s counts bytes read + written")
    console.print(quant.render_table(rows, title))
    if args.json:
        write_json_lines(args.json, rows)
        console.print(f"wrote {len(rows)} JSON lines to {args.json}")
    return 0
