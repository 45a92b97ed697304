"""Adapters that run last-axis ("grouped layout") kernels for either axis.

The compiled kernels group along the last axis of a contiguous buffer. For per-channel
quantization (axis=-2) the input is transposed into a contiguous copy first and the output
is transposed back: an explicit copy, the price of reusing the per-token kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..format import FormatSpec

QuantKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def quantize_grouped(
    kernel: QuantKernel, x: torch.Tensor, packed, scale, minimum, spec: FormatSpec
) -> None:
    xg = x.transpose(-1, -2).contiguous() if spec.axis == -2 else x
    kernel(xg, packed, scale, minimum)


def dequantize_grouped(
    kernel: QuantKernel, packed, scale, minimum, out: torch.Tensor, spec: FormatSpec
) -> None:
    if spec.axis == -1:
        kernel(packed, scale, minimum, out)
        return
    tmp = torch.empty(out.transpose(-1, -2).shape, dtype=out.dtype, device=out.device)
    kernel(packed, scale, minimum, tmp)
    out.copy_(tmp.transpose(-1, -2))
