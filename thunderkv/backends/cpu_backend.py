"""Compiled CPU kernels (thunderkv._C: SIMD variant chosen at load time, OpenMP threads).

Both axes run natively: per-channel (axis=-2) kernels read ``[..., T, D]`` with stride D, so no
transposed copy is made.
"""

from __future__ import annotations

import torch

from .._extension import extension_error, load_extension
from ..format import DTYPE_CODES, FormatSpec


def available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got a tensor on {device}"
    if load_extension() is None:
        return f"thunderkv._C failed to load: {extension_error()}"
    return None


def _layout(t: torch.Tensor, spec: FormatSpec) -> tuple[int, int]:
    """(tokens, channels) for the per-channel kernels, (0, 0) for per-token."""
    return (t.shape[-2], t.shape[-1]) if spec.axis == -2 else (0, 0)


def quantize_into(x, packed, scale, minimum, spec: FormatSpec) -> None:
    G = spec.group_size
    load_extension().cpu_quantize(
        x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), x.numel() // G, G,
        spec.bits, DTYPE_CODES[x.dtype], torch.get_num_threads(), *_layout(x, spec),
    )


def dequantize_into(packed, scale, minimum, out, spec: FormatSpec) -> None:
    G = spec.group_size
    load_extension().cpu_dequantize(
        packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), out.data_ptr(),
        out.numel() // G, G, spec.bits, DTYPE_CODES[out.dtype], torch.get_num_threads(),
        *_layout(out, spec),
    )
