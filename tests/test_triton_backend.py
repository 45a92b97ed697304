"""Triton kernels against the reference: under TRITON_INTERPRET=1 on CPU (CI), natively on a
GPU; plus an ahead-of-time compile for sm_80/sm_90 that checks the PTX for the two traps the
interpreter cannot show (approximate division, FMA contraction)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import DTYPES, bits_equal, random_kv, same_values

import thunderkv as tk
from thunderkv import backends

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WHY_NOT = backends.unavailable_reason("triton", DEVICE) if HAVE_TRITON else "no triton"
requires_backend = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def _interpreter_fma_rounds_twice() -> bool:
    """Triton 3.6/3.7's interpreter computes tl.fma with numpy as a*b+c; 3.9's is fused."""
    if DEVICE.type != "cpu" or WHY_NOT is not None:
        return False
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(a, b, c, y):
        tl.store(y, tl.fma(tl.load(a), tl.load(b), tl.load(c)))

    # (1 + 2^-12)^2 - 1 = 2^-11 + 2^-24 exactly; a*b alone rounds the 2^-24 away
    a = torch.tensor([1 + 2.0**-12])
    c, y = torch.tensor([-1.0]), torch.empty(1)
    fma_kernel[(1,)](a, a, c, y)
    return y.item() != 2.0**-11 + 2.0**-24


INTERPRETER_FMA_ROUNDS_TWICE = _interpreter_fma_rounds_twice()


@requires_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (8, 16), (4, 8), (4, 128)])
@pytest.mark.parametrize("axis", [-1, -2])
def test_triton_bit_exact_with_reference(dtype, bits, group_size, axis, gen):
    # small shapes: the interpreter's cost grows with the number of programs
    d = 80 if axis == -2 else 3 * group_size  # 80: not a multiple of the column block
    x = random_kv((2, 2 * group_size, d), dtype, gen)
    kw = dict(bits=bits, group_size=group_size, axis=axis)
    got = tk.quantize(x.to(DEVICE), backend="triton", **kw)
    want = tk.quantize(x, backend="reference", **kw)
    assert torch.equal(got.packed.cpu(), want.packed)
    assert bits_equal(got.scale.cpu(), want.scale)
    assert bits_equal(got.minimum.cpu(), want.minimum)
    if dtype == torch.float32 and INTERPRETER_FMA_ROUNDS_TWICE:
        pytest.skip("this Triton's interpreter evaluates tl.fma as a*b+c (two roundings), so "
                    "float32 dequantize is off by an ulp there; the GPU path is fma.rn.f32")
    assert same_values(got.dequantize(backend="triton").cpu(), want.dequantize(backend="reference"))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda" or WHY_NOT is not None,
                    reason="needs a CUDA device and the triton backend")
def test_triton_runs_on_the_tensors_device_and_current_stream():
    """Triton launches on torch's current device: the backend makes the tensor's device
    current (on a 2-GPU machine x lives on the last GPU while GPU 0 is current), and work
    goes on that device's current stream (a side stream here)."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x = torch.randn(4, 512, 128, device=dev, dtype=torch.float16)
    want = tk.quantize(x.cpu(), backend="reference")
    with torch.cuda.device(0):
        q = tk.quantize(x, backend="triton")
        y = q.dequantize(backend="triton")
    assert q.packed.device == dev and y.device == dev
    assert torch.equal(q.packed.cpu(), want.packed)
    assert same_values(y.cpu(), want.dequantize(backend="reference"))
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        q2 = tk.quantize(x, backend="triton")
        y2 = q2.dequantize(backend="triton")
    s.synchronize()
    assert torch.equal(q2.packed.cpu(), want.packed) and bits_equal(y2.cpu(), y.cpu())


@requires_backend
def test_triton_rejects_unsupported_group_size_before_writing():
    x = torch.randn(2, 96, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two group_size"):
        tk.quantize(x, group_size=48, backend="triton")


@requires_backend
def test_triton_opcheck():
    x = torch.randn(2, 64, 128, dtype=torch.float16, device=DEVICE)
    torch.library.opcheck(torch.ops.thunderkv.quantize.default, (x, 4, 64, -2, "triton"))


@pytest.mark.parametrize("capability", [80, 90])
def test_triton_kernels_compile_for_gpu_without_interpreter_traps(capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "thunderkv.triton_kernels.compile_check", str(capability)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    kernels = json.loads(res.stdout)[str(capability)]
    # 3 dtypes x (rows, rows into slots, cols) x (q, dq), and 5 fused attention variants
    assert len(kernels) == 18 + 5
    for name, facts in kernels.items():
        assert facts["cubin_bytes"] > 0, name
        if name.startswith("attention"):  # float32 products, not TF32 tensor cores
            assert not facts["mma"], f"{name}: TF32 products lose precision"
            assert not facts["approx_div"] and not facts["rcp_approx"], name
            continue
        assert not facts["approx_div"] and not facts["rcp_approx"], f"{name}: approximate division"
        assert not facts["ftz"], f"{name}: flushes subnormals (format v1 keeps them)"
        if name.startswith("quantize"):
            assert facts["div_rn"], f"{name}: scale/reciprocal must use div.rn"
            assert not facts["fma"], f"{name}: FMA contraction changes the codes"
            assert facts["v4_loads"], f"{name}: values must load as 16-byte vectors"
        else:
            assert facts["fma"], f"{name}: dequantize must use a fused multiply-add"
            assert facts["v4_stores"], f"{name}: values must store as 16-byte vectors"
        assert not facts["byte_stores"], f"{name}: codes stored byte by byte"
