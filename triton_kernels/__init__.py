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
        _launch_quantize_rows(x, packed, s_bits, m_bits, None, spec)
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
        _launch_dequantize_rows(packed, s_bits, m_bits, y_bits, None, spec, out.dtype)
    else:
        rows, t, d = _rows_t_d(tuple(out.shape))
        block_d = _col_block(d, G)
        grid = (rows * (t // G), triton.cdiv(d, block_d))
        _dequantize_cols_kernel[grid](
            packed, s_bits, m_bits, y_bits, t, d, G=G, BITS=bits, BLOCK_D=block_d,
            DT=dt, IT=it)


def _launch_quantize_rows(x, packed, s_bits, m_bits, slots, spec) -> None:
    """The per-token quantize kernel over all of ``x``'s groups; with ``slots`` (one per row of
    ``x``) each row's outputs go to that slot's row."""
    G = spec.group_size
    dt, it, _, nan_bits = _TYPES[x.dtype]
    n_groups = x.numel() // G
    if n_groups == 0:
        return
    block = max(1, TILE // G)
    row_groups = n_groups // x.shape[0] if slots is not None else 1
    _quantize_rows_kernel[(triton.cdiv(n_groups, block),)](
        x, packed, s_bits, m_bits, n_groups, packed if slots is None else slots, row_groups,
        0 if slots is None else packed.shape[0], G=G, BITS=spec.bits, BLOCK_G=block, DT=dt,
        IT=it, NAN_BITS=nan_bits,
        HAS_SLOTS=slots is not None, **QUANTIZE_OPTIONS)


def _launch_dequantize_rows(packed, s_bits, m_bits, y_bits, rows, spec, dtype) -> None:
    """The per-token dequantize kernel into all of ``y_bits`` (``dtype``'s bits); with ``rows``
    (one per row of the output) each output row reads that row of the inputs."""
    G = spec.group_size
    dt, it, _, _ = _TYPES[dtype]
    n_groups = y_bits.numel() // G
    if n_groups == 0:
        return
    block = max(1, TILE // G)
    row_groups = n_groups // y_bits.shape[0] if rows is not None else 1
    _dequantize_rows_kernel[(triton.cdiv(n_groups, block),)](
        packed, s_bits, m_bits, y_bits, n_groups, packed if rows is None else rows, row_groups,
        0 if rows is None else packed.shape[0], G=G, BITS=spec.bits, BLOCK_G=block, DT=dt,
        IT=it, HAS_SLOTS=rows is not None)


def quantize_rows(x: torch.Tensor, packed, scale, minimum, slots: torch.Tensor, spec) -> None:
    """The fused paged write: contiguous rows ``x [N, ...]`` (per-token groups) quantized into
    rows ``slots[t]`` (int64 on x's device; -1, or any slot outside [0, capacity), skips) of
    the ``[capacity, ...]`` outputs."""
    check_group_size(spec.group_size)
    view = _TYPES[x.dtype][2]
    _launch_quantize_rows(x, packed, scale.view(view), minimum.view(view), slots, spec)


def dequantize_rows(packed, scale, minimum, out: torch.Tensor, rows: torch.Tensor, spec) -> None:
    """The fused paged gather: rows ``rows[t]`` (int64 on out's device; ``ZERO_ROW`` (-2)
    zeroes row t, -1 or any other row outside [0, capacity) leaves it alone) of the
    ``[capacity, ...]`` inputs dequantized into rows of ``out``."""
    check_group_size(spec.group_size)
    view = _TYPES[out.dtype][2]
    _launch_dequantize_rows(packed, scale.view(view), minimum.view(view), out.view(view), rows,
                            spec, out.dtype)


ATTENTION_BLOCK_T = 32  # tokens per tile of the fused decode attention
ATTENTION_PROGRAMS = 512  # about this many programs per launch (a few per SM on an H100)


def kivi_decode_attention(q: torch.Tensor, parts, kr: torch.Tensor, vr: torch.Tensor,
                          mask: torch.Tensor | None, *, heads: int, tq: int, group_size: int,
                          bits: int, dtype: torch.dtype, scaling: float) -> torch.Tensor:
    """Fused decode attention (see :mod:`.kivi_attention`) on validated, contiguous tensors.

    ``q`` float32 ``[B, H*R, D]``; ``parts`` = (key packed ``[B, H, D, S*bits/8]``, key scale,
    key minimum ``[B, H, D, S/G]``, value packed ``[B, H, S, D*bits/8]``, value scale, value
    minimum ``[B, H, S, D/G]``), scales in ``dtype``, or None (no history); ``kr``/``vr``
    float32 ``[B, H, Tr, D]``; ``mask`` uint8 ``[B, tq + Tr]`` or None; attends to the first
    ``tq`` quantized tokens. Returns float32 ``[B, H*R, D]`` (zeros where nothing is attended).
    """
    from .kivi_attention import _chunk_kernel

    B, HR, D = q.shape
    R, Tr = HR // heads, kr.shape[2]
    BH = B * heads
    dev = q.device
    tiles = triton.cdiv(tq, ATTENTION_BLOCK_T) if parts is not None else 0
    # history chunks per sequence x KV head: enough programs to fill the GPU, and no more, so
    # the partials written to global memory stay small (one tile per chunk at most 512 / BH)
    tpp = triton.cdiv(tiles, max(1, ATTENTION_PROGRAMS // BH)) if tiles else 1
    ncq = triton.cdiv(tiles, tpp) if tiles else 0
    nc = ncq + triton.cdiv(Tr, ATTENTION_BLOCK_T)
    if nc == 0:
        return torch.zeros_like(q)
    dt, _, int_view, _ = _TYPES[dtype]
    if parts is not None:
        kp, ks, km, vp, vs, vm = parts
        S = kp.shape[-1] * 8 // bits
        ks, km, vs, vm = (t.view(int_view) for t in (ks, km, vs, vm))
    else:  # never read (no history chunk), but typed as if it were
        kp = vp = torch.empty(1, dtype=torch.uint8, device=dev)
        ks = km = vs = vm = torch.empty(1, dtype=int_view, device=dev)
        S, group_size = 0, max(group_size, 1)
    m = torch.empty((BH, nc, R), dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty((BH, nc, R, D), dtype=torch.float32, device=dev)
    _chunk_kernel[(BH, nc)](
        q, kp, ks, km, vp, vs, vm, kr, vr, q if mask is None else mask, m, lsum, acc,
        heads, R, D, tq, Tr, S, ncq, nc, tpp, scaling,
        G=group_size, BITS=bits, DT=dt, HAS_MASK=mask is not None,
        BLOCK_T=ATTENTION_BLOCK_T, BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return merge_chunks(m, lsum, acc).view(B, HR, D)


def merge_chunks(m: torch.Tensor, lsum: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Combine per-chunk softmax partials: ``m``/``lsum`` ``[N, C, R]`` (chunk max, sum of
    ``exp(s - m)``), ``acc`` ``[N, C, R, D]``; returns ``[N, R, D]``, zeros where no chunk
    attended anything (every ``m`` is -inf)."""
    top = m.amax(dim=1, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w = torch.exp(m - top)  # an empty chunk (m = -inf) weighs 0
    total = (w * lsum).sum(dim=1)
    out = (w.unsqueeze(-1) * acc).sum(dim=1)
    return torch.where(total.unsqueeze(-1) > 0, out / total.clamp_min(1e-30).unsqueeze(-1),
                       torch.zeros_like(out))
