"""The op table: format v1 ops declared once with ``torch.library``.

``x`` and the dequantized output are always in the caller's layout ``[..., T, D]``; with
``axis=-2`` (per-channel) the groups run along T and ``packed``/``scale``/``minimum`` are laid
out as for ``x.transpose(-1, -2)`` (format v1). Each op validates every argument before
touching any output, resolves the backend (``"auto"`` picks by device) and calls its
implementation; the fake (meta) implementations let ``torch.compile`` and ``opcheck`` trace
them.

- ``thunderkv::quantize(x, bits, group_size, axis, backend) -> (packed, scale, minimum)``
- ``thunderkv::quantize_into(x, packed!, scale!, minimum!, bits, group_size, axis, backend)``
- ``thunderkv::dequantize(packed, scale, minimum, bits, group_size, axis, backend) -> y``
- ``thunderkv::dequantize_into(packed, scale, minimum, out!, bits, group_size, axis, backend)``
"""

from __future__ import annotations

import torch

from . import backends
from .format import SUPPORTED_DTYPES, FormatSpec, check_destination, check_disjoint

_DEVICES = ("cpu", "cuda")


def _quantize_shapes(
    x: torch.Tensor, spec: FormatSpec
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    spec.check_input(x)
    return spec.packed_shape(tuple(x.shape)), spec.param_shape(tuple(x.shape))


def _dequantize_shape(
    packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, spec: FormatSpec
) -> tuple[int, ...]:
    """Validate the quantized triple; return the shape of the dequantized tensor."""
    bits, group_size = spec.bits, spec.group_size
    for name, t in (("packed", packed), ("scale", scale), ("minimum", minimum)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if scale.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scale must be float16, bfloat16 or float32, got {scale.dtype}")
    if minimum.dtype != scale.dtype:
        raise TypeError(f"minimum must have scale's dtype {scale.dtype}, got {minimum.dtype}")
    if packed.dim() < (1 if spec.axis == -1 else 2) or packed.numel() == 0:
        raise ValueError(
            f"packed is empty or has too few dimensions for axis={spec.axis} "
            f"(shape {tuple(packed.shape)}): nothing to dequantize"
        )
    d = packed.shape[-1] * 8 // bits
    if d % group_size != 0:
        raise ValueError(
            f"packed holds D = {d} codes per row, not divisible by group_size = {group_size}"
        )
    params = (*packed.shape[:-1], d // group_size)
    for name, t in (("scale", scale), ("minimum", minimum)):
        if tuple(t.shape) != params:
            raise ValueError(
                f"{name} must have shape {params} for packed of shape {tuple(packed.shape)}, "
                f"bits={bits}, group_size={group_size}; got {tuple(t.shape)}"
            )
        if t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    if spec.axis == -2:
        return (*packed.shape[:-2], d, packed.shape[-2])
    return (*packed.shape[:-1], d)


# ---------------------------------------------------------------- quantize


@torch.library.custom_op(
    "thunderkv::quantize_into", mutates_args=("packed", "scale", "minimum"), device_types=_DEVICES
)
def quantize_into(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    backend: str,
) -> None:
    quantize_into_impl(x, packed, scale, minimum, bits, group_size, axis, backend)


def quantize_into_impl(x, packed, scale, minimum, bits, group_size, axis, backend) -> None:
    """Body of ``thunderkv::quantize_into`` (see :func:`eager_ok`)."""
    spec = FormatSpec(bits, group_size, axis)
    pshape, sshape = _quantize_shapes(x, spec)
    check_destination(packed, "packed", pshape, torch.uint8, x.device)
    check_destination(scale, "scale", sshape, x.dtype, x.device)
    check_destination(minimum, "minimum", sshape, x.dtype, x.device)
    check_disjoint(x=x, packed=packed, scale=scale, minimum=minimum)
    impl = backends.resolve(backend, x.device)
    impl.quantize_into(x.contiguous(), packed, scale, minimum, spec)


@quantize_into.register_fake
def _(x, packed, scale, minimum, bits, group_size, axis, backend) -> None:
    _quantize_shapes(x, FormatSpec(bits, group_size, axis))
    backends.check_backend_name(backend)


@torch.library.custom_op("thunderkv::quantize", mutates_args=(), device_types=_DEVICES)
def quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize_impl(x, bits, group_size, axis, backend)


def quantize_impl(x, bits, group_size, axis, backend):
    """Body of ``thunderkv::quantize``."""
    spec = FormatSpec(bits, group_size, axis)
    pshape, sshape = _quantize_shapes(x, spec)
    impl = backends.resolve(backend, x.device)
    packed = torch.empty(pshape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(sshape, dtype=x.dtype, device=x.device)
    minimum = torch.empty(sshape, dtype=x.dtype, device=x.device)
    impl.quantize_into(x.contiguous(), packed, scale, minimum, spec)
    return packed, scale, minimum


@quantize.register_fake
def _(x, bits, group_size, axis, backend):
    pshape, sshape = _quantize_shapes(x, FormatSpec(bits, group_size, axis))
    backends.check_backend_name(backend)
    return (
        x.new_empty(pshape, dtype=torch.uint8),
        x.new_empty(sshape),
        x.new_empty(sshape),
    )


# ---------------------------------------------------------------- dequantize


@torch.library.custom_op(
    "thunderkv::dequantize_into", mutates_args=("out",), device_types=_DEVICES
)
def dequantize_into(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    out: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    backend: str,
) -> None:
    dequantize_into_impl(packed, scale, minimum, out, bits, group_size, axis, backend)


def dequantize_into_impl(packed, scale, minimum, out, bits, group_size, axis, backend) -> None:
    """Body of ``thunderkv::dequantize_into``."""
    spec = FormatSpec(bits, group_size, axis)
    shape = _dequantize_shape(packed, scale, minimum, spec)
    check_destination(out, "out", shape, scale.dtype, packed.device)
    check_disjoint(out=out, packed=packed, scale=scale, minimum=minimum)
    impl = backends.resolve(backend, packed.device)
    impl.dequantize_into(packed.contiguous(), scale.contiguous(), minimum.contiguous(), out, spec)


@dequantize_into.register_fake
def _(packed, scale, minimum, out, bits, group_size, axis, backend) -> None:
    _dequantize_shape(packed, scale, minimum, FormatSpec(bits, group_size, axis))
    backends.check_backend_name(backend)


@torch.library.custom_op("thunderkv::dequantize", mutates_args=(), device_types=_DEVICES)
def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    backend: str,
) -> torch.Tensor:
    return dequantize_impl(packed, scale, minimum, bits, group_size, axis, backend)


def dequantize_impl(packed, scale, minimum, bits, group_size, axis, backend) -> torch.Tensor:
    """Body of ``thunderkv::dequantize``."""
    spec = FormatSpec(bits, group_size, axis)
    shape = _dequantize_shape(packed, scale, minimum, spec)
    impl = backends.resolve(backend, packed.device)
    out = torch.empty(shape, dtype=scale.dtype, device=packed.device)
    impl.dequantize_into(packed.contiguous(), scale.contiguous(), minimum.contiguous(), out, spec)
    return out


@dequantize.register_fake
def _(packed, scale, minimum, bits, group_size, axis, backend):
    shape = _dequantize_shape(packed, scale, minimum, FormatSpec(bits, group_size, axis))
    backends.check_backend_name(backend)
    return packed.new_empty(shape, dtype=scale.dtype)


def eager_ok(*tensors: torch.Tensor) -> bool:
    """Whether :mod:`thunderkv.api` may call the ``*_impl`` bodies directly instead of going
    through the registered custom ops: plain tensors, not compiling or tracing, no autograd.

    The ops' dispatcher and autograd wrapping cost ~70 us a call, several times the kernel for
    one layer of a short request; eager calls skip it and run exactly the same body.
    """
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) is torch.Tensor and not (grad and t.requires_grad) for t in tensors)


# ---------------------------------------------------------------- autograd


def _no_gradient(op: str):
    """A backward for ``op`` that says why there is none. Forward passes with inputs that require
    grad stay allowed (an HF model run without ``torch.no_grad()`` hands such K/V to the cache);
    only backpropagating through the op fails, with this message instead of torch's generic
    "no autograd formula was registered"."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"thunderkv.{op} has no gradient: format v1 quantization rounds to integer codes, "
            "which is not differentiable. Quantize and dequantize detached tensors "
            "(x.detach(), or inside torch.no_grad() as inference does)")
    return backward


def _no_context(ctx, inputs, output) -> None:
    return None


quantize.register_autograd(_no_gradient("quantize"), setup_context=_no_context)
dequantize.register_autograd(_no_gradient("dequantize"), setup_context=_no_context)
