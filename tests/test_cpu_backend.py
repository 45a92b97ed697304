"""The compiled CPU kernels (every SIMD variant usable here) against the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, bits_equal, random_kv, same_values, ulp

import thunderkv as tk
from thunderkv import reference

GROUPS = {2: (4, 32, 64, 128), 4: (2, 32, 64, 128), 8: (1, 32, 64, 128)}
CASES = [(bits, g) for bits, gs in GROUPS.items() for g in gs] + [(4, 48), (2, 80), (8, 24)]


def assert_same_quantized(a: tk.QuantizedTensor, b: tk.QuantizedTensor) -> None:
    assert torch.equal(a.packed, b.packed), "packed codes differ"
    assert bits_equal(a.scale, b.scale), "scale bits differ"
    assert bits_equal(a.minimum, b.minimum), "minimum bits differ"


def assert_within_one_ulp(y: torch.Tensor, exact: torch.Tensor) -> None:
    assert y.dtype == exact.dtype and y.shape == exact.shape
    assert torch.equal(torch.isnan(y), torch.isnan(exact))
    ok = ~torch.isnan(exact)
    inf = torch.isinf(exact) & ok
    assert torch.equal(y[inf], exact[inf])
    fin = ok & ~inf
    diff = (y[fin].double() - exact[fin].double()).abs()
    assert (diff <= ulp(exact[fin])).all(), f"max error {diff.max().item()} above 1 ulp"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size", CASES)
@pytest.mark.parametrize("axis", [-1, -2])
def test_cpu_bit_exact_with_reference(cpu_variant, dtype, bits, group_size, axis, gen):
    # leading shapes 1 and odd; odd multiples of the group size on both axes
    x = random_kv((1, 3, 3 * group_size, 5 * group_size), dtype, gen)
    kw = dict(bits=bits, group_size=group_size, axis=axis)
    got = tk.quantize(x, backend="cpu", **kw)
    want = tk.quantize(x, backend="reference", **kw)
    assert_same_quantized(got, want)
    y = got.dequantize(backend="cpu")
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_within_one_ulp(y, want.dequantize(backend="reference"))


@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (3, 5, 7, 128), (1, 1, 1, 64), (4099, 64)])
def test_awkward_leading_shapes(cpu_variant, shape, gen):
    # group counts that are not multiples of 16 exercise the SIMD batch tails
    x = random_kv(shape, torch.float16, gen)
    assert_same_quantized(tk.quantize(x, backend="cpu"), tk.quantize(x, backend="reference"))


def test_large_input_uses_threads_and_stays_exact(gen):
    x = random_kv((2, 8, 1024, 128), torch.bfloat16, gen)  # 2M elements: several threads
    got = tk.quantize(x, backend="cpu")
    assert_same_quantized(got, tk.quantize(x, backend="reference"))
    assert same_values(got.dequantize(backend="cpu"), got.dequantize(backend="reference"))


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x[:, ::2],                 # strided leading axis
        lambda x: x[..., 64:192],            # offset slice of the last axis
        lambda x: x.transpose(-1, -2),       # last axis strided
        lambda x: x.flip(-1),                # negative strides
        lambda x: x[:1].expand(3, -1, -1),   # zero stride
    ],
)
def test_non_contiguous_views(cpu_variant, view, gen):
    base = random_kv((4, 128, 256), torch.float32, gen)
    x = view(base)
    for axis in (-1, -2):
        got = tk.quantize(x, axis=axis, group_size=64, backend="cpu")
        want = tk.quantize(x.contiguous(), axis=axis, group_size=64, backend="reference")
        assert_same_quantized(got, want)
        assert got.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_error_bound(cpu_variant, dtype, bits, gen):
    """|y - x| <= scale/2 + code rounding + qmax * (scale's own rounding error) + one ulp of
    the output (up to the group's range where 1/scale overflows float32: tiny subnormal scales).

    The code ``(x - mn) * r`` goes through three float32 roundings (subtract, reciprocal,
    multiply), each off by at most 2**-24 of a value below ~qmax codes: up to 3 * qmax * 2**-24
    codes before ``rint`` (2.3e-5 of a step at 8 bits, 4 * qmax * 2**-24 allowed). The scale is
    rounded into the dtype (by at most half its ulp, subnormals included), so the top code can
    fall short of the maximum by qmax * ulp(scale) / 2 before clamping.
    """
    x = random_kv((8, 64, 128), dtype, gen, specials=False)
    G = 64
    qt = tk.quantize(x, bits=bits, group_size=G, backend="cpu")
    y = qt.dequantize(backend="cpu")
    s = qt.scale.double().repeat_interleave(G, dim=-1)
    s_ulp = ulp(qt.scale).repeat_interleave(G, dim=-1)
    qmax = (1 << bits) - 1
    bound = s * (0.5 + qmax * 2.0**-22) + qmax * s_ulp / 2 + ulp(y)
    # a scale so small (subnormal) that its float32 reciprocal overflows: codes are 0 or qmax
    # (format v1 step 5), so the error is up to the group's range, itself below ~1e-38
    sf = qt.scale.float()
    overflow = ((sf != 0) & torch.isinf(1 / sf)).repeat_interleave(G, dim=-1)
    bound = torch.where(overflow, bound + qmax * s, bound)
    err = (y.double() - x.double()).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item()}"


def test_nan_inf_groups_dequantize_to_nan_only_there(cpu_variant):
    x = torch.linspace(-2, 2, 4 * 64).reshape(4, 64).half()
    x[1, 5] = float("nan")
    x[2, 63] = float("-inf")
    y = tk.quantize(x, backend="cpu").dequantize(backend="cpu")
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


def test_reference_backend_is_the_reference_module(gen):
    x = random_kv((4, 128), torch.float16, gen)
    qt = tk.quantize(x, backend="reference")
    packed, scale, minimum = reference.quantize(x, qt.spec)
    assert torch.equal(qt.packed, packed) and bits_equal(qt.scale, scale)
    assert bits_equal(qt.minimum, minimum)


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 2.0**-149), (torch.bfloat16, 2.0**-133)])
@pytest.mark.parametrize("group_size", [16, 64])
def test_subnormal_scale_with_infinite_reciprocal(cpu_variant, dtype, tiny, group_size, gen):
    """A scale of one subnormal ulp has 1/scale = inf: the codes take the slow, NaN-safe path
    (0 * inf -> code 0). Mixed into a batch of ordinary groups (the 16-group SIMD batch)."""
    x = torch.randn(40, group_size, generator=gen)
    special = torch.zeros(group_size)
    special[1::3] = tiny
    special[2::5] = 15 * tiny
    x[3] = special
    x[21] = special.flip(0)
    x = x.to(dtype)
    got = tk.quantize(x, group_size=group_size, backend="cpu")
    want = tk.quantize(x, group_size=group_size, backend="reference")
    assert_same_quantized(got, want)
    assert got.scale[3, 0].item() > 0 and torch.isinf(1 / got.scale[3, 0].float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [8, 40, 64, 77])
def test_per_channel_with_channel_tails(cpu_variant, dtype, channels, gen):
    """Per-channel kernels take 16 channels at a time; the rest go through the scalar path."""
    x = random_kv((3, 96, channels), dtype, gen)
    for bits in (2, 4, 8):
        got = tk.quantize(x, bits=bits, group_size=32, axis=-2, backend="cpu")
        want = tk.quantize(x, bits=bits, group_size=32, axis=-2, backend="reference")
        assert_same_quantized(got, want)
        assert same_values(got.dequantize(backend="cpu"), want.dequantize(backend="reference"))
