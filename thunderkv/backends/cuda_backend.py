"""Compiled CUDA kernels (thunderkv._C built with nvcc), launched on torch's current stream."""

from __future__ import annotations

import torch

from .._extension import extension_error, load_extension
from ..format import DTYPE_CODES, FormatSpec
from ._grouped import dequantize_grouped, quantize_grouped


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
        return f"the CUDA runtime in thunderkv._C sees no device ({why or 'count 0'})"
    return None


def _launch_args(t: torch.Tensor) -> tuple[int, int]:
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def quantize_into(x, packed, scale, minimum, spec: FormatSpec) -> None:
    G, bits = spec.group_size, spec.bits

    def kernel(xg, p, s, m):
        device, stream = _launch_args(xg)
        load_extension().cuda_quantize(
            xg.data_ptr(), p.data_ptr(), s.data_ptr(), m.data_ptr(), xg.numel() // G, G, bits,
            DTYPE_CODES[xg.dtype], device, stream,
        )

    quantize_grouped(kernel, x, packed, scale, minimum, spec)


def dequantize_into(packed, scale, minimum, out, spec: FormatSpec) -> None:
    G, bits = spec.group_size, spec.bits

    def kernel(p, s, m, y):
        device, stream = _launch_args(y)
        load_extension().cuda_dequantize(
            p.data_ptr(), s.data_ptr(), m.data_ptr(), y.data_ptr(), y.numel() // G, G, bits,
            DTYPE_CODES[y.dtype], device, stream,
        )

    dequantize_grouped(kernel, packed, scale, minimum, out, spec)
