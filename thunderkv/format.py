"""Format v1 parameters, their validation, and the shapes they imply.

Pure metadata: nothing here touches tensor data, so every backend validates with the same rules
and the same messages before it writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 4, 8)
# Exact first tokens (attention sinks) a KV message or cache may hold: one byte in the wire
# header (thunderkv.transfer.wire).
MAX_SINK_TOKENS = 255
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_AXES = (-1, -2)
# Codes handed to the compiled kernels (csrc/format_v1.h DType).
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@dataclass(frozen=True, slots=True)
class FormatSpec:
    """Parameters of format v1.

    bits : 2, 4 or 8 bits per code.
    group_size : elements sharing one (scale, minimum); ``group_size * bits % 8 == 0``.
    axis : -1 groups along the last axis (per-token); -2 groups along the second-to-last
        axis (per-channel, KIVI keys), i.e. format v1 applied to ``x.transpose(-1, -2)``.
    """

    bits: int = 4
    group_size: int = 64
    axis: int = -1

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int in {SUPPORTED_BITS}, got {self.bits!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise TypeError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.group_size * self.bits % 8 != 0:
            raise ValueError(
                f"group_size * bits must be a multiple of 8 so that groups fill whole bytes, "
                f"got group_size={self.group_size}, bits={self.bits}"
            )
        if self.axis not in SUPPORTED_AXES:
            raise ValueError(
                f"axis must be -1 (per-token) or -2 (per-channel), got {self.axis!r}"
            )

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise TypeError/ValueError unless ``x`` can be quantized with this spec."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16 or float32, got {x.dtype}"
            )
        need = 1 if self.axis == -1 else 2
        if x.dim() < need:
            raise ValueError(f"{name} needs at least {need} dimension(s) for axis={self.axis}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): nothing to quantize")
        n = x.shape[self.axis]
        if n % self.group_size != 0:
            what = "D (last axis)" if self.axis == -1 else "T (axis -2)"
            raise ValueError(
                f"{name}: {what} = {n} is not divisible by group_size = {self.group_size}"
            )

    def grouped_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the tensor whose last axis is grouped (the transposed one for axis=-2);
        ValueError when ``shape`` cannot be grouped by this spec."""
        need = 1 if self.axis == -1 else 2
        if len(shape) < need:
            raise ValueError(f"shape {tuple(shape)} needs at least {need} dimension(s) for "
                             f"axis={self.axis}")
        if shape[self.axis] % self.group_size:
            raise ValueError(f"shape {tuple(shape)}: axis {self.axis} = {shape[self.axis]} is not "
                             f"divisible by group_size = {self.group_size}")
        if self.axis == -2:
            return (*shape[:-2], shape[-1], shape[-2])
        return tuple(shape)

    def channel_layout(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(tokens, channels) of ``[..., T, D]`` for the compiled per-channel kernels, which
        read with stride D; (0, 0) for per-token groups."""
        return (shape[-2], shape[-1]) if self.axis == -2 else (0, 0)

    def packed_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``packed`` (uint8) for an input of ``shape``."""
        g = self.grouped_shape(shape)
        return (*g[:-1], g[-1] * self.bits // 8)

    def param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``scale`` and ``minimum`` for an input of ``shape``."""
        g = self.grouped_shape(shape)
        return (*g[:-1], g[-1] // self.group_size)

    def bytes_per_element(self, dtype: torch.dtype) -> float:
        """Stored bytes per input element: ``bits/8 + 2 * itemsize / group_size``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.bits / 8 + 2 * itemsize / self.group_size


def check_destination(
    t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    """Validate a caller-owned output buffer: exact shape, dtype, device, contiguity."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}: same device needed")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (kernels write it as one flat buffer)")


def _span(t: torch.Tensor) -> tuple[str, int, int] | None:
    """(device, first byte, one past the last byte) of ``t``'s memory; None for tensors without
    real storage (meta or fake tensors while tracing) and empty ones."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        lo = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # a FakeTensor
        return None
    if t.is_contiguous():
        return str(t.device), lo, lo + t.numel() * t.element_size()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # torch strides are >= 0
    return str(t.device), lo, lo + (last + 1) * t.element_size()


def check_disjoint(reads: dict[str, torch.Tensor] | None = None, **named: torch.Tensor) -> None:
    """Raise ValueError if two of the ``named`` tensors (what an op writes) share memory, or if
    one of ``reads`` (what it only reads; these may share memory with each other, e.g. one
    tensor passed as both key and value) shares memory with one of them: a kernel writing one
    output over another, or over an input it still reads, gives wrong results. Tensors without
    real storage (meta or fake tensors while tracing) and empty ones are skipped."""
    spans = sorted((*s, i, name) for i, (name, t) in enumerate(named.items())
                   if (s := _span(t)) is not None)
    for (dev_a, _, hi_a, i, a), (dev_b, lo_b, _, j, b) in zip(spans, spans[1:]):
        if dev_a == dev_b and lo_b < hi_a:  # any overlap shows between neighbours by start
            first, second = (a, b) if i < j else (b, a)  # named in argument order
            raise ValueError(f"{first} and {second} share memory: pass separate buffers")
    for name, t in (reads or {}).items():
        s = _span(t)
        for dev, lo, hi, _, other in spans if s is not None else ():
            if dev == s[0] and lo < s[2] and s[1] < hi:
                raise ValueError(f"{name} and {other} share memory: the op would overwrite "
                                 f"{name} while reading it")
