"""Issue 3's performance targets, read off one gpu_check.sh run's bench.jsonl.

    python benchmarks/gpu_targets.py OUTDIR/bench.jsonl [--json OUTDIR/targets.json]

Targets (H100/H200, same run's device-to-device copy as the baseline):
  * quantize and dequantize of >= 64 MiB float16/bfloat16 KV: bytes moved >= 85 % of copy's rate;
  * Triton within 90 % of CUDA (same case, op and dtype);
  * paged write and gather >= 80 % of copy.
Each case prints its ratio and whether it meets the target; kernel variants picked by
environment (``env`` in a row: THUNDERKV_CUDA_SCALAR, THUNDERKV_CUDA_COLS) are listed apart,
so the variant that meets a target is visible. Ratios come from the CUDA-graph replay timings
(``graph_*`` fields: the kernels against the copy kernel, both without per-call Python and host
syncs) where the row has them, else from the eager per-call timings; each verdict says which,
and keeps the eager ratio beside it. On a CPU dry run it checks nothing (says so).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from math import prod

MIB = 1 << 20
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
QUANT_TARGET, TRITON_TARGET, PAGED_TARGET = 0.85, 0.90, 0.80


def variant(row: dict) -> str:
    """Backend plus the environment that chose its kernels, e.g. ``cuda/regs``."""
    env = row.get("env") or {}
    if env.get("THUNDERKV_CUDA_SCALAR"):
        return row["backend"] + "/scalar"
    if env.get("THUNDERKV_CUDA_COLS"):
        return row["backend"] + "/" + env["THUNDERKV_CUDA_COLS"]
    return row["backend"]


def input_mib(row: dict) -> float:
    return prod(row["shape"]) * ITEMSIZE.get(row["dtype"], 2) / MIB


def vs_copy(row: dict, target: float, check: str) -> dict:
    """A verdict on ``row``'s rate over the copy's: graph-timed where the row has it."""
    graph = "graph_ratio_to_copy" in row
    return {"check": f"{check} [{'graph' if graph else 'eager'}]",
            "ratio": row["graph_ratio_to_copy"] if graph else row["ratio_to_copy"],
            "eager_ratio": row["ratio_to_copy"], "target": target}


def verdicts(rows: Iterable[dict]) -> list[dict]:
    """One entry per checked case: what (and which timing), measured ratio, target, met."""
    rows = [r for r in rows if r.get("device", "cpu") != "cpu"]
    out: list[dict] = []
    quant = [r for r in rows if r["bench"] == "quant" and r["op"] in ("quantize", "dequantize")
             and r["dtype"] in ("float16", "bfloat16") and input_mib(r) >= 64
             and r["backend"] in ("cuda", "triton")]
    for r in quant:
        out.append(vs_copy(r, QUANT_TARGET, f"{r['op']} axis {r['axis']} {r['dtype']} "
                                            f"{r['label']} [{variant(r)}] vs copy"))
    cuda = {(r["op"], r["axis"], r["dtype"], r["label"]): r for r in quant
            if variant(r) == "cuda"}
    for r in quant:
        c = cuda.get((r["op"], r["axis"], r["dtype"], r["label"]))
        if variant(r) == "triton" and c is not None:
            graph = "graph_gbps" in r and "graph_gbps" in c
            key = "graph_gbps" if graph else "gbps"
            out.append({"check": f"{r['op']} axis {r['axis']} {r['dtype']} {r['label']} "
                                 f"triton vs cuda [{'graph' if graph else 'eager'}]",
                        "ratio": r[key] / c[key], "eager_ratio": r["gbps"] / c["gbps"],
                        "target": TRITON_TARGET})
    for r in rows:
        if r["bench"] == "paged" and r["op"] in ("write", "gather") and \
                r["backend"] in ("cuda", "triton"):
            out.append(vs_copy(r, PAGED_TARGET,
                               f"paged {r['op']} {r['dtype']} {r['label']} [{variant(r)}] vs copy"))
    for v in out:
        v["met"] = v["ratio"] >= v["target"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl")
    ap.add_argument("--json", help="write the verdicts here")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    found = verdicts(rows)
    if not found:
        print("targets: no GPU rows of the targeted sizes in this run (CPU dry run?): nothing "
              "checked")
    else:
        met = sum(v["met"] for v in found)
        print(f"targets: {met} of {len(found)} checks met")
        for v in found:
            print(f"  {'ok ' if v['met'] else 'MISS'} {v['ratio']:6.3f} (>= {v['target']:.2f}; "
                  f"eager {v['eager_ratio']:.3f})  {v['check']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(found, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
