"""Triton kernels of format v1 (installed as ``thunderkv.triton_kernels``).

``quantize_into`` / ``dequantize_into`` are the ``"triton"`` backend: they take validated,
contiguous tensors in the caller's ``[..., T, D]`` layout (``x``, ``out``) and format v1's
grouped layout (``packed``, ``scale``, ``minimum``). Under ``TRITON_INTERPRET=1`` (set before
this module is imported) they also run on CPU tensors, which is how CI tests them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .quant import (
    _dequantize_cols_kernel,
    _dequantize_rows_kernel,
    _quantize_cols_kernel,
    _quantize_rows_kernel,
)

# element type, integer type of the same width, torch view dtype, canonical NaN bits
_TYPES = {
    torch.float16: (tl.float16, tl.int16, torch.int16, 0x7E00),
    torch.bfloat16: (tl.bfloat16, tl.int16, torch.int16, 0x7FC0),
    torch.float32: (tl.float32, tl.int32, torch.int32, 0x7FC00000),
}
TILE = 4096  # elements per program
# No FMA contraction in quantize: (x - mn) * r must be rounded before the rint step
# (LLVM would otherwise fuse it with the "+ 2**23" of rint). Dequantize uses an explicit tl.fma.
QUANTIZE_OPTIONS = {"enable_fp_fusion": False}


def check_group_size(group_size: int) -> None:
    """Triton tiles need power-of-two extents."""
    if group_size & (group_size - 1) or group_size < 8:
        raise ValueError(
            f"the triton backend needs a power-of-two group_size >= 8, got {group_size} "
            "(use backend='cpu'/'cuda'/'reference' for other group sizes)"
        )


def _rows_t_d(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(leading rows, T, D) of a ``[..., T, D]`` shape."""
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _col_block(d: int, group_size: int) -> int:
    return min(triton.next_power_of_2(d), max(16, TILE // group_size))


def quantize_into(x: torch.Tensor, packed, scale, minimum, spec) -> None:
    """x ``[..., T, D]`` -> packed/scale/minimum (grouped layout), format v1."""
    check_group_size(spec.group_size)
    G, bits = spec.group_size, spec.bits
    dt, it, view, nan_bits = _TYPES[x.dtype]
    s_bits, m_bits = scale.view(view), minimum.view(view)
    if spec.axis == -1:
        n_groups = x.numel() // G
        block = max(1, TILE // G)
        _quantize_rows_kernel[(triton.cdiv(n_groups, block),)](
            x, packed, s_bits, m_bits, n_groups, packed, 1, G=G, BITS=bits, BLOCK_G=block,
            DT=dt, IT=it, NAN_BITS=nan_bits, HAS_SLOTS=False, **QUANTIZE_OPTIONS)
    else:
        rows, t, d = _rows_t_d(tuple(x.shape))
        block_d = _col_block(d, G)
        grid = (rows * (t // G), triton.cdiv(d, block_d))
        _quantize_cols_kernel[grid](
            x, packed, s_bits, m_bits, t, d, G=G, BITS=bits, BLOCK_D=block_d,
            DT=dt, IT=it, NAN_BITS=nan_bits, **QUANTIZE_OPTIONS)


def dequantize_into(packed, scale, minimum, out: torch.Tensor, spec) -> None:
    """packed/scale/minimum (grouped layout) -> out ``[..., T, D]``."""
    check_group_size(spec.group_size)
    G, bits = spec.group_size, spec.bits
    dt, it, view, _ = _TYPES[out.dtype]
    s_bits, m_bits, y_bits = scale.view(view), minimum.view(view), out.view(view)
    if spec.axis == -1:
        n_groups = out.numel() // G
        block = max(1, TILE // G)
        _dequantize_rows_kernel[(triton.cdiv(n_groups, block),)](
            packed, s_bits, m_bits, y_bits, n_groups, packed, 1, G=G, BITS=bits, BLOCK_G=block,
            DT=dt, IT=it, HAS_SLOTS=False)
    else:
        rows, t, d = _rows_t_d(tuple(out.shape))
        block_d = _col_block(d, G)
        grid = (rows * (t // G), triton.cdiv(d, block_d))
        _dequantize_cols_kernel[grid](
            packed, s_bits, m_bits, y_bits, t, d, G=G, BITS=bits, BLOCK_D=block_d,
            DT=dt, IT=it)


def quantize_rows(x: torch.Tensor, packed, scale, minimum, slots: torch.Tensor, spec) -> None:
    """The fused paged write: contiguous rows ``x [N, ...]`` (per-token groups) quantized into
    rows ``slots[t]`` (int64 on x's device, -1 skips, already validated) of the
    ``[capacity, ...]`` outputs."""
    check_group_size(spec.group_size)
    G, bits = spec.group_size, spec.bits
    dt, it, view, nan_bits = _TYPES[x.dtype]
    n_groups = x.numel() // G
    if n_groups == 0:
        return
    block = max(1, TILE // G)
    _quantize_rows_kernel[(triton.cdiv(n_groups, block),)](
        x, packed, scale.view(view), minimum.view(view), n_groups, slots,
        n_groups // x.shape[0], G=G, BITS=bits, BLOCK_G=block, DT=dt, IT=it,
        NAN_BITS=nan_bits, HAS_SLOTS=True, **QUANTIZE_OPTIONS)


def dequantize_rows(packed, scale, minimum, out: torch.Tensor, rows: torch.Tensor, spec) -> None:
    """The fused paged gather: rows ``rows[t]`` (int64 on out's device, -1 leaves row t alone,
    already validated) of the ``[capacity, ...]`` inputs dequantized into rows of ``out``."""
    check_group_size(spec.group_size)
    G, bits = spec.group_size, spec.bits
    dt, it, view, _ = _TYPES[out.dtype]
    n_groups = out.numel() // G
    if n_groups == 0:
        return
    block = max(1, TILE // G)
    _dequantize_rows_kernel[(triton.cdiv(n_groups, block),)](
        packed, scale.view(view), minimum.view(view), out.view(view), n_groups, rows,
        n_groups // out.shape[0], G=G, BITS=bits, BLOCK_G=block, DT=dt, IT=it, HAS_SLOTS=True)
