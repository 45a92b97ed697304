"""``thunderkv bench <what>``: microbenchmarks (``quant``, ``paged``; more come later)."""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="shape preset: default, quick, large")
    p.add_argument("--quick", action="store_true", help="same as --preset quick (seconds)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--backend", action="append", dest="backends",
                   help="backend to time (repeatable); default: every usable one")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per measurement")
    p.add_argument("--json", metavar="PATH", help="append one JSON line per measurement")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="microbenchmarks (quant, paged)")
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
    q.add_argument("--reference-reps", type=int, default=3, help="timed calls for the reference")
    q.set_defaults(func=run_quant)

    pg = sub.add_parser(
        "paged",
        help="paged-cache write / gather / transfer packing vs a plain copy",
        description="Times quantize_to_paged, gather_dequantize and pack_for_transfer on a "
        "paged compressed cache, next to a plain copy of the dense K/V in the same run.",
    )
    _common(pg)
    pg.set_defaults(func=run_paged)


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
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return console, presets[preset], device


def _measure(console, run_fn):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        return run_fn(lambda msg: bar.update(task, description=msg))


def _report(console, args, rows, what: str) -> int:
    from ..bench.common import render_table
    from ..bench.timing import write_json_lines

    title = (f"{what}: format v1 {args.bits}-bit G={args.group_size} {args.dtype} on "
             f"{rows[0]['device']} ({rows[0]['threads']} threads); GB/s = bytes read + written")
    console.print(render_table(rows, title))
    if args.json:
        write_json_lines(args.json, rows)
        console.print(f"wrote {len(rows)} JSON lines to {args.json}")
    return 0


def run_quant(args: argparse.Namespace) -> int:
    import torch

    from ..bench import quant

    console, shapes, device = _setup(args, quant.PRESETS)
    if shapes is None:
        return 2
    rows = _measure(console, lambda progress: quant.run(
        shapes, device=device, dtype=getattr(torch, args.dtype), bits=args.bits,
        group_size=args.group_size, axis=args.axis, backend_names=args.backends,
        reps=args.reps, reference_reps=args.reference_reps, progress=progress))
    return _report(console, args, rows, f"quantize/dequantize axis={args.axis}")


def run_paged(args: argparse.Namespace) -> int:
    import torch

    from ..bench import paged

    console, cases, device = _setup(args, paged.PRESETS)
    if cases is None:
        return 2
    rows = _measure(console, lambda progress: paged.run(
        cases, device=device, dtype=getattr(torch, args.dtype), bits=args.bits,
        group_size=args.group_size, backend_names=args.backends, reps=args.reps,
        progress=progress))
    return _report(console, args, rows, "paged cache")
