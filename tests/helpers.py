"""Shared test utilities: awkward random KV data, bitwise comparison, ulp distances."""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when both tensors have the same dtype, shape and bit patterns (NaN payloads too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = INT_VIEW.get(a.dtype)
    if view is None:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical except that any NaN matches any NaN (payloads are not part of format v1's
    dequantize contract: torch itself writes bfloat16 NaN as 0x7FC0 or 0xFFFF by code path)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    return bits_equal(torch.where(nan_a, 0, a), torch.where(nan_b, 0, b))


def random_kv(shape, dtype, gen: torch.Generator, *, specials: bool = True) -> torch.Tensor:
    """Random KV-like data with the cases that break quantizers.

    Mixes normal data with per-row scale spread over many binades, outliers, constant rows,
    all-zero rows of both signs, tiny rows (subnormal fp16 scales; fp32/bf16 scales whose
    reciprocal overflows), values on the rounding ties of
    a unit scale, and (``specials``) NaN/Inf entries.
    """
    n = 1
    for s in shape:
        n *= s
    d = shape[-1]
    rows = max(1, n // d)
    x = torch.randn(rows, d, generator=gen, dtype=torch.float32)
    spread = torch.exp2(torch.randint(-12, 9, (rows, 1), generator=gen).float())
    x = x * spread
    k = rows
    pick = lambda: int(torch.randint(0, k, (1,), generator=gen))  # noqa: E731
    if rows >= 8:
        x[pick()] = 3.0                                  # constant row: scale 0
        x[pick()] = 0.0                                  # +0 row
        x[pick()] = -0.0                                 # -0 row
        x[pick()] = torch.randn(d, generator=gen) * 1e-7  # tiny range (fp16 subnormals)
        x[pick()] = torch.randn(d, generator=gen) * 1e-38  # fp32/bf16: subnormal inputs/scale
        x[pick()] = torch.randn(d, generator=gen) * 1e-40  # fp32/bf16: 1/scale overflows to inf
        r = pick()
        x[r] = torch.randint(0, 31, (d,), generator=gen).float() / 2  # ties at scale 1 (4 bit)
        x[r, 0], x[r, -1] = 0.0, 15.0
        r = pick()
        x[r, int(torch.randint(0, d, (1,), generator=gen))] = 1e4  # outlier
    if specials and rows >= 4:
        x[pick(), int(torch.randint(0, d, (1,), generator=gen))] = float("nan")
        x[pick(), int(torch.randint(0, d, (1,), generator=gen))] = float("inf")
        x[pick(), int(torch.randint(0, d, (1,), generator=gen))] = float("-inf")
    return x.reshape(shape).to(dtype)


def ulp(y: torch.Tensor) -> torch.Tensor:
    """Distance from |y| to the next representable value of y's dtype, as float64."""
    a = y.abs()
    nxt = torch.nextafter(a, torch.full_like(a, float("inf")))
    return (nxt.double() - a.double())
