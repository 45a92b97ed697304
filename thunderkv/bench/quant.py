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

from ..api import QuantizedTensor, dequantize, quantize, quantize_into
from .common import (
    add_graph_timing,
    copy_baseline,
    device_label,
    device_sync,
    measurement_row,
    usable_backends,
)
from .timing import provenance, time_calls


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


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits (NaN payloads and signed zeros included)."""
    if a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and bool(torch.equal(a, b))


def codes_match(q: QuantizedTensor, want: QuantizedTensor) -> bool:
    """Whether ``q`` stores exactly what the reference's ``want`` does (format v1 is
    bit-exact across backends: codes, scales and minima)."""
    return all(_same_bits(getattr(q, k), getattr(want, k)) for k in ("packed", "scale", "minimum"))


def within_one_ulp(y: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether ``y`` is within one ulp (of ``want``'s dtype) of the reference's dequantized
    ``want`` everywhere, with NaN exactly where ``want`` has NaN."""
    nan = torch.isnan(want)
    if y.shape != want.shape or not torch.equal(torch.isnan(y), nan):
        return False
    mag = want.abs()
    ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).float()
    close = ((y.float() - want.float()).abs() <= ulp) | (y == want)  # == for infinities
    return bool((close | nan).all())


PRESETS: dict[str, list[KVShape]] = {
    # Llama-7B: 32 heads x 128; Llama-30B: 52 heads x 128 (per-layer cache of one request).
    "default": [
        KVShape("llama-7b", 32, 1024),
        KVShape("llama-30b", 52, 2048),
        KVShape("llama-7b", 32, 4096),
        KVShape("llama-7b", 32, 8192),
    ],
    "quick": [KVShape("tiny", 8, 256), KVShape("llama-7b", 32, 1024)],
    # >= 128 MiB of float16 per call, for GPU bandwidth checks: well above an H100/H200's
    # 50-60 MB L2, which back-to-back graph replays of a 64 MiB case would partly hit.
    "large": [KVShape("llama-70b-tp1", 64, 8192), KVShape("llama-70b-tp1", 64, 16384)],
}


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
    graph: bool = True,
) -> list[dict]:
    """Time quantize and dequantize for each shape and backend; return one row per
    (shape, op, backend) plus the copy baseline, each with provenance. On CUDA with ``graph``,
    each row also gets its CUDA-graph replay timing (:func:`.common.add_graph_timing`): the
    kernels' own speed, next to the eager per-call time. Every other backend's rows say
    whether its output matched the reference's (``matches_reference``, checked before
    timing it: :func:`codes_match`, :func:`within_one_ulp`)."""
    graph = graph and device.type == "cuda"
    names = usable_backends(device, backend_names)
    prov = provenance(device_label(device))
    sync = device_sync(device)
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
        copy_row, copy_gbps, copy_graph = copy_baseline(base, x, reps=reps, sync=sync, graph=graph)
        rows.append(copy_row)
        ref_p50: dict[str, float] = {}
        want = want_y = None  # the reference's output, made once per shape for the checks
        for name in names:
            n = reference_reps if name == "reference" else reps
            q = quantize(x, bits=bits, group_size=group_size, axis=axis, backend=name)
            checked: dict[str, bool] = {}
            if name != "reference":  # checked before it is timed
                if progress:
                    progress(f"{kv.label}: checking [{name}] against the reference")
                if want is None:
                    want = quantize(x, bits=bits, group_size=group_size, axis=axis,
                                    backend="reference")
                    want_y = dequantize(want, backend="reference")
                checked = {"quantize": codes_match(q, want),
                           "dequantize": within_one_ulp(dequantize(want, backend=name), want_y)}
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
                row = measurement_row(base, op, name, t, moved, copy_gbps)
                if op in checked:
                    row["matches_reference"] = checked[op]
                if graph and name != "reference":
                    add_graph_timing(row, fn, device, copy_graph, reps)
                if name == "reference":
                    ref_p50[op] = t.p50
                rows.append(row)
        for row in rows:
            if row["label"] == kv.label and row["op"] in ref_p50:
                row["speedup_vs_reference"] = ref_p50[row["op"]] / row["p50_s"]
    return rows
