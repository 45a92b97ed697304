"""Public quantization API: ``quantize``, ``quantize_into``, ``dequantize``, ``QuantizedTensor``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops, backends
from .format import FormatSpec, check_destination


@dataclass(slots=True)
class QuantizedTensor:
    """A tensor in KV format v1.

    Attributes
    ----------
    packed : uint8 ``[..., D * bits / 8]`` (axis=-1) or ``[..., D, T * bits / 8]`` (axis=-2).
    scale, minimum : ``[..., D / G]`` (axis=-1) or ``[..., D, T / G]`` (axis=-2), in ``dtype``.
    spec : bits, group_size, axis.
    shape : the original (dequantized) shape ``[..., T, D]``.
    dtype : the original dtype (float16, bfloat16 or float32).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    spec: FormatSpec
    shape: torch.Size
    dtype: torch.dtype

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    @property
    def axis(self) -> int:
        return self.spec.axis

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes plus scales and minima."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))

    def dequantize(self, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        """Dequantize to ``shape``/``dtype`` (see :func:`dequantize`)."""
        return dequantize(self, out=out, backend=backend)


def quantize(
    x: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 64,
    axis: int = -1,
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize ``x`` to format v1.

    Parameters
    ----------
    x : Tensor ``[..., T, D]`` (``[..., D]`` suffices for axis=-1), float16/bfloat16/float32,
        on CPU or CUDA; any strides (a non-contiguous input is copied to a contiguous one
        first, explicitly).
    bits : 2, 4 or 8.
    group_size : elements per (scale, minimum) group along ``axis``; must divide that axis.
    axis : -1 per-token (groups along D), -2 per-channel (groups along T, KIVI keys).
    backend : "auto" (by device), "reference", "cpu", "cuda" or "triton".

    Returns
    -------
    QuantizedTensor with packed uint8 codes, scale and minimum (see its docstring for shapes).
    """
    spec = FormatSpec(bits, group_size, axis)
    spec.check_input(x)
    backends.check_backend_name(backend)
    op = _ops.quantize_impl if _ops.eager_ok(x) else _ops.quantize
    packed, scale, minimum = op(x, bits, group_size, axis, backend)
    return QuantizedTensor(packed, scale, minimum, spec, x.shape, x.dtype)


def quantize_into(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 64,
    axis: int = -1,
    backend: str = "auto",
) -> None:
    """Quantize ``x`` into caller-owned buffers (e.g. a registered transfer buffer).

    ``packed`` (uint8), ``scale`` and ``minimum`` (x's dtype) must be contiguous, on x's device,
    with exactly the shapes :meth:`FormatSpec.packed_shape` / :meth:`FormatSpec.param_shape`
    give for ``x.shape``. Everything is validated before anything is written.
    """
    # The op validates all of this again (for direct torch.ops callers); checking here first
    # gives Python-level messages for wrong argument types the op schema would reject opaquely.
    spec = FormatSpec(bits, group_size, axis)
    spec.check_input(x)
    backends.check_backend_name(backend)
    shape = tuple(x.shape)
    check_destination(packed, "packed", spec.packed_shape(shape), torch.uint8, x.device)
    check_destination(scale, "scale", spec.param_shape(shape), x.dtype, x.device)
    check_destination(minimum, "minimum", spec.param_shape(shape), x.dtype, x.device)
    op = _ops.quantize_into_impl if _ops.eager_ok(x, packed, scale, minimum) else _ops.quantize_into
    op(x, packed, scale, minimum, bits, group_size, axis, backend)


def check_stored(name: str, q) -> None:
    """Raise unless ``q`` is a QuantizedTensor whose packed/scale/minimum tensors hold what its
    ``shape``/``dtype`` say: the kernel indexes them by the metadata alone."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"{name} must be a QuantizedTensor, got {type(q).__name__}")
    try:
        stored = _ops._dequantize_shape(q.packed, q.scale, q.minimum, q.spec)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None
    if stored != tuple(q.shape):
        raise ValueError(f"{name}.shape is {tuple(q.shape)} but its packed/scale/minimum hold a "
                         f"{stored} tensor (bits={q.spec.bits}, group_size={q.spec.group_size}, "
                         f"axis={q.spec.axis})")
    if q.scale.dtype != q.dtype:
        raise ValueError(f"{name}.dtype is {q.dtype} but its scale/minimum are {q.scale.dtype}")


def dequantize(
    q: QuantizedTensor, *, out: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Dequantize ``q`` back to its original shape and dtype.

    Parameters
    ----------
    q : the QuantizedTensor from :func:`quantize`.
    out : optional contiguous destination ``q.shape`` in ``q.dtype`` on q's device;
        validated before anything is written.
    backend : as for :func:`quantize`.

    Returns
    -------
    Tensor ``q.shape`` of ``q.dtype`` (``out`` when given).
    """
    check_stored("q", q)  # a hand-built one whose metadata disagrees with its tensors
    backends.check_backend_name(backend)
    spec = q.spec
    eager = _ops.eager_ok(q.packed, q.scale, q.minimum, *(() if out is None else (out,)))
    if out is None:
        op = _ops.dequantize_impl if eager else _ops.dequantize
        return op(q.packed, q.scale, q.minimum, spec.bits, spec.group_size, spec.axis, backend)
    check_destination(out, "out", tuple(q.shape), q.dtype, q.device)
    op = _ops.dequantize_into_impl if eager else _ops.dequantize_into
    op(q.packed, q.scale, q.minimum, out, spec.bits, spec.group_size, spec.axis, backend)
    return out
