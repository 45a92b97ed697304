"""CUDA kernels against the reference (runs only where a GPU is visible; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, bits_equal, random_kv, same_values

import thunderkv as tk
from thunderkv import backends

pytestmark = pytest.mark.gpu

CUDA_WHY_NOT = (
    "no CUDA device visible to torch"
    if not torch.cuda.is_available()
    else backends.unavailable_reason("cuda", torch.device("cuda"))
)
requires_cuda = pytest.mark.skipif(CUDA_WHY_NOT is not None, reason=str(CUDA_WHY_NOT))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (8, 128), (4, 32), (4, 128), (4, 2),
                                             (4, 6), (2, 48), (8, 24), (4, 512)])
@pytest.mark.parametrize("axis", [-1, -2])
def test_cuda_bit_exact_with_reference(dtype, bits, group_size, axis, gen):
    x = random_kv((2, 3, 3 * group_size * 2, 5 * group_size), dtype, gen)
    kw = dict(bits=bits, group_size=group_size, axis=axis)
    got = tk.quantize(x.cuda(), backend="cuda", **kw)
    want = tk.quantize(x, backend="reference", **kw)
    assert torch.equal(got.packed.cpu(), want.packed)
    assert bits_equal(got.scale.cpu(), want.scale)
    assert bits_equal(got.minimum.cpu(), want.minimum)
    y = got.dequantize(backend="cuda").cpu()
    assert same_values(y, want.dequantize(backend="reference"))


@requires_cuda
def test_cuda_runs_on_current_stream_and_device():
    x = torch.randn(4, 1024, 128, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q = tk.quantize(x, backend="cuda")
        y = q.dequantize(backend="cuda")
    s.synchronize()
    want = tk.quantize(x.cpu(), backend="reference")
    assert torch.equal(q.packed.cpu(), want.packed)
    assert same_values(y.cpu(), want.dequantize(backend="reference"))
    assert y.device == x.device


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size", [(2, 16), (4, 64), (8, 48), (4, 1024)])
@pytest.mark.parametrize("axis", [-1, -2])
def test_cuda_vector_and_scalar_kernels_agree(dtype, bits, group_size, axis, gen, monkeypatch):
    """The 16-byte-vector kernels (aligned buffers, whole vectors per group; per-channel: 4- or
    16-byte code words) and the one-thread-per-group kernels (THUNDERKV_CUDA_SCALAR=1, or
    misaligned buffers) agree bitwise, NaN/Inf groups included -- and with the reference (two
    kernels sharing one mistake would otherwise agree)."""
    x = random_kv((3, 2 * group_size, 2 * group_size), dtype, gen).cuda()
    kw = dict(bits=bits, group_size=group_size, axis=axis)
    vec = tk.quantize(x, backend="cuda", **kw)
    y_vec = vec.dequantize(backend="cuda")
    monkeypatch.setenv("THUNDERKV_CUDA_SCALAR", "1")
    scalar = tk.quantize(x, backend="cuda", **kw)
    y_scalar = scalar.dequantize(backend="cuda")
    monkeypatch.delenv("THUNDERKV_CUDA_SCALAR")
    assert torch.equal(vec.packed, scalar.packed)
    assert bits_equal(vec.scale, scalar.scale) and bits_equal(vec.minimum, scalar.minimum)
    assert bits_equal(y_vec, y_scalar)
    want = tk.quantize(x.cpu(), backend="reference", **kw)
    assert torch.equal(vec.packed.cpu(), want.packed)
    assert bits_equal(vec.scale.cpu(), want.scale) and bits_equal(vec.minimum.cpu(), want.minimum)
    assert same_values(y_vec.cpu(), want.dequantize(backend="reference"))
    # a misaligned destination (packed one byte into a buffer) takes the scalar kernels
    q = scalar
    buf = torch.zeros(q.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    packed = buf[1:].view(q.packed.shape)
    scale, minimum = torch.empty_like(q.scale), torch.empty_like(q.minimum)
    tk.quantize_into(x, packed, scale, minimum, backend="cuda", **kw)
    assert torch.equal(packed, q.packed)
    assert bits_equal(scale, q.scale) and bits_equal(minimum, q.minimum)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bits,group_size", [
    ((3, 128, 20), 4, 32), ((1, 64, 7), 2, 64), ((2, 5, 96, 33), 8, 16), ((3, 128, 24), 4, 64),
    ((2, 96, 9), 2, 32), ((2, 2, 64, 40), 8, 64), ((1, 64, 16), 2, 64)])
@pytest.mark.parametrize("cols", [None, "regs"])
def test_cuda_per_channel_reads_strided_on_awkward_shapes(dtype, shape, bits, group_size, cols,
                                                          gen, monkeypatch):
    """Per-channel kernels index [R, T, D] directly: channel counts that are not a warp multiple,
    several row dims, every width; with THUNDERKV_CUDA_COLS=regs the register-resident quantize
    (timed against the two-pass kernel by gpu_check.sh) where G is 32 or 64."""
    if cols:
        monkeypatch.setenv("THUNDERKV_CUDA_COLS", cols)
    x = random_kv(shape, dtype, gen)
    kw = dict(bits=bits, group_size=group_size, axis=-2)
    got = tk.quantize(x.cuda(), backend="cuda", **kw)
    want = tk.quantize(x, backend="reference", **kw)
    assert torch.equal(got.packed.cpu(), want.packed)
    assert bits_equal(got.scale.cpu(), want.scale) and bits_equal(got.minimum.cpu(), want.minimum)
    assert same_values(got.dequantize(backend="cuda").cpu(), want.dequantize(backend="reference"))
