"""``thunderkv bench paged``: paged-cache write, gather and transfer packing vs a plain copy.

Bytes counted are read + written: a write reads K and V and writes their compressed form; a
gather reads the compressed blocks and writes dense K and V; a pack reads and writes the
compressed blocks once. The copy baseline moves dense K and V once, in the same run.
Gather and pack write into workspaces allocated once (``out=``), as a serving engine reuses its
buffers; so does the copy baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..paged import PagedKVCache, gather_dequantize, pack_for_transfer, quantize_to_paged
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
class PagedCase:
    """``batch`` sequences of ``tokens`` tokens, ``kv_heads`` x ``head_dim``, one layer."""

    model: str
    batch: int
    tokens: int
    kv_heads: int
    head_dim: int = 128
    block_size: int = 16

    @property
    def label(self) -> str:
        return f"{self.model} {self.batch}x{self.tokens}"


PRESETS: dict[str, list[PagedCase]] = {
    "default": [PagedCase("llama-7b", 4, 1024, 32), PagedCase("llama-7b", 1, 8192, 32)],
    "quick": [PagedCase("tiny", 2, 256, 8)],
    "large": [PagedCase("llama-7b", 8, 4096, 32), PagedCase("llama-70b-tp8", 32, 2048, 8)],
}


def run(
    cases: list[PagedCase],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    bits: int = 4,
    group_size: int = 64,
    backend_names=None,
    reps: int = 10,
    progress: Callable[[str], None] | None = None,
    graph: bool = True,
) -> list[dict]:
    """One row per (case, op, backend) plus the copy baseline (every backend in
    ``backend_names``; by default every usable one but the slow reference, where another
    runs); on CUDA with ``graph`` each row
    also gets its CUDA-graph replay timing (:func:`.common.add_graph_timing`; the write and,
    given max_len, the gather record into graphs as a serving engine's decode step does)."""
    graph = graph and device.type == "cuda"
    names = usable_backends(device, backend_names)
    if not backend_names:  # by default the reference only where nothing faster runs
        names = [n for n in names if n != "reference"] or ["reference"]
    prov = provenance(device_label(device))
    sync = device_sync(device)
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for case in cases:
        n = case.batch * case.tokens
        blocks_per_seq = -(-case.tokens // case.block_size)
        cache = PagedKVCache.allocate(case.batch * blocks_per_seq, case.block_size, case.kv_heads,
                                      case.head_dim, dtype=dtype, bits=bits,
                                      group_size=group_size, device=device)
        shape = (n, case.kv_heads, case.head_dim)
        key = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        value = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        # each sequence in its own (shuffled) blocks, as a block manager would hand them out
        order = torch.randperm(cache.num_blocks, generator=gen).to(device)
        table = order.view(case.batch, blocks_per_seq)
        pos = torch.arange(case.tokens, device=device)
        slots = (table[:, pos // case.block_size] * case.block_size + pos % case.block_size)
        slots = slots.reshape(-1)
        seq_lens = torch.full((case.batch,), case.tokens, device=device)
        base = {**prov, "bench": "paged", "label": case.label, "shape": list(shape),
                "dtype": str(dtype).removeprefix("torch."), "bits": bits,
                "group_size": group_size, "axis": -1, "threads": torch.get_num_threads()}
        if progress:
            progress(f"{case.label}: copy baseline")
        kv = torch.cat([key, value])
        copy_row, copy_gbps, copy_graph = copy_baseline(base, kv, reps=reps, sync=sync,
                                                        graph=graph)
        rows.append(copy_row)
        compressed = cache.nbytes
        ws_shape = (case.batch, blocks_per_seq * case.block_size, *shape[1:])
        workspace = tuple(torch.empty(ws_shape, dtype=dtype, device=device) for _ in range(2))
        wire = torch.empty(compressed // case.batch, dtype=torch.uint8, device=device)
        for name in names:
            args = (key, value, cache, slots, table, seq_lens, name)
            ops = {
                "write": (lambda a=args: quantize_to_paged(*a[:4], backend=a[6]),
                          kv.nbytes + compressed),
                "gather": (lambda a=args, w=workspace, m=case.tokens: gather_dequantize(
                    a[2], a[4], a[5], max_len=m, backend=a[6], out=w),
                           compressed + kv.nbytes),
            }
            if name == names[0]:  # pure data movement: the same for every backend
                ops["pack"] = (lambda a=args, w=wire: pack_for_transfer(a[2], a[4][0], out=w),
                               2 * compressed // case.batch)
            for op, (fn, nbytes) in ops.items():
                if progress:
                    progress(f"{case.label}: {op} [{name}]")
                t = time_calls(fn, reps=reps, sync=sync)
                rows.append(measurement_row(base, op, name if op != "pack" else "torch", t, nbytes,
                                 copy_gbps))
                if graph and op != "pack":  # pack range-checks its block ids on the host
                    add_graph_timing(rows[-1], fn, device, copy_graph, reps)
    return rows
