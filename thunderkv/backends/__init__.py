"""Backends of the format v1 ops, side by side.

Each backend module exposes the same three functions on validated, contiguous tensors (the
op layer in ``thunderkv._ops`` checks everything first); ``x`` and ``out`` are in the caller's
``[..., T, D]`` layout, ``packed``/``scale``/``minimum`` in format v1's grouped layout:

- ``available(device) -> str | None``: ``None`` when usable for tensors on ``device``, else
  the reason it is not;
- ``quantize_into(x, packed, scale, minimum, spec)``;
- ``dequantize_into(packed, scale, minimum, out, spec)``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
BACKEND_CHOICES = ("auto", *BACKENDS)
# What "auto" tries, in order, per device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}_backend")


def check_backend_name(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """``None`` if backend ``name`` can run on ``device``, else why not.

    Remembered per (backend, device): every op call resolves its backend, and the answer
    (extension loaded, CUDA devices visible, Triton importable) does not change in a process.
    """
    return _unavailable_reason(name, device.type, device.index)


@functools.cache
def _unavailable_reason(name: str, device_type: str, index: int | None) -> str | None:
    return _module(name).available(torch.device(device_type, index))


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The backend module to use for tensors on ``device``; raises with the reason if none."""
    check_backend_name(backend)
    if backend != "auto":
        why = unavailable_reason(backend, device)
        if why is not None:
            raise RuntimeError(f"backend {backend!r} cannot run on {device}: {why}")
        return _module(backend)
    reasons = []
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        why = unavailable_reason(name, device)
        if why is None:
            return _module(name)
        reasons.append(f"{name}: {why}")
    raise RuntimeError(f"no backend can run on {device} ({'; '.join(reasons)})")


# A ``rows`` entry of the paged row kernels' dequantize_rows that zeroes its output row
# instead of reading one (positions past a sequence's end in a gather); -1 leaves a row alone.
# The compiled kernels use the same value (kZeroRow in csrc/cpu/dispatch.h and
# csrc/cuda/quant_threads.cuh).
ZERO_ROW = -2


def check_row_view(packed: torch.Tensor, rows: torch.Tensor, bits: int) -> None:
    """The paged row kernels' slotted side must be the ``[capacity, row bytes]`` view
    ``thunderkv.paged`` passes, ``rows`` being the contiguous side (one row per token or
    block): ``packed``'s row count bounds the slots the GPU kernels accept (a 4-D cache would
    make it num_blocks and silently drop most slots)."""
    row_bytes = rows.numel() // rows.shape[0] * bits // 8 if rows.shape[0] else packed.shape[-1]
    if packed.dim() != 2 or packed.shape[1] != row_bytes:
        raise ValueError(f"packed must be a [capacity, {row_bytes}] row view, got "
                         f"{tuple(packed.shape)}")


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current device for a launch (CPU tensors: nothing). Triton and our
    CUDA launches go to torch's *current* device and stream, not the tensor's: a tensor on
    cuda:1 while cuda:0 is current would otherwise run on GPU 0, faulting or racing with
    cuda:1's stream. torch's own guard also knows not to create a context on a device the
    thread never used when it switches back."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
