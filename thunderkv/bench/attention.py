"""``thunderkv bench attention``: one decode step's attention over a KIVI cache, per layer.

Three ways to attend one new query token to ``context`` cached tokens (the newest
``residual`` in full precision, the rest in format v1, KIVI layout), timed in the same run:

- ``fused``: :func:`thunderkv.attention.kivi_decode_attention`, straight over the packed codes
  (the C++ kernel on CPU, the Triton kernel on a GPU);
- ``sdpa-fp``: torch SDPA over the same K/V held in full precision (what DynamicCache does);
- ``dequant+sdpa``: dequantize the history, concatenate the residual, then SDPA (what a
  quantized cache without a fused kernel does every step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..api import quantize
from ..attention import kivi_decode_attention
from .timing import provenance, time_calls

# (name, kv_heads, query heads per KV head, head_dim)
GEOMETRIES = {
    "smollm2-135m": (3, 3, 64),
    "llama-7b": (32, 1, 128),
    "llama3-8b": (8, 4, 128),
}


def _methods(q, k, v, qk, qv, kr, vr, *, gqa: bool) -> dict[str, Callable[[], object]]:
    def dequant_sdpa():
        kk = kr if qk is None else torch.cat([qk.dequantize(), kr], dim=-2)
        vv = vr if qv is None else torch.cat([qv.dequantize(), vr], dim=-2)
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)

    return {
        "fused": lambda: kivi_decode_attention(q[:, :, 0], qk, qv, kr, vr),
        "sdpa-fp": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
        "dequant+sdpa": dequant_sdpa,
    }


def run(
    geometry: str,
    contexts: list[int],
    *,
    dtype: torch.dtype = torch.float32,
    bits: int = 4,
    group_size: int = 64,
    residual: int = 128,
    batch: int = 1,
    reps: int = 50,
    progress: Callable[[str], object] = lambda msg: None,
    device: str = "cpu",
) -> list[dict]:
    """One row per (context, method) with p20/p50/p80 microseconds and the ratio to sdpa-fp.
    ``device``: "cpu" or a CUDA device (inputs made on the CPU from one seed, then moved)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose from {sorted(GEOMETRIES)}")
    H, R, D = GEOMETRIES[geometry]
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    base = provenance(str(dev))
    rows = []
    for ctx in contexts:
        tr = min(residual, ctx)
        tq = (ctx - tr) // group_size * group_size
        tr = ctx - tq
        k = torch.randn(batch, H, ctx, D, generator=gen).to(dev, dtype)
        v = torch.randn(batch, H, ctx, D, generator=gen).to(dev, dtype)
        q = torch.randn(batch, H * R, 1, D, generator=gen).to(dev, dtype)
        qk = qv = None  # a context shorter than one group past the residual: nothing quantized
        if tq:
            qk = quantize(k[:, :, :tq].contiguous(), bits=bits, group_size=group_size, axis=-2)
            qv = quantize(v[:, :, :tq].contiguous(), bits=bits, group_size=group_size, axis=-1)
        kr, vr = k[:, :, tq:].contiguous(), v[:, :, tq:].contiguous()

        methods = _methods(q, k, v, qk, qv, kr, vr, gqa=R > 1)
        times = {}
        for name, fn in methods.items():
            progress(f"{geometry} {ctx} tokens: {name}")
            times[name] = time_calls(fn, reps=reps, warmup=3, sync=sync)
        for name, t in times.items():
            rows.append({**base, "bench": "attention", "geometry": geometry, "context": ctx,
                         "quantized_tokens": tq, "residual_tokens": tr, "batch": batch,
                         "kv_heads": H, "query_heads": H * R, "head_dim": D,
                         "dtype": str(dtype).removeprefix("torch."), "bits": bits,
                         "group_size": group_size, "method": name,
                         "threads": torch.get_num_threads(), "reps": t.reps,
                         "us_p20": t.p20 * 1e6, "us_p50": t.p50 * 1e6, "us_p80": t.p80 * 1e6,
                         "speedup_vs_sdpa_fp": times["sdpa-fp"].p50 / t.p50})
    return rows


def plot(rows: list[dict], path) -> None:
    """PNG: one decode step's attention time against context length for each method (log-log),
    with the fused kernel's speed-up over SDPA on full-precision K/V marked. Needs
    matplotlib."""
    from thunderkv.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["context"], r["us_p50"], r["speedup_vs_sdpa_fp"]) for r in rows
                     if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if method == "fused":
            for ctx, us, x in pts:
                ax.annotate(f"{x:.2f}x", (ctx, us), textcoords="offset points", xytext=(0, -12),
                            ha="center", fontsize=8)
    r = rows[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("p50 microseconds per layer step")
    ax.set_title(f"decode attention, {r['geometry']}, {r['dtype']}, {r['bits']}-bit "
                 f"G={r['group_size']}, batch {r['batch']}, {r['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
