"""Compiled CPU kernels (thunderkv._C: SIMD variant chosen at load time, OpenMP threads)."""

from __future__ import annotations

import torch

from .._extension import extension_error, load_extension
from ..format import DTYPE_CODES, FormatSpec
from ._grouped import dequantize_grouped, quantize_grouped


def available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got a tensor on {device}"
    if load_extension() is None:
        return f"thunderkv._C failed to load: {extension_error()}"
    return None


def quantize_into(x, packed, scale, minimum, spec: FormatSpec) -> None:
    G, bits = spec.group_size, spec.bits

    def kernel(xg, p, s, m):
        load_extension().cpu_quantize(
            xg.data_ptr(), p.data_ptr(), s.data_ptr(), m.data_ptr(), xg.numel() // G, G, bits,
            DTYPE_CODES[xg.dtype], torch.get_num_threads(),
        )

    quantize_grouped(kernel, x, packed, scale, minimum, spec)


def dequantize_into(packed, scale, minimum, out, spec: FormatSpec) -> None:
    G, bits = spec.group_size, spec.bits

    def kernel(p, s, m, y):
        load_extension().cpu_dequantize(
            p.data_ptr(), s.data_ptr(), m.data_ptr(), y.data_ptr(), y.numel() // G, G, bits,
            DTYPE_CODES[y.dtype], torch.get_num_threads(),
        )

    dequantize_grouped(kernel, packed, scale, minimum, out, spec)
