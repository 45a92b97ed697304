"""``thunderkv env``: versions, CPU features, and which backends are available (and why not)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("env", help="report versions, CPU features and backend availability")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..envinfo import collect

    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console = Console()
    t = Table(title=f"ThunderKV {info['thunderkv']} (format v{info['format_version']})",
              show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("python / torch", f"{info['python']} / {info['torch']}")
    t.add_row("numpy / triton / ucxx",
              " / ".join(str(info[k] or "not installed") for k in ("numpy", "triton")) + " / "
              + str(info["ucxx"] or "not installed (optional: the transfer data path does not "
                                     "use it)"))
    cpu = info["cpu"]
    t.add_row("cpu", f"{cpu['model']} ({cpu['cores']} cores, torch threads {cpu['torch_threads']})")
    t.add_row("cpu features", " ".join(cpu["flags"]) or "unknown")
    ext = info["extension"]
    if ext["loaded"]:
        t.add_row("extension", f"thunderkv._C {ext['version']} built by {ext['compiler']}, "
                  f"OpenMP {'yes' if ext['openmp'] else 'no'} ({ext['openmp_max_threads']} threads)")
        active = (ext["cpu_variant_active"] if ext["cpu_variant_error"] is None
                  else f"[red]{escape(ext['cpu_variant_error'])}[/]")
        t.add_row("cpu kernels", f"active {active}; usable "
                  f"{', '.join(ext['cpu_variants_usable'])}; compiled "
                  f"{', '.join(ext['cpu_variants_compiled'])}; crc32c {ext['crc32c']}")
        cuda_txt = (f"compiled for sm {ext['cuda_architectures']}, CUDA runtime "
                    f"{_cuda_version(ext['cuda_runtime_version'])}"
                    if ext["cuda"] else f"not compiled: {escape(str(ext['cuda_why_not']))}")
        t.add_row("cuda kernels", cuda_txt)
    else:
        t.add_row("extension", f"[red]not loaded: {escape(str(ext['why_not']))}")
    t.add_row("kernel settings", " ".join(f"{k}={v}" for k, v in info["kernel_env"].items())
              or "defaults (no THUNDERKV_CPU_ISA, THUNDERKV_CUDA_SCALAR, THUNDERKV_CUDA_COLS)")
    tc = info["torch_cuda"]
    built = ("a CPU-only build of torch" if tc["built_with"] is None
             else f"built with CUDA {tc['built_with']}")
    t.add_row("torch cuda", f"{'available' if tc['available'] else 'unavailable'} "
              f"({built}) {', '.join(tc['devices'])}".rstrip())
    for name, st in info["backends"].items():
        mark = "[green]yes[/]" if st["available"] else f"[yellow]no[/]: {escape(st['why_not'])}"
        t.add_row(f"backend {name}", f"{mark} ({st['device']})")
    tr = info["transfer"]
    t.add_row("transfer (UCX)", (f"[green]yes[/] UCX {tr['ucx_version']}{_token_note()}"
                                 if tr["available"]
                                 else f"[yellow]no[/]: {escape(str(tr['why_not']))}"))
    t.add_row("UCX transports",
              escape(" ".join(tr["transports"]) or tr.get("devices_error") or "none"))
    console.print(t)
    return 0


def _token_note() -> str:
    """'' when a transfer token is configured, else why KVSender/KVReceiver would refuse."""
    from rich.markup import escape

    from ..transfer import auth

    try:
        auth.load_token()
    except ValueError as exc:
        return f"; [yellow]but no usable token[/]: {escape(str(exc))}"
    return ""


def _cuda_version(code: object) -> str:
    """CUDA's integer version (1000 x major + 10 x minor, e.g. 13000) as "13.0"."""
    if isinstance(code, int) and code > 0:
        return f"{code // 1000}.{code % 1000 // 10}"
    return str(code)
