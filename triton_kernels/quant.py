"""Format v1 quantize/dequantize in Triton, per-token (axis=-1) and per-channel (axis=-2).

Bit-exactness notes (format v1 is bit-identical across backends):
- the scale division and the reciprocal use ``tl.div_rn`` (Triton's ``/`` on float32 is
  approximate on NVIDIA GPUs);
- ``rint`` is ``(v + 2**23) - 2**23``: exact round-half-even for the values that occur here
  (0 <= v <= 2 * qmax, or +inf), in the interpreter and on the GPU alike;
- NaN codes (``0 * inf`` when a subnormal scale's reciprocal overflows) are mapped to 0 with an
  explicit ``where`` instead of relying on ``maximum``'s NaN rule, which differs between the
  interpreter (numpy) and the GPU;
- scale/minimum/outputs are stored as integer bit patterns, so a bad group's NaN is exactly
  the canonical one the reference writes; float32 -> bfloat16 rounding is done on the bits
  (round half to even), because the interpreter's own conversion truncates; bfloat16 inputs
  are widened on the bits too (the interpreter's conversion mangles subnormals);
- per-channel keys are read with strides from the caller's ``[..., T, D]`` tensor, no copy.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(8388608.0)  # 2**23


@triton.jit
def _to_bits(v, DT: tl.constexpr, IT: tl.constexpr):
    """float32 -> dtype with round-to-nearest-even, returned as the dtype's integer bits."""
    if DT == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        return r.to(tl.int16)
    else:
        return v.to(DT).to(IT, bitcast=True)


@triton.jit
def _bits_to_f32(bits, DT: tl.constexpr):
    if DT == tl.bfloat16:
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return bits.to(DT, bitcast=True).to(tl.float32)


@triton.jit
def _to_f32(x, DT: tl.constexpr, IT: tl.constexpr):
    """Loaded input values -> float32, exactly. bfloat16 goes through its bits: the
    interpreter's own bfloat16 conversion mangles subnormals (1e-38 -> 8.27e-39)."""
    if DT == tl.bfloat16:
        return _bits_to_f32(x.to(IT, bitcast=True), DT)
    else:
        return x.to(tl.float32)


@triton.jit
def _finish_groups(mn, mx, nonfinite, QMAX: tl.constexpr, DT: tl.constexpr, IT: tl.constexpr,
                   NAN_BITS: tl.constexpr):
    """Steps 1-4 of format v1 for a vector of groups: (scale bits, min bits, mn, r, bad)."""
    mn = tl.where(mn == 0.0, 0.0, mn)  # -0.0 -> +0.0
    mx = tl.where(mx == 0.0, 0.0, mx)
    scale = _to_bits(tl.div_rn(mx - mn, tl.full(mx.shape, QMAX, tl.float32)), DT, IT)
    s = _bits_to_f32(scale, DT)
    bad = nonfinite | ((s - s) != 0.0)  # NaN/Inf in the group, or a non-finite scale
    safe = tl.where(s != 0.0, s, 1.0)
    r = tl.where(s != 0.0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), safe), 0.0)
    scale_bits = tl.where(bad, NAN_BITS, scale)
    min_bits = tl.where(bad, 0, _to_bits(mn, DT, IT))  # exact: mn came from the dtype
    mn = tl.where(bad, 0.0, mn)
    r = tl.where(bad, 0.0, r)
    return scale_bits, min_bits, mn, r, bad


@triton.jit
def _codes(x, mn, r, bad, QMAX: tl.constexpr):
    """Step 5 (and 6): int32 codes of x with broadcast mn/r/bad."""
    v = (x - mn) * r
    v = tl.where(v != v, 0.0, v)
    v = (v + MAGIC) - MAGIC  # rint, round half to even
    v = tl.minimum(tl.maximum(v, 0.0), QMAX)
    return tl.where(bad, 0, v.to(tl.int32))


