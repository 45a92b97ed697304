"""Compiled CUDA kernels (thunderkv._C built with nvcc), launched on torch's current stream."""

from __future__ import annotations

import torch

from .._extension import extension_error, load_extension
from ..format import DTYPE_CODES


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


def quantize_into(x, packed, scale, minimum, bits: int, group_size: int) -> None:
    device, stream = _launch_args(x)
    load_extension().cuda_quantize(
        x.data_ptr(), packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(),
        x.numel() // group_size, group_size, bits, DTYPE_CODES[x.dtype], device, stream,
    )


def dequantize_into(packed, scale, minimum, out, bits: int, group_size: int) -> None:
    device, stream = _launch_args(out)
    load_extension().cuda_dequantize(
        packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), out.data_ptr(),
        out.numel() // group_size, group_size, bits, DTYPE_CODES[out.dtype], device, stream,
    )
