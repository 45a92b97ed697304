"""``thunderkv bench quant``: quantize/dequantize throughput per backend vs a plain copy.

Bytes counted for an op are bytes read + bytes written: ``x`` plus the packed codes, scales
and minima. The copy baseline moves ``x`` once (read + write = 2 * x.nbytes) in the same run:
``numpy.copyto`` on CPU (torch's ``copy_`` of float16 is far below memory speed there) and a
device-to-device ``copy_`` on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .. import backends
from ..api import dequantize, quantize, quantize_into
from .timing import Timing, provenance, time_calls


@dataclass(frozen=True, slots=True)
class KVShape:
    """One layer's K (or V) cache of one request: ``[1, heads, tokens, head_dim]``."""

    model: str
    heads: int
    tokens: int
    head_dim: int = 128

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, self.heads, self.tokens, self.head_dim)

    @property
    def label(self) -> str:
        return f"{self.model} {self.heads}x{self.tokens}"


PRESETS: dict[str, list[KVShape]] = {
    # Llama-7B: 32 heads x 128; Llama-30B: 52 heads x 128 (per-layer cache of one request).
    "default": [
        KVShape("llama-7b", 32, 1024),
        KVShape("llama-30b", 52, 2048),
        KVShape("llama-7b", 32, 4096),
        KVShape("llama-7b", 32, 8192),
    ],
    "quick": [KVShape("tiny", 8, 256), KVShape("llama-7b", 32, 1024)],
    # >= 64 MiB of float16 per call, for GPU bandwidth checks.
    "large": [KVShape("llama-7b", 32, 8192), KVShape("llama-70b-tp1", 64, 8192)],
}


def _copy_fn(x: torch.Tensor) -> Callable[[], object]:
    if x.device.type == "cpu":
        import numpy as np

        src = x.view(torch.int16).numpy() if x.element_size() == 2 else x.numpy()
        dst = np.empty_like(src)
        return lambda: np.copyto(dst, src)
    dst = torch.empty_like(x)
    return lambda: dst.copy_(x)


def _sync(device: torch.device) -> Callable[[], object] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def usable_backends(device: torch.device, wanted: Iterable[str] | None) -> list[str]:
    """Backends to time on ``device`` (the requested ones, or every one usable there)."""
    names = list(wanted) if wanted else list(backends.BACKENDS)
    out = []
    for name in names:
        why = backends.unavailable_reason(name, device)
        if why is None:
            out.append(name)
        elif wanted:
            raise RuntimeError(f"backend {name!r} unavailable on {device}: {why}")
    return out


def run(
    shapes: list[KVShape],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    bits: int = 4,
    group_size: int = 64,
    axis: int = -1,
    backend_names: Iterable[str] | None = None,
    reps: int = 10,
    reference_reps: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time quantize and dequantize for each shape and backend; return one row per
    (shape, op, backend) plus the copy baseline, each with provenance."""
    names = usable_backends(device, backend_names)
    prov = provenance(str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu")
    sync = _sync(device)
    rows: list[dict] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for kv in shapes:
        x = torch.randn(kv.shape, generator=gen).to(dtype=dtype, device=device)
        base = {
            **prov,
            "bench": "quant",
            "shape": list(kv.shape),
            "label": kv.label,
            "dtype": str(dtype).removeprefix("torch."),
            "bits": bits,
            "group_size": group_size,
            "axis": axis,
            "threads": torch.get_num_threads(),
        }
        if progress:
            progress(f"{kv.label}: copy baseline")
        copy_t = time_calls(_copy_fn(x), reps=reps, sync=sync)
        copy_bytes = 2 * x.nbytes
        copy_gbps = copy_bytes / copy_t.p50 / 1e9
        rows.append(_row(base, "copy", "numpy" if device.type == "cpu" else "torch",
                         copy_t, copy_bytes, copy_gbps))
        ref_p50: dict[str, float] = {}
        for name in names:
            n = reference_reps if name == "reference" else reps
            q = quantize(x, bits=bits, group_size=group_size, axis=axis, backend=name)
            moved = x.nbytes + q.nbytes
            out = torch.empty_like(x)
            ops = {
                "quantize": lambda x=x, q=q, name=name: quantize_into(
                    x, q.packed, q.scale, q.minimum, bits=bits, group_size=group_size,
                    axis=axis, backend=name,
                ),
                "dequantize": lambda q=q, out=out, name=name: dequantize(q, out=out, backend=name),
            }
            for op, fn in ops.items():
                if progress:
                    progress(f"{kv.label}: {op} [{name}]")
                t = time_calls(fn, reps=n, sync=sync)
                row = _row(base, op, name, t, moved, copy_gbps)
                if name == "reference":
                    ref_p50[op] = t.p50
                rows.append(row)
        for row in rows:
            if row["label"] == kv.label and row["op"] in ref_p50:
                row["speedup_vs_reference"] = ref_p50[row["op"]] / row["p50_s"]
    return rows


def _row(base: dict, op: str, backend: str, t: Timing, nbytes: int, copy_gbps: float) -> dict:
    gbps = nbytes / t.p50 / 1e9
    return {
        **base,
        "op": op,
        "backend": backend,
        "bytes": nbytes,
        "reps": t.reps,
        "p20_s": t.p20,
        "p50_s": t.p50,
        "p80_s": t.p80,
        "gbps": gbps,
        "ratio_to_copy": gbps / copy_gbps,
    }


def render_table(rows: list[dict], title: str):
    """A rich Table of the rows (one line per shape/op/backend)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("heads x tokens", "op", "backend", "p50 ms", "GB/s", "x copy", "x ref"):
        table.add_column(col, justify="left" if col in ("heads x tokens", "op", "backend") else "right",
                         no_wrap=True)
    for r in rows:
        ref = r.get("speedup_vs_reference")
        table.add_row(
            r["label"], r["op"], r["backend"], f"{r['p50_s'] * 1e3:.3f}", f"{r['gbps']:.2f}",
            f"{r['ratio_to_copy']:.2f}", "" if ref is None else f"{ref:.0f}",
        )
    return table
