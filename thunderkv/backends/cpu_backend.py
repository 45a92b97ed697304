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


def quantize_into(x, packed, scale, minimum, spec: FormatSpec) -> None:
    G = spec.group_size
    load_extension().cpu_quantize(
        x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), x.numel() // G, G,
        spec.bits, DTYPE_CODES[x.dtype], torch.get_num_threads(), *spec.channel_layout(x.shape),
    )


def dequantize_into(packed, scale, minimum, out, spec: FormatSpec) -> None:
    G = spec.group_size
    load_extension().cpu_dequantize(
        packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), out.data_ptr(),
        out.numel() // G, G, spec.bits, DTYPE_CODES[out.dtype], torch.get_num_threads(),
        *spec.channel_layout(out.shape),
    )


def quantize_rows(x, packed, scale, minimum, slots, spec: FormatSpec) -> None:
    """The fused paged write: contiguous rows ``x [N, ...]`` (one token each, per-token groups)
    quantized straight into rows ``slots[t]`` (int64 CPU ``[N]``, -1 skips) of the
    ``[capacity, ...]`` outputs, with no intermediate tensors."""
    G, n = spec.group_size, x.shape[0]
    load_extension().cpu_quantize_rows(
        x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(),
        x.numel() // max(1, n) // G, G, spec.bits, DTYPE_CODES[x.dtype], slots.data_ptr(), n,
        packed.shape[0], torch.get_num_threads(),
    )


def dequantize_rows(packed, scale, minimum, out, rows, spec: FormatSpec) -> None:
    """The fused paged gather: rows ``rows[t]`` (int64 CPU ``[N]``; -1 leaves row t alone,
    ``ZERO_ROW`` (-2) zeroes it) of the ``[capacity, ...]`` inputs dequantized straight into
    contiguous rows of ``out [N, ...]``."""
    G, n = spec.group_size, out.shape[0]
    load_extension().cpu_dequantize_rows(
        packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), out.data_ptr(),
        out.numel() // max(1, n) // G, G, spec.bits, DTYPE_CODES[out.dtype], rows.data_ptr(), n,
        packed.shape[0], torch.get_num_threads(),
    )
