"""Compiled CPU kernels (thunderkv._C: SIMD variant chosen at load time, OpenMP threads)."""

from __future__ import annotations

import torch

from .._extension import extension_error, load_extension
from ..format import DTYPE_CODES


def available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got a tensor on {device}"
    if load_extension() is None:
        return f"thunderkv._C failed to load: {extension_error()}"
    return None


def quantize_into(x, packed, scale, minimum, bits: int, group_size: int) -> None:
    _C = load_extension()
    _C.cpu_quantize(
        x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(),
        x.numel() // group_size, group_size, bits, DTYPE_CODES[x.dtype], torch.get_num_threads(),
    )


def dequantize_into(packed, scale, minimum, out, bits: int, group_size: int) -> None:
    _C = load_extension()
    _C.cpu_dequantize(
        packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), out.data_ptr(),
        out.numel() // group_size, group_size, bits, DTYPE_CODES[out.dtype],
        torch.get_num_threads(),
    )
