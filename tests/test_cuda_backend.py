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
@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (8, 128), (4, 32), (4, 128), (4, 2)])
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
