"""Decode attention over a KIVI-layout format v1 cache in Triton (the GPU counterpart of
``csrc/cpu/kivi_attention.cpp``; see :mod:`thunderkv.attention` for the layout).

Flash-decoding in two steps. :func:`_chunk_kernel` runs one program per (sequence x KV head,
chunk of tokens): a chunk of the quantized history, walked in tiles of ``BLOCK_T`` tokens with
an online softmax (keys unpacked per channel from
``[D, Tq*bits/8]`` codes, values per token from ``[Tq, D*bits/8]``, each code turned into
``code * scale + minimum`` in float32 in registers, never written out; each packed byte is
loaded once and split by shifts) or of the full-precision
residual (one tile). It computes the chunk's scores for all R query heads of that KV head at
once, their max ``m``, ``l = sum exp(s - m)`` and ``acc = sum exp(s - m) v``. The wrapper sizes
the chunks so that a launch has a few hundred programs whatever the context, which keeps the
partial results (``R x D`` floats per chunk) small next to the cache they summarize;
:func:`merge_chunks` then combines the chunks with the running-max rule in a few torch ops.

Products use ``input_precision="ieee"`` (full float32, no TF32), so the result differs from the
float64 definition by float32 rounding only, as the CPU kernel does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quant import _bits_to_f32


@triton.jit
def _online(m_i, l_i, acc, s, v):
    """Fold one tile's scores ``s`` [R, T] (-inf where not attended) and values ``v`` [T, D]
    into the running max ``m_i``, sum ``l_i`` and weighted sum ``acc`` (online softmax)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing attended yet
    alpha = tl.exp(m_i - m_safe)  # 0 while m_i is -inf
    p = tl.exp(s - m_safe[:, None])  # exp(-inf) = 0 for masked tokens
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _dequant(byte_ptrs, byte_ok, scale_ptrs, min_ptrs, ok, BITS: tl.constexpr,
             DT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``code * scale + minimum`` [ROWS, COLS] in float32 (0 where not ``ok``), the codes loaded
    once per byte from ``byte_ptrs`` [ROWS, COLS * BITS / 8] and split by shifts along the
    last axis (element 2i in the low bits at 4 bits)."""
    PB: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PB) * BITS
    byte = tl.load(byte_ptrs, mask=byte_ok, other=0).to(tl.int32)
    code = tl.reshape((byte[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1),
                      (ROWS, COLS))
    scale = _bits_to_f32(tl.load(scale_ptrs, mask=ok, other=0), DT)
    minimum = _bits_to_f32(tl.load(min_ptrs, mask=ok, other=0), DT)
    return tl.where(ok, code.to(tl.float32) * scale + minimum, 0.0)


@triton.jit
def _quant_tile(q, tile, bh, b, kp_ptr, ks_ptr, km_ptr, vp_ptr, vs_ptr, vm_ptr, mask_ptr,
                D, Tq, Tr, S, scaling, offs_d, d_ok, offs_t,
                G: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores [R, T] (-inf where not attended) and values [T, D] of quantized tile ``tile``."""
    PB: tl.constexpr = 8 // BITS  # codes per byte
    t = tile * BLOCK_T + offs_t
    t_ok = t < Tq
    # keys, per channel: each row d holds the codes of consecutive tokens (Tq is a multiple of
    # G, so a byte is all in or all out)
    jt = tl.arange(0, BLOCK_T // PB)
    kd_ok = d_ok[:, None] & t_ok[None, :]  # [D, T]
    kidx = (bh * D + offs_d[:, None]) * (S // G) + t[None, :] // G
    k = _dequant(kp_ptr + (bh * D + offs_d[:, None]) * (S // PB) + tile * (BLOCK_T // PB)
                 + jt[None, :], d_ok[:, None] & ((tile * BLOCK_T + jt * PB) < Tq)[None, :],
                 ks_ptr + kidx, km_ptr + kidx, kd_ok, BITS, DT, BLOCK_D, BLOCK_T)
    # values, per token: each row t holds its head_dim codes
    jd = tl.arange(0, BLOCK_D // PB)
    vt_ok = t_ok[:, None] & d_ok[None, :]  # [T, D]
    vidx = (bh * S + t[:, None]) * (D // G) + offs_d[None, :] // G
    v = _dequant(vp_ptr + (bh * S + t[:, None]) * (D // PB) + jd[None, :],
                 t_ok[:, None] & (jd * PB < D)[None, :],
                 vs_ptr + vidx, vm_ptr + vidx, vt_ok, BITS, DT, BLOCK_T, BLOCK_D)
    ok = t_ok
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + b * (Tq + Tr) + t, mask=t_ok, other=0) != 0)
    s = tl.dot(q, k, input_precision="ieee") * scaling
    return tl.where(ok[None, :], s, float("-inf")), v


@triton.jit
def _chunk_kernel(
    q_ptr,  # float32 [BH, R, D]
    kp_ptr, ks_ptr, km_ptr,  # keys: uint8 [BH, D, S*BITS/8]; scale/min bits [BH, D, S/G]
    vp_ptr, vs_ptr, vm_ptr,  # values: uint8 [BH, S, D*BITS/8]; scale/min bits [BH, S, D/G]
    kr_ptr, vr_ptr,  # residual: float32 [BH, Tr, D]
    mask_ptr,  # uint8 [B, Tq + Tr] (1 = attend), or any pointer when not HAS_MASK
    m_ptr, l_ptr, acc_ptr,  # out, float32: [BH, NC, R], [BH, NC, R], [BH, NC, R, D]
    H, R, D, Tq, Tr, S, NCQ, NC, TPP, scaling,
    G: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Programs ``c < NCQ`` walk quantized tiles ``c*TPP .. c*TPP+TPP-1`` (those below Tq);
    the others take one residual tile each."""
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: caches past 2 GiB
    c = tl.program_id(1)
    b = bh // H
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    r_ok = offs_r < R
    d_ok = offs_d < D
    q = tl.load(q_ptr + (bh * R + offs_r[:, None]) * D + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    if c < NCQ:  # a run of tiles of the quantized history
        tile = c * TPP
        stop = tl.minimum(tile + TPP, tl.cdiv(Tq, BLOCK_T))  # the last chunk may be shorter
        # a while loop: Triton 3.6's interpreter cannot take a runtime range() bound
        while tile < stop:
            s, v = _quant_tile(q, tile, bh, b, kp_ptr, ks_ptr, km_ptr, vp_ptr, vs_ptr, vm_ptr,
                               mask_ptr, D, Tq, Tr, S, scaling, offs_d, d_ok, offs_t,
                               G, BITS, DT, HAS_MASK, BLOCK_T, BLOCK_D)
            m_i, l_i, acc = _online(m_i, l_i, acc, s, v)
            tile += 1
    else:  # one tile of the full-precision residual
        t = (c - NCQ) * BLOCK_T + offs_t
        t_ok = t < Tr
        k = tl.load(kr_ptr + (bh * Tr + t[None, :]) * D + offs_d[:, None],
                    mask=d_ok[:, None] & t_ok[None, :], other=0.0)  # [D, T]
        v = tl.load(vr_ptr + (bh * Tr + t[:, None]) * D + offs_d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # [T, D]
        ok = t_ok
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * (Tq + Tr) + Tq + t, mask=t_ok, other=0) != 0)
        s = tl.dot(q, k, input_precision="ieee") * scaling  # [R, T]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online(m_i, l_i, acc, s, v)
    out = bh * NC + c
    tl.store(m_ptr + out * R + offs_r, m_i, mask=r_ok)
    tl.store(l_ptr + out * R + offs_r, l_i, mask=r_ok)
    tl.store(acc_ptr + (out * R + offs_r[:, None]) * D + offs_d[None, :], acc,
             mask=r_ok[:, None] & d_ok[None, :])
