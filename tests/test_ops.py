"""torch.library registration: opcheck on every op, and torch.compile through the ops."""

from __future__ import annotations

import pytest
import torch
from helpers import bits_equal, random_kv, same_values

import thunderkv as tk
from thunderkv import _ops  # noqa: F401  (registers the ops)
from thunderkv.format import FormatSpec

OPS = torch.ops.thunderkv


def _inputs(gen, dtype=torch.float16):
    # no NaN/Inf: opcheck compares eager and traced outputs with assert_close (NaN != NaN)
    return random_kv((3, 64, 128), dtype, gen, specials=False)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_opcheck_quantize_and_dequantize(backend, dtype, gen):
    x = _inputs(gen, dtype)
    torch.library.opcheck(OPS.quantize.default, (x, 4, 64, -1, backend))
    packed, scale, minimum = OPS.quantize(x, 4, 64, -1, backend)
    torch.library.opcheck(OPS.dequantize.default, (packed, scale, minimum, 4, 64, -1, backend))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_destination_ops(backend, gen):
    x = _inputs(gen)
    spec = FormatSpec(2, 32, -2)
    packed = torch.empty(spec.packed_shape(x.shape), dtype=torch.uint8)
    scale = torch.empty(spec.param_shape(x.shape), dtype=x.dtype)
    minimum = torch.empty_like(scale)
    torch.library.opcheck(
        OPS.quantize_into.default, (x, packed, scale, minimum, 2, 32, -2, backend)
    )
    out = torch.empty_like(x)
    torch.library.opcheck(
        OPS.dequantize_into.default, (packed, scale, minimum, out, 2, 32, -2, backend)
    )


def test_torch_compile_round_trip_on_cpu(gen):
    def round_trip(x):
        q = tk.quantize(x, bits=4, group_size=64, backend="cpu")
        return tk.dequantize(q, backend="cpu") * 2

    x = _inputs(gen)
    compiled = torch.compile(round_trip, fullgraph=True)
    assert same_values(compiled(x), round_trip(x))


def test_fake_tensor_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 256, 128, dtype=torch.bfloat16)
        packed, scale, minimum = OPS.quantize(x, 4, 64, -1, "auto")
        y = OPS.dequantize(packed, scale, minimum, 4, 64, -1, "auto")
    assert packed.shape == (2, 8, 256, 64) and scale.shape == (2, 8, 256, 2)
    with FakeTensorMode():
        x = torch.empty(2, 8, 256, 128, dtype=torch.float16)
        p2, s2, _ = OPS.quantize(x, 2, 32, -2, "auto")
        y2 = OPS.dequantize(p2, s2, s2, 2, 32, -2, "auto")
    assert p2.shape == (2, 8, 128, 64) and s2.shape == (2, 8, 128, 8) and y2.shape == x.shape
    assert y.shape == x.shape and y.dtype == torch.bfloat16


def test_ops_and_api_agree(gen):
    x = _inputs(gen)
    q = tk.quantize(x, backend="cpu")
    packed, scale, minimum = OPS.quantize(x, 4, 64, -1, "cpu")
    assert torch.equal(q.packed, packed) and bits_equal(q.scale, scale)
    assert bits_equal(q.minimum, minimum)


def test_backward_through_the_ops_says_why_there_is_no_gradient(gen):
    """Inputs that require grad pass forward (an HF model run outside no_grad hands such K/V to
    the cache), and opcheck's autograd-registration test passes on them; backward used to end
    in torch's generic "no autograd formula was registered"."""
    x = torch.randn(2, 8, 64, generator=gen, requires_grad=True)
    torch.library.opcheck(OPS.quantize.default, (x, 4, 32, -1, "cpu"),
                          test_utils=("test_schema", "test_autograd_registration"))
    q = tk.quantize(x, bits=4, group_size=32)
    assert q.scale.requires_grad and not q.packed.requires_grad
    want = tk.quantize(x.detach(), bits=4, group_size=32)
    assert bits_equal(q.scale.detach(), want.scale) and bits_equal(q.packed, want.packed)
    with pytest.raises(RuntimeError, match="thunderkv.quantize has no gradient.*detach"):
        q.minimum.sum().backward()
    y = q.dequantize()
    assert y.requires_grad and bits_equal(y.detach(), want.dequantize())
    with pytest.raises(RuntimeError, match="thunderkv.dequantize has no gradient"):
        y.sum().backward()
