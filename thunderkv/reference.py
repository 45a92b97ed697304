"""KV quantization format v1 in plain torch: the executable form of DESIGN.md.

This module is the single source of truth for the format. The tests compare every backend
against it bit for bit, the ``"reference"`` backend calls it, and the benchmarks time it.
Any change to what it computes is a new format version.

Format v1, for ``x`` of shape ``[..., D]`` (float16, bfloat16 or float32), grouped along the
last axis in groups of ``G`` elements, with ``qmax = 2**bits - 1``:

1. ``mn = min(group)``, ``mx = max(group)`` exactly, in x's dtype; a zero (of either sign) is
   taken as +0.0, so an all-zero group always yields ``scale = +0.0`` and ``minimum = +0.0``.
2. ``bad`` = the group holds a NaN or an infinity, or the scale below is not finite.
3. ``scale = rne_to_dtype((f32(mx) - f32(mn)) / f32(qmax))`` (IEEE float32 subtract, divide).
4. ``s = f32(scale)``; ``r = 1 / s`` (correctly rounded float32) if ``s != 0`` else ``0``.
5. ``code = clamp(rint((f32(x) - f32(mn)) * r), 0, qmax)`` with round-half-even ``rint``;
   the clamp maps NaN (``0 * inf``, possible only when ``r`` overflows for a subnormal scale)
   to 0, as C's ``fmaxf`` does.
6. ``bad`` groups store ``scale = NaN`` (the canonical quiet NaN of the dtype), ``minimum = +0.0``
   and all-zero codes, so they dequantize to NaN.

Storage: ``packed`` uint8 ``[..., D * bits / 8]`` with ``8 / bits`` consecutive codes per byte,
the first in the least significant bits; ``scale`` and ``minimum`` are ``[..., D / G]`` in x's
dtype. Dequantize: ``y = rne_to_dtype(fma(f32(code), f32(scale), f32(minimum)))`` with an
exactly rounded float32 fma.

``axis=-2`` (per-channel, KIVI keys) is format v1 applied to ``x.transpose(-1, -2)``.
"""

from __future__ import annotations

import torch

from .format import FormatSpec

__all__ = [
    "quantize",
    "quantize_groups",
    "dequantize",
    "dequantize_groups",
    "pack_codes",
    "unpack_codes",
    "fma_f32",
]


def quantize_groups(
    x: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` along its last axis into unpacked codes.

    Parameters
    ----------
    x : Tensor ``[..., D]``, float16 / bfloat16 / float32, any strides.
    bits, group_size : format parameters (validated by the caller).

    Returns
    -------
    codes : uint8 ``[..., D]`` with values in ``[0, 2**bits - 1]``.
    scale, minimum : ``[..., D // group_size]`` in x's dtype.
    """
    dtype = x.dtype
    qmax = float((1 << bits) - 1)
    lead = x.shape[:-1]
    d = x.shape[-1]
    xg = x.reshape(*lead, d // group_size, group_size)

    finite = torch.isfinite(xg).all(dim=-1)
    mn = xg.amin(dim=-1)
    mx = xg.amax(dim=-1)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    mn = torch.where(mn == 0, zero, mn)  # -0.0 -> +0.0
    mx = torch.where(mx == 0, zero, mx)

    diff = mx.float() - mn.float()
    # A tensor divisor keeps this an IEEE division (no multiply-by-reciprocal shortcut).
    scale = torch.div(diff, torch.full_like(diff, qmax)).to(dtype)  # RNE cast
    s = scale.float()
    bad = ~finite | ~torch.isfinite(s)

    safe = torch.where(s != 0, s, 1.0)
    r = torch.where(s != 0, torch.ones_like(s) / safe, 0.0)  # correctly rounded 1/s
    v = (xg.float() - mn.float().unsqueeze(-1)) * r.unsqueeze(-1)
    v = torch.nan_to_num(v, nan=0.0, posinf=qmax, neginf=0.0)
    codes = torch.round(v).clamp_(0.0, qmax)  # torch.round rounds half to even

    codes = torch.where(bad.unsqueeze(-1), 0.0, codes).to(torch.uint8)
    nan = torch.full((), float("nan"), dtype=dtype, device=x.device)
    scale = torch.where(bad, nan, scale)
    mn = torch.where(bad, zero, mn)
    return codes.reshape(*lead, d), scale, mn


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` into bytes ``[..., D * bits // 8]``, first code in the LSBs."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.to(torch.uint8)
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., P]`` to codes ``[..., P * 8 // bits]``."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed.to(torch.uint8)
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exactly rounded float32 ``a * b + c`` for float32 tensors (broadcasting).

    The product of two float32 values is exact in float64; the float64 sum is turned into a
    round-to-odd result with TwoSum, which then rounds correctly to float32 (53 >= 24 + 2).
    """
    p = a.double() * b.double()
    c64 = c.double()
    s = p + c64
    # TwoSum error term: err = (p + c) - s exactly.
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    bits = s.view(torch.int64)
    inexact_even = (err != 0) & ((bits & 1) == 0) & torch.isfinite(s)
    toward = torch.where(err > 0, float("inf"), float("-inf")).to(torch.float64)
    s = torch.where(inexact_even, torch.nextafter(s, toward), s)
    return s.float()


def dequantize_groups(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Dequantize unpacked codes ``[..., D]`` with ``scale``/``minimum`` ``[..., D // G]``.

    Returns a tensor ``[..., D]`` in the dtype of ``scale``.
    """
    dtype = scale.dtype
    lead = codes.shape[:-1]
    d = codes.shape[-1]
    cg = codes.reshape(*lead, d // group_size, group_size).float()
    y = fma_f32(cg, scale.float().unsqueeze(-1), minimum.float().unsqueeze(-1))
    return y.to(dtype).reshape(*lead, d)


def quantize(
    x: torch.Tensor, spec: FormatSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Format v1 quantize along ``spec.axis``.

    Parameters
    ----------
    x : Tensor ``[..., T, D]`` (or ``[..., D]`` for ``axis=-1``), float16/bfloat16/float32.
    spec : the format parameters (bits, group size, axis).

    Returns
    -------
    packed : uint8 ``[..., D * bits / 8]`` for ``axis=-1``; ``[..., D, T * bits / 8]`` for ``-2``.
    scale, minimum : ``[..., D / G]`` (``[..., D, T / G]`` for ``-2``) in x's dtype.
    """
    xt = x.transpose(-1, -2) if spec.axis == -2 else x
    codes, scale, minimum = quantize_groups(xt, spec.bits, spec.group_size)
    return pack_codes(codes, spec.bits), scale, minimum


def dequantize(
    packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, spec: FormatSpec
) -> torch.Tensor:
    """Inverse of :func:`quantize`: returns a contiguous tensor of the original shape."""
    codes = unpack_codes(packed, spec.bits)
    y = dequantize_groups(codes, scale, minimum, spec.group_size)
    if spec.axis == -2:
        y = y.transpose(-1, -2).contiguous()
    return y
