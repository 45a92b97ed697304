"""Format v1 reference: hand-computed golden vectors and an independent numpy oracle.

These pin the format itself: changing the nibble order, a rounding mode, the scale dtype or
the treatment of zeros/NaN in thunderkv/reference.py makes one of them fail.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import DTYPES, bits_equal, random_kv

from thunderkv import reference
from thunderkv.format import FormatSpec


def q(x, bits=4, group_size=16, axis=-1):
    return reference.quantize(x, FormatSpec(bits, group_size, axis))


# ---------------------------------------------------------------- golden vectors


def test_nibble_order_first_code_in_low_bits():
    x = torch.arange(16, dtype=torch.float32)  # min 0, max 15 -> scale 1, codes 0..15
    packed, scale, minimum = q(x)
    assert packed.tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert scale.item() == 1.0 and minimum.item() == 0.0


def test_two_bit_order():
    x = torch.tensor([0.0, 1, 2, 3] * 4)
    packed, _, _ = q(x, bits=2)
    assert packed.tolist() == [0b11100100] * 4


def test_eight_bit_is_identity_on_integers():
    x = torch.arange(256, dtype=torch.float32)
    packed, scale, _ = q(x, bits=8, group_size=256)
    assert packed.tolist() == list(range(256)) and scale.item() == 1.0


def test_rint_rounds_half_to_even():
    # scale 1, min 0: codes are rint(x). Half-up would give 1, 2, 3, 4, 5.
    x = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5, 4.5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    codes = reference.unpack_codes(q(x)[0], 4)
    assert codes[:6].tolist() == [0, 0, 2, 2, 4, 4]


@pytest.mark.parametrize(
    "dtype,bits_hex", [(torch.float16, 0x2C44), (torch.bfloat16, 0x3D89)]
)
def test_scale_is_rounded_to_nearest_even_in_input_dtype(dtype, bits_hex):
    # (1 - 0) / 15 = 0.0666...: fp16 0x2C44 (0.06665), bf16 0x3D89 (0.06689).
    x = torch.zeros(16, dtype=dtype)
    x[3] = 1.0
    _, scale, minimum = q(x)
    assert scale.dtype == dtype and minimum.dtype == dtype
    assert scale.view(torch.int16).item() == bits_hex


def test_signed_zeros_give_positive_zero_params():
    x = torch.full((32,), -0.0, dtype=torch.float16)
    x[16:] = 0.0
    x[20] = -0.0
    packed, scale, minimum = q(x)
    assert scale.view(torch.int16).tolist() == [0, 0]
    assert minimum.view(torch.int16).tolist() == [0, 0]
    assert packed.tolist() == [0] * 16


@pytest.mark.parametrize("dtype,nan_bits", [(torch.float16, 0x7E00), (torch.bfloat16, 0x7FC0)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_bad_group_is_canonical_nan_and_only_that_group(dtype, nan_bits, bad):
    x = torch.linspace(-1, 1, 48).to(dtype)
    x[20] = bad  # second group of 16
    packed, scale, minimum = q(x)
    assert scale.view(torch.int16)[1].item() == nan_bits
    assert minimum.view(torch.int16)[1].item() == 0
    assert packed[8:16].tolist() == [0] * 8
    y = reference.dequantize(packed, scale, minimum, FormatSpec(4, 16))
    assert torch.isnan(y[16:32]).all()
    assert torch.isfinite(y[:16]).all() and torch.isfinite(y[32:]).all()


def test_float32_overflowing_range_is_bad():
    x = torch.zeros(16)
    x[0], x[1] = -3e38, 3e38  # mx - mn overflows float32
    _, scale, minimum = q(x)
    assert math.isnan(scale.item()) and minimum.item() == 0.0


def test_subnormal_scale_with_infinite_reciprocal():
    # float32: range 15 * 2^-149 -> scale = 2^-149 (smallest subnormal), 1/scale = inf.
    # (x - mn) * inf is NaN for x == mn (clamped to code 0) and +inf (code 15) otherwise.
    tiny = 2.0**-149
    x = torch.tensor([0.0, tiny, 15 * tiny] + [0.0] * 13)
    packed, scale, _ = q(x)
    assert scale.item() == tiny
    assert reference.unpack_codes(packed, 4)[:4].tolist() == [0, 15, 15, 0]


def test_per_channel_is_format_applied_to_transpose(gen):
    x = random_kv((2, 64, 16), torch.float16, gen)
    a = reference.quantize(x, FormatSpec(4, 32, -2))
    b = reference.quantize(x.transpose(-1, -2), FormatSpec(4, 32, -1))
    assert all(bits_equal(u, v) for u, v in zip(a, b))
    assert a[0].shape == (2, 16, 32) and a[1].shape == (2, 16, 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits, gen):
    codes = torch.randint(0, 1 << bits, (5, 64), generator=gen, dtype=torch.uint8)
    packed = reference.pack_codes(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(reference.unpack_codes(packed, bits), codes)


# ---------------------------------------------------------------- exactly rounded fma


def _round_to_f32(value: Fraction) -> float:
    """Nearest float32 to an exact rational, ties to even (brute force over neighbours)."""
    guess = np.float32(float(value))
    cands = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    best = min(
        cands,
        key=lambda c: (abs(Fraction(float(c)) - value), int(np.float32(c).view(np.uint32)) & 1),
    )
    return float(best)


def test_fma_f32_is_exactly_rounded(gen):
    a = torch.randint(0, 256, (3000,), generator=gen).float()
    b = (torch.randn(3000, generator=gen) * torch.exp2(torch.randint(-20, 20, (3000,), generator=gen).float())).float()
    c = (torch.randn(3000, generator=gen) * 1000).float()
    got = reference.fma_f32(a, b, c)
    for i in range(3000):
        exact = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        assert got[i].item() == _round_to_f32(exact), i


# ---------------------------------------------------------------- independent numpy oracle


def _round_dtype(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 -> dtype (RNE) -> float32, written independently of torch."""
    if dtype == torch.float16:
        return v.astype(np.float16).astype(np.float32)
    if dtype == torch.bfloat16:
        u = v.view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        out = (u & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        return np.where(np.isnan(v), np.float32(np.nan), out)
    return v


def numpy_oracle(x: torch.Tensor, bits: int, G: int):
    """Format v1 in numpy float32 arithmetic: (codes, scale, minimum) as float32 arrays."""
    qmax = np.float32((1 << bits) - 1)
    xg = x.float().numpy().reshape(-1, G)
    with np.errstate(all="ignore"):
        bad = ~np.isfinite(xg).all(axis=1)
        mn = xg.min(axis=1) + np.float32(0)  # -0 + 0 = +0
        mx = xg.max(axis=1) + np.float32(0)
        scale = _round_dtype((mx - mn) / qmax, x.dtype)
        bad |= ~np.isfinite(scale)
        r = np.where(scale != 0, np.float32(1) / np.where(scale != 0, scale, 1), 0).astype(np.float32)
        v = (xg - mn[:, None]) * r[:, None]
        codes = np.fmin(np.fmax(np.rint(v), np.float32(0)), qmax)
    codes = np.where(bad[:, None], 0, codes).astype(np.uint8)
    scale = np.where(bad, np.float32(np.nan), scale)
    mn = np.where(bad, np.float32(0), mn)
    return codes, scale, mn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,G", [(2, 32), (4, 64), (8, 128), (4, 16), (2, 4), (4, 2)])
def test_reference_matches_numpy_oracle(dtype, bits, G, gen):
    x = random_kv((3, 17, 128), dtype, gen)
    packed, scale, minimum = reference.quantize(x, FormatSpec(bits, G))
    codes, o_scale, o_min = numpy_oracle(x, bits, G)
    assert np.array_equal(reference.unpack_codes(packed, bits).numpy().reshape(-1, G), codes)
    assert np.array_equal(scale.float().numpy().reshape(-1), o_scale, equal_nan=True)
    assert np.array_equal(minimum.float().numpy().reshape(-1), o_min)
