"""Triton kernels (thunderkv.triton_kernels), for CUDA tensors or TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import importlib
import os

import torch

from . import check_row_view, on_device_of


def _kernels():
    return importlib.import_module("thunderkv.triton_kernels")


def available(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'thunderkv[triton]'"
    kernels = _kernels()
    if not hasattr(kernels, "quantize_into"):
        return "thunderkv.triton_kernels has no format v1 kernels in this version"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device}"
    return None


def quantize_into(x, packed, scale, minimum, spec) -> None:
    with on_device_of(x):
        _kernels().quantize_into(x, packed, scale, minimum, spec)


def dequantize_into(packed, scale, minimum, out, spec) -> None:
    with on_device_of(out):
        _kernels().dequantize_into(packed, scale, minimum, out, spec)


def quantize_rows(x, packed, scale, minimum, slots, spec) -> None:
    check_row_view(packed, x, spec.bits)
    with on_device_of(x):
        _kernels().quantize_rows(x, packed, scale, minimum, slots, spec)


def dequantize_rows(packed, scale, minimum, out, rows, spec) -> None:
    check_row_view(packed, out, spec.bits)
    with on_device_of(out):
        _kernels().dequantize_rows(packed, scale, minimum, out, rows, spec)
