"""Public API behaviour: QuantizedTensor, destination passing, and bad input (clear errors,
nothing written)."""

from __future__ import annotations

import pytest
import torch
from helpers import bits_equal, random_kv

import thunderkv as tk
from thunderkv.format import FormatSpec

BACKENDS_HERE = ["reference", "cpu"]


def test_quantized_tensor_fields_and_nbytes(gen):
    x = random_kv((2, 4, 128, 64), torch.bfloat16, gen)
    q = tk.quantize(x, bits=4, group_size=32, axis=-2)
    assert (q.bits, q.group_size, q.axis) == (4, 32, -2)
    assert q.shape == x.shape and q.dtype == torch.bfloat16
    assert q.packed.shape == (2, 4, 64, 64) and q.packed.dtype == torch.uint8
    assert q.scale.shape == q.minimum.shape == (2, 4, 64, 4)
    assert q.nbytes == q.packed.numel() + 2 * 2 * q.scale.numel()
    assert q.nbytes == pytest.approx(x.numel() * FormatSpec(4, 32).bytes_per_element(x.dtype))


def test_compression_ratio_matches_design():
    # 4-bit, fp16, G=64: 0.5625 B per element vs 2 B -> 3.56x
    assert FormatSpec(4, 64).bytes_per_element(torch.float16) == 0.5625


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_into_matches_quantize(backend, axis, gen):
    x = random_kv((3, 128, 64), torch.float16, gen)
    spec = FormatSpec(4, 64, axis)
    packed = torch.empty(spec.packed_shape(x.shape), dtype=torch.uint8)
    scale = torch.empty(spec.param_shape(x.shape), dtype=x.dtype)
    minimum = torch.empty_like(scale)
    tk.quantize_into(x, packed, scale, minimum, axis=axis, backend=backend)
    q = tk.quantize(x, axis=axis, backend=backend)
    assert torch.equal(packed, q.packed) and bits_equal(scale, q.scale)
    assert bits_equal(minimum, q.minimum)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("axis", [-1, -2])
def test_dequantize_out(backend, axis, gen):
    x = random_kv((2, 64, 128), torch.float32, gen, specials=False)
    q = tk.quantize(x, axis=axis, backend=backend)
    out = torch.empty_like(x)
    res = tk.dequantize(q, out=out, backend=backend)
    assert res is out
    assert bits_equal(out, q.dequantize(backend=backend))


# ---------------------------------------------------------------- bad input


def _buffers(x, spec=None):
    spec = spec or FormatSpec()
    packed = torch.full(spec.packed_shape(x.shape), 0xAB, dtype=torch.uint8)
    scale = torch.full(spec.param_shape(x.shape), 7.0, dtype=x.dtype)
    minimum = torch.full(spec.param_shape(x.shape), -7.0, dtype=x.dtype)
    return packed, scale, minimum


