"""Compiled CUDA kernels (thunderkv._C built with nvcc), launched on torch's current stream.

Both axes run natively: per-channel (axis=-2) kernels read ``[..., T, D]`` with stride D
(consecutive threads on consecutive channels), so no transposed copy is made.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .._extension import extension_error, load_extension
from ..format import DTYPE_CODES, FormatSpec
from . import check_row_view, on_device_of


def available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got a tensor on {device}"
    _C = load_extension()
    if _C is None:
        return f"thunderkv._C failed to load: {extension_error()}"
    if not _C.has_cuda:
        return "thunderkv._C was built without CUDA: " + _C.build_info()["cuda_why_not"]
    count, why = _C.cuda_device_count()
    if count <= 0:
        if not os.path.exists("/proc/driver/nvidia/version"):  # cudart then blames the driver
            return ("no NVIDIA driver or GPU on this machine (the CUDA runtime says: "
                    f"{why or 'no device'})")
        return f"the CUDA runtime in thunderkv._C sees no device ({why or 'count 0'})"
    return None


@contextlib.contextmanager
def cuda_launch(t: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(device index, current stream) of ``t``, with ``t``'s device current (:func:`on_device_of`),
    for every launch of the extension's CUDA code (kernels here, the transfer's CRC): the C++
    guard then finds the device already current and switches nothing."""
    with on_device_of(t):
        index = torch.cuda.current_device()
        yield index, torch.cuda.current_stream(index).cuda_stream


def quantize_into(x, packed, scale, minimum, spec: FormatSpec) -> None:
    G = spec.group_size
    with cuda_launch(x) as (device, stream):
        load_extension().cuda_quantize(
            x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), x.numel() // G, G,
            spec.bits, DTYPE_CODES[x.dtype], device, stream, *spec.channel_layout(x.shape),
        )


def dequantize_into(packed, scale, minimum, out, spec: FormatSpec) -> None:
    G = spec.group_size
    with cuda_launch(out) as (device, stream):
        load_extension().cuda_dequantize(
            packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), out.data_ptr(),
            out.numel() // G, G, spec.bits, DTYPE_CODES[out.dtype], device, stream,
            *spec.channel_layout(out.shape),
        )


def quantize_rows(x, packed, scale, minimum, slots, spec: FormatSpec) -> None:
    """The fused paged write: contiguous rows ``x [N, ...]`` (one token each, per-token groups)
    quantized straight into rows ``slots[t]`` (int64 on x's device; -1, or under CUDA-graph
    capture any slot outside [0, capacity), skips) of the ``[capacity, ...]`` outputs."""
    G, n = spec.group_size, x.shape[0]
    check_row_view(packed, x, spec.bits)
    with cuda_launch(x) as (device, stream):
        load_extension().cuda_quantize(
            x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), x.numel() // G, G,
            spec.bits, DTYPE_CODES[x.dtype], device, stream, 0, 0, slots.data_ptr(),
            x.numel() // max(1, n) // G, packed.shape[0],
        )


def dequantize_rows(packed, scale, minimum, out, rows, spec: FormatSpec) -> None:
    """The fused paged gather: rows ``rows[t]`` (int64 on out's device; ``ZERO_ROW`` (-2)
    zeroes row t, -1 or any other row outside [0, capacity) leaves it alone) of the
    ``[capacity, ...]`` inputs dequantized into rows of ``out``."""
    G, n = spec.group_size, out.shape[0]
    check_row_view(packed, out, spec.bits)
    with cuda_launch(out) as (device, stream):
        load_extension().cuda_dequantize(
            packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), out.data_ptr(), out.numel() // G,
            G, spec.bits, DTYPE_CODES[out.dtype], device, stream, 0, 0, rows.data_ptr(),
            out.numel() // max(1, n) // G, packed.shape[0],
        )