@triton.jit
def _slotted(g, gmask, slots_ptr, row_groups, n_slots, HAS_SLOTS: tl.constexpr):
    """(group index on the slotted side, mask, zero mask) for groups ``g`` of the contiguous
    side: with HAS_SLOTS, row ``g // row_groups`` lives in slot ``slots[row]`` of the paged
    cache's ``n_slots`` rows (a slot outside [0, n_slots) skips the row: -1 marks padding, and
    under CUDA-graph capture nothing else checks them; ZERO_ROW (-2) sets the zero mask, which
    the gather fills with zeros); without, the identity."""
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + g // row_groups, mask=gmask, other=-1)
        ok = gmask & (slot >= 0) & (slot < n_slots)
        return slot * row_groups + (g % row_groups).to(tl.int64), ok, gmask & (slot == -2)
    else:
        return g.to(tl.int64), gmask, gmask & False


@triton.jit
def _quantize_rows_kernel(x_ptr, packed_ptr, scale_ptr, min_ptr, n_groups, slots_ptr, row_groups,
                          n_slots, G: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr,
                          DT: tl.constexpr, IT: tl.constexpr, NAN_BITS: tl.constexpr,
                          HAS_SLOTS: tl.constexpr):
    PB: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    # int64 before the multiply: 2**31 groups (G=8, 32 GiB of fp16) must not wrap negative
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < n_groups
    go, omask, _ = _slotted(g, gmask, slots_ptr, row_groups, n_slots, HAS_SLOTS)  # outputs
    i = tl.arange(0, G)
    x = _to_f32(tl.load(x_ptr + g[:, None].to(tl.int64) * G + i[None, :], mask=gmask[:, None],
                        other=0.0), DT, IT)
    nonfinite = tl.sum(((x - x) != 0.0).to(tl.int32), axis=1) > 0
    scale_bits, min_bits, mn, r, bad = _finish_groups(
        tl.min(x, axis=1), tl.max(x, axis=1), nonfinite, QMAX, DT, IT, NAN_BITS)
    tl.store(scale_ptr + go, scale_bits, mask=omask)
    tl.store(min_ptr + go, min_bits, mask=omask)
    codes = _codes(x, mn[:, None], r[:, None], bad[:, None], QMAX)
    codes = tl.reshape(codes, (BLOCK_G, G // PB, PB))
    shifts = tl.arange(0, PB) * BITS
    packed = tl.sum(codes << shifts[None, None, :], axis=2).to(tl.uint8)
    j = tl.arange(0, G // PB)
    tl.store(packed_ptr + go[:, None] * (G // PB) + j[None, :], packed, mask=omask[:, None])


@triton.jit
def _quantize_cols_kernel(x_ptr, packed_ptr, scale_ptr, min_ptr, T, D,
                          G: tl.constexpr, BITS: tl.constexpr, BLOCK_D: tl.constexpr,
                          DT: tl.constexpr, IT: tl.constexpr, NAN_BITS: tl.constexpr):
    """Per-channel: program (row * T/G + tg, d-block) reads x[row, tg*G:(tg+1)*G, d-block]."""
    PB: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    n_tg = T // G
    row = tl.program_id(0) // n_tg
    tg = tl.program_id(0) % n_tg
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    i = tl.arange(0, G)
    base = row.to(tl.int64) * T * D + (tg * G).to(tl.int64) * D
    x = _to_f32(tl.load(x_ptr + base + i[:, None] * D + d[None, :], mask=dmask[None, :],
                        other=0.0), DT, IT)
    nonfinite = tl.sum(((x - x) != 0.0).to(tl.int32), axis=0) > 0
    scale_bits, min_bits, mn, r, bad = _finish_groups(
        tl.min(x, axis=0), tl.max(x, axis=0), nonfinite, QMAX, DT, IT, NAN_BITS)
    chan = row.to(tl.int64) * D + d  # index of the (row, d) line in the grouped layout
    tl.store(scale_ptr + chan * n_tg + tg, scale_bits, mask=dmask)
    tl.store(min_ptr + chan * n_tg + tg, min_bits, mask=dmask)
    codes = _codes(x, mn[None, :], r[None, :], bad[None, :], QMAX)
    codes = tl.reshape(codes, (G // PB, PB, BLOCK_D))
    shifts = tl.arange(0, PB) * BITS
    packed = tl.sum(codes << shifts[None, :, None], axis=1).to(tl.uint8)
    j = tl.arange(0, G // PB)
    row_bytes = T * BITS // 8
    tl.store(packed_ptr + chan[None, :] * row_bytes + tg * (G // PB) + j[:, None], packed,
             mask=dmask[None, :])


@triton.jit
def _dequantize_rows_kernel(packed_ptr, scale_ptr, min_ptr, y_ptr, n_groups, slots_ptr,
                            row_groups, n_slots, G: tl.constexpr, BITS: tl.constexpr,
                            BLOCK_G: tl.constexpr, DT: tl.constexpr, IT: tl.constexpr,
                            HAS_SLOTS: tl.constexpr):
    PB: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    # int64 before the multiply: 2**31 groups (G=8, 32 GiB of fp16) must not wrap negative
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < n_groups
    gi, imask, zmask = _slotted(g, gmask, slots_ptr, row_groups, n_slots, HAS_SLOTS)  # inputs
    j = tl.arange(0, G // PB)
    p = tl.load(packed_ptr + gi[:, None] * (G // PB) + j[None, :],
                mask=imask[:, None], other=0).to(tl.int32)
    shifts = tl.arange(0, PB) * BITS
    codes = tl.reshape((p[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_G, G))
    s = _bits_to_f32(tl.load(scale_ptr + gi, mask=imask, other=0), DT)
    m = _bits_to_f32(tl.load(min_ptr + gi, mask=imask, other=0), DT)
    y = tl.fma(codes.to(tl.float32), s[:, None], m[:, None])
    y = tl.where(zmask[:, None], 0.0, y)  # ZERO_ROW rows: +0.0 (their loads were masked off)
    i = tl.arange(0, G)
    tl.store(y_ptr + g[:, None].to(tl.int64) * G + i[None, :],
             _to_bits(y, DT, IT), mask=(imask | zmask)[:, None])


@triton.jit
def _dequantize_cols_kernel(packed_ptr, scale_ptr, min_ptr, y_ptr, T, D,
                            G: tl.constexpr, BITS: tl.constexpr, BLOCK_D: tl.constexpr,
                            DT: tl.constexpr, IT: tl.constexpr):
    PB: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    n_tg = T // G
    row = tl.program_id(0) // n_tg
    tg = tl.program_id(0) % n_tg
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    chan = row.to(tl.int64) * D + d
    j = tl.arange(0, G // PB)
    row_bytes = T * BITS // 8
    p = tl.load(packed_ptr + chan[None, :] * row_bytes + tg * (G // PB) + j[:, None],
                mask=dmask[None, :], other=0).to(tl.int32)
    shifts = tl.arange(0, PB) * BITS
    codes = tl.reshape((p[:, None, :] >> shifts[None, :, None]) & MASK, (G, BLOCK_D))
    s = _bits_to_f32(tl.load(scale_ptr + chan * n_tg + tg, mask=dmask, other=0), DT)
    m = _bits_to_f32(tl.load(min_ptr + chan * n_tg + tg, mask=dmask, other=0), DT)
    y = tl.fma(codes.to(tl.float32), s[None, :], m[None, :])
    i = tl.arange(0, G)
    base = row.to(tl.int64) * T * D + (tg * G).to(tl.int64) * D
    tl.store(y_ptr + base + i[:, None] * D + d[None, :], _to_bits(y, DT, IT),
             mask=dmask[None, :])
