"""The ``thunderkv`` command line.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed
namespace, returning an exit code). Modules are imported lazily so that ``thunderkv plan``
never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (subcommand, module under thunderkv.cli, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("env", "env", "report versions, CPU features and which backends are available (and why not)"),
    ("bench", "bench", "benchmarks (quant, paged, transfer, e2e)"),
    ("plan", "plan", "plan a phase-split deployment on a GPU cluster"),
    ("simulate", "simulate", "replay a workload through a plan"),
    ("eval", "eval", "quality of compressed KV caches on a real model (perplexity, agreement)"),
    ("serve", "serve", "serve a model over HTTP with prefill/decode worker processes"),
]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thunderkv",
        description="ThunderKV: compressed KV transfer and phase-split planning for LLM serving.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module, help_text in SUBCOMMANDS:
        if wanted is not None and wanted != name:
            # Only import the module actually asked for (keeps `plan` torch-free and fast).
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise
            continue  # subcommand not part of this build yet
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