def _untouched(packed, scale, minimum):
    return (packed == 0xAB).all() and (scale == 7.0).all() and (minimum == -7.0).all()


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(bits=3), ValueError, "bits"),
        (dict(bits=16), ValueError, "bits"),
        (dict(bits=4.0), TypeError, "bits"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(group_size=3), ValueError, "multiple of 8"),
        (dict(group_size=48), ValueError, "not divisible by group_size"),
        (dict(axis=0), ValueError, "axis"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_parameters_raise_and_write_nothing(kwargs, exc, words):
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(exc, match=words):
        tk.quantize(x, **kwargs)
    packed, scale, minimum = _buffers(x)
    with pytest.raises(exc, match=words):
        tk.quantize_into(x, packed, scale, minimum, **kwargs)
    assert _untouched(packed, scale, minimum)


@pytest.mark.parametrize(
    "x,exc,words",
    [
        (torch.zeros(2, 64, dtype=torch.float64), TypeError, "float16, bfloat16 or float32"),
        (torch.zeros(2, 64, dtype=torch.int32), TypeError, "float16, bfloat16 or float32"),
        (torch.zeros(0, 64, dtype=torch.float16), ValueError, "empty"),
        (torch.zeros(2, 0, dtype=torch.float16), ValueError, "empty"),
        (torch.zeros(2, 100, dtype=torch.float16), ValueError, "not divisible"),
        ([1.0] * 64, TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(x, exc, words):
    with pytest.raises(exc, match=words):
        tk.quantize(x)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize(
    "which,make,exc,words",
    [
        ("packed", lambda p: p[..., :-1], ValueError, "packed must have shape"),
        ("packed", lambda p: p.to(torch.int8), TypeError, "packed must have dtype"),
        ("packed", lambda p: torch.empty(p.shape[::-1], dtype=p.dtype).t(), ValueError, "contiguous"),
        ("scale", lambda s: s.float(), TypeError, "scale must have dtype"),
        ("scale", lambda s: s[:1], ValueError, "scale must have shape"),
        ("minimum", lambda m: m.reshape(-1), ValueError, "minimum must have shape"),
        ("minimum", lambda m: m.to("meta"), ValueError, "same device"),
    ],
)
def test_bad_destinations_raise_and_write_nothing(backend, which, make, exc, words):
    x = torch.randn(4, 128, dtype=torch.float16)
    bufs = dict(zip(("packed", "scale", "minimum"), _buffers(x)))
    bufs[which] = make(bufs[which])
    with pytest.raises(exc, match=words):
        tk.quantize_into(x, bufs["packed"], bufs["scale"], bufs["minimum"], backend=backend)
    good = dict(zip(("packed", "scale", "minimum"), _buffers(x)))
    for name, t in bufs.items():
        if name != which:
            assert torch.equal(t, good[name]), f"{name} was written"


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda x: torch.empty(4, 64, dtype=torch.float16), ValueError, "out must have shape"),
        (lambda x: torch.empty_like(x, dtype=torch.float32), TypeError, "out must have dtype"),
        (lambda x: torch.empty(128, 4, dtype=torch.float16).t(), ValueError, "contiguous"),
    ],
)
def test_bad_dequantize_out_writes_nothing(make, exc, words):
    x = torch.randn(4, 128, dtype=torch.float16)
    q = tk.quantize(x)
    out = make(x)
    before = out.clone()
    with pytest.raises(exc, match=words):
        tk.dequantize(q, out=out)
    assert bits_equal(out, before)


def test_mismatched_quantized_parts_are_rejected():
    x = torch.randn(4, 128, dtype=torch.float16)
    q = tk.quantize(x)
    bad = tk.QuantizedTensor(q.packed, q.scale[:2], q.minimum, q.spec, q.shape, q.dtype)
    with pytest.raises(ValueError, match="scale must have shape"):
        tk.dequantize(bad)
    bad = tk.QuantizedTensor(q.packed, q.scale, q.minimum.float(), q.spec, q.shape, q.dtype)
    with pytest.raises(TypeError, match="minimum must have scale's dtype"):
        tk.dequantize(bad)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        tk.dequantize(x)


def test_forced_backend_on_wrong_device_says_why():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors"):
        tk.quantize(x, backend="cuda")


def test_non_contiguous_input_is_not_modified(gen):
    base = random_kv((4, 64, 128), torch.float16, gen)
    x = base[:, ::2]
    before = base.clone()
    tk.quantize(x, backend="cpu")
    assert bits_equal(base, before)


def test_eager_calls_skip_the_dispatcher_only_when_it_is_safe(gen):
    """Plain eager tensors run the ops' bodies directly; anything autograd or a tensor
    subclass might care about goes through the registered custom ops -- same results."""
    from thunderkv import _ops

    x = torch.randn(4, 64, generator=gen)
    assert _ops.eager_ok(x)
    p = torch.nn.Parameter(x.clone())
    assert not _ops.eager_ok(p)  # requires grad (and a subclass)
    with torch.no_grad():
        assert not _ops.eager_ok(p)  # still a Parameter subclass
    q_eager = tk.quantize(x, bits=4, group_size=32)
    q_op = tk.quantize(p, bits=4, group_size=32)
    assert torch.equal(q_eager.packed, q_op.packed) and torch.equal(q_eager.scale, q_op.scale)
    assert torch.equal(q_eager.dequantize(), tk.dequantize(q_op))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_aliased_buffers_raise_and_write_nothing(backend):
    """Outputs that share memory with each other or with the input would be written over
    while still being read or written: refused, on the public API and on the op."""
    x = torch.randn(4, 128, dtype=torch.float16)
    packed, scale, minimum = _buffers(x)
    before = [t.clone() for t in (packed, scale)]
    with pytest.raises(ValueError, match="scale and minimum share memory"):
        tk.quantize_into(x, packed, scale, scale, backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        torch.ops.thunderkv.quantize_into(x, packed, scale, scale, 4, 64, -1, backend)
    both = torch.empty(2 * scale.numel() - 1, dtype=scale.dtype)  # overlapping by one element
    with pytest.raises(ValueError, match="scale and minimum share memory"):
        tk.quantize_into(x, packed, both[:scale.numel()].view(scale.shape),
                         both[scale.numel() - 1:].view(scale.shape), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip((packed, scale), before))
    # an input that is also an output
    flat = torch.randn(4 * 128 + 8, dtype=torch.float16)
    xs = flat[:4 * 128].view(4, 128)
    with pytest.raises(ValueError, match="x and scale share memory"):
        tk.quantize_into(xs, packed, flat[4 * 128 - 4:4 * 128 + 4].view(scale.shape), minimum,
                         backend=backend)
    # adjacent, not overlapping: fine, and each gets its own values
    both = torch.empty(2 * scale.numel(), dtype=scale.dtype)
    tk.quantize_into(x, packed, both[:scale.numel()].view(scale.shape),
                     both[scale.numel():].view(scale.shape), backend=backend)
    want = tk.quantize(x, backend="reference")
    assert torch.equal(packed, want.packed)
    assert bits_equal(both[:scale.numel()].view(scale.shape), want.scale)
    assert bits_equal(both[scale.numel():].view(scale.shape), want.minimum)


def test_dequantize_out_over_its_own_codes_is_refused():
    x = torch.randn(4, 128, dtype=torch.float16)
    q = tk.quantize(x)
    store = torch.empty(x.numel(), dtype=torch.float16)  # 1024 bytes: room for the codes too
    codes = store.view(torch.uint8)[:q.packed.numel()].view(q.packed.shape)
    codes.copy_(q.packed)
    aliased = tk.QuantizedTensor(codes, q.scale, q.minimum, q.spec, q.shape, q.dtype)
    with pytest.raises(ValueError, match="out and packed share memory"):
        tk.dequantize(aliased, out=store.view(x.shape))
    assert torch.equal(codes, q.packed)


def test_shapes_the_format_cannot_group_raise():
    with pytest.raises(ValueError, match="not divisible by group_size = 64"):
        FormatSpec(4, 64).param_shape((2, 100))
    with pytest.raises(ValueError, match="not divisible by group_size = 64"):
        FormatSpec(4, 64, axis=-2).packed_shape((2, 100, 128))
    with pytest.raises(ValueError, match="at least 2 dimension"):
        FormatSpec(4, 64, axis=-2).param_shape((128,))
    assert FormatSpec(4, 64, axis=-2).param_shape((2, 128, 64)) == (2, 64, 2)


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_dequantize_refuses_a_quantized_tensor_whose_metadata_disagrees(gen, change):
    """A hand-built QuantizedTensor (e.g. from a wire import) whose shape says one thing and
    whose tensors hold another used to dequantize to the tensors' shape, silently."""
    import dataclasses

    x = torch.randn(3, 8, 64, generator=gen)
    q = tk.quantize(x, bits=4, group_size=32)
    bad = dataclasses.replace(q, shape=torch.Size((3, 8, 32))) if change == "shape" else \
        dataclasses.replace(q, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"q.{change} is"):
        tk.dequantize(bad)
    out = torch.full((3, 8, 64), 7.0)
    with pytest.raises(ValueError, match=f"q.{change} is"):
        tk.dequantize(bad, out=out)
    assert bool((out == 7.0).all())
