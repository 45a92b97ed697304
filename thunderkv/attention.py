"""Decode attention straight over a KIVI-layout format v1 cache.

A decode step attends one new query token per sequence to ``T = Tq + Tr`` cached tokens: the
first ``Tq`` stored in format v1 with keys per channel (``axis=-2``, groups of G along tokens)
and values per token (``axis=-1``), the newest ``Tr`` in full precision. Dequantization is affine
per group, so the scores and the weighted sum of values can be computed from the packed codes
directly (``csrc/cpu/kivi_attention.cpp``) without ever materializing the history in full
precision: the history is read at ``bits/8`` bytes per element instead of 2-4.

:func:`kivi_decode_attention_reference` (dequantize with the reference backend, then float64
attention) is the definition the compiled kernel is tested against; the two differ by float
rounding only.
"""

from __future__ import annotations

import math

import torch

from ._extension import extension_error, load_extension
from .api import QuantizedTensor, check_stored
from .format import DTYPE_CODES, SUPPORTED_DTYPES

__all__ = ["kivi_decode_attention", "kivi_decode_attention_reference", "fused_attention_available"]


ATTENTION_BACKENDS = ("auto", "cpu", "triton")


def fused_attention_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, "") when the fused kernel for tensors on ``device`` can run; else (False, why).

    CPU (the default): the compiled C++ kernel. CUDA: the Triton kernel
    (``thunderkv.triton_kernels``), which also runs on CPU tensors under ``TRITON_INTERPRET=1``
    when asked for by ``backend="triton"``.
    """
    return backend_ready("auto", torch.device("cpu" if device is None else device))


def backend_ready(backend: str, device: torch.device) -> tuple[bool, str]:
    """(True, "") when :func:`kivi_decode_attention` with ``backend`` ("auto", "cpu" or
    "triton") runs on tensors on ``device``; else (False, why)."""
    if backend == "auto":
        backend = "cpu" if device.type == "cpu" else "triton"
    if backend == "cpu":
        if device.type != "cpu":
            return False, f"backend 'cpu' runs on CPU tensors, got {device}"
        return _cpu_available()
    return _triton_available(device)


def _cpu_available() -> tuple[bool, str]:
    ext = load_extension()
    if ext is None:
        return False, f"the compiled extension is unavailable: {extension_error()}"
    if not hasattr(ext, "cpu_kivi_attention"):
        return False, "the compiled extension predates kivi attention: rebuild thunderkv"
    return True, ""


def _triton_available(device: torch.device) -> tuple[bool, str]:
    from . import backends

    why = backends.unavailable_reason("triton", device)
    if why is None:
        import thunderkv.triton_kernels as kernels

        if not hasattr(kernels, "kivi_decode_attention"):
            why = "thunderkv.triton_kernels predates the fused decode attention"
    return (why is None), (why or "")


def _check(query, qkeys, qvalues, key_residual, value_residual, key_mask, tq_attend):
    """Validate shapes/layouts; return (B, H, R, D, Tq, Tr, S, dtype of scales)."""
    for name, x in (("query", query), ("key_residual", key_residual),
                    ("value_residual", value_residual)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if query.dim() != 3:
        raise ValueError(f"query must be [batch, query_heads, head_dim], got {tuple(query.shape)}")
    B, HQ, D = query.shape
    if D == 0:
        raise ValueError("query has head_dim 0: there is nothing to attend with")
    for name, x in (("key_residual", key_residual), ("value_residual", value_residual)):
        if x.dim() != 4 or x.shape[0] != B or x.shape[-1] != D:
            raise ValueError(f"{name} must be [{B}, kv_heads, tokens, {D}], got {tuple(x.shape)}")
        if not x.is_floating_point():  # integer K/V would be cast to float silently
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if key_residual.shape != value_residual.shape:
        raise ValueError(f"key_residual {tuple(key_residual.shape)} and value_residual "
                         f"{tuple(value_residual.shape)} differ")
    H, Tr = key_residual.shape[1], key_residual.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"query heads ({HQ}) must be a multiple of kv heads ({H})")
    if (qkeys is None) != (qvalues is None):
        raise ValueError("qkeys and qvalues must both be given or both be None")
    S, dtype = 0, query.dtype
    if qkeys is not None:
        check_stored("qkeys", qkeys)
        check_stored("qvalues", qvalues)
        if qkeys.axis != -2 or qvalues.axis != -1:
            raise ValueError(f"the KIVI layout needs keys per channel (axis -2) and values per "
                             f"token (axis -1), got {qkeys.axis} and {qvalues.axis}")
        if qkeys.spec.bits != qvalues.spec.bits or qkeys.group_size != qvalues.group_size:
            raise ValueError("qkeys and qvalues must share bits and group_size")
        if tuple(qkeys.shape) != tuple(qvalues.shape) or tuple(qkeys.shape[:2]) != (B, H) \
                or qkeys.shape[-1] != D:
            raise ValueError(f"quantized keys {tuple(qkeys.shape)} / values {tuple(qvalues.shape)}"
                             f" must both be [{B}, {H}, Tq, {D}]")
        if qkeys.dtype != qvalues.dtype:
            raise ValueError("qkeys and qvalues must share a dtype")
        S, dtype = qkeys.shape[-2], qkeys.dtype
    Tq = S if tq_attend is None else tq_attend
    if not 0 <= Tq <= S:
        raise ValueError(f"tq_attend={tq_attend} outside [0, {S}]")
    if qkeys is not None and Tq % qkeys.group_size:
        raise ValueError(f"tq_attend={Tq} must be a multiple of group_size {qkeys.group_size}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, Tq + Tr)):
        raise ValueError(f"key_mask must be bool [{B}, {Tq + Tr}], got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")
    return B, H, HQ // H, D, Tq, Tr, S, dtype


def kivi_decode_attention(
    query: torch.Tensor,
    qkeys: QuantizedTensor | None,
    qvalues: QuantizedTensor | None,
    key_residual: torch.Tensor,
    value_residual: torch.Tensor,
    *,
    scaling: float | None = None,
    key_mask: torch.Tensor | None = None,
    tq_attend: int | None = None,
    threads: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention of one query token per sequence over a KIVI cache (fused kernel).

    Parameters
    ----------
    query : ``[B, H*R, D]`` float16/bfloat16/float32; query heads ``h*R .. h*R+R-1`` share KV
        head ``h`` (transformers' ``repeat_kv`` order).
    qkeys : keys in format v1, ``axis=-2``, shape ``[B, H, S, D]`` (or None: no history).
    qvalues : values in format v1, ``axis=-1``, shape ``[B, H, S, D]``, same bits/group size.
    key_residual, value_residual : the newest ``Tr`` tokens, ``[B, H, Tr, D]``, any float dtype.
    scaling : multiplies ``q.k`` (default ``1/sqrt(D)``).
    key_mask : bool ``[B, Tq + Tr]``, True where a token may be attended (e.g. left padding);
        a sequence with no attendable token gets zeros.
    tq_attend : attend to the first ``Tq`` quantized tokens only (a multiple of G, default S).
    threads : CPU threads of the C++ kernel (default ``torch.get_num_threads()``).
    backend : "cpu" (the C++ kernel, CPU tensors), "triton" (CUDA tensors, or CPU tensors under
        ``TRITON_INTERPRET=1``) or "auto" (by the tensors' device: CPU -> "cpu", CUDA ->
        "triton"). Every tensor must be on one device.

    Returns
    -------
    ``[B, H*R, D]`` in ``query.dtype``.

    Raises TypeError/ValueError before the kernel runs when an argument breaks these rules,
    including a QuantizedTensor whose packed/scale/minimum disagree with its ``shape``/``dtype``.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if isinstance(query, torch.Tensor) and query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    B, H, R, D, Tq, Tr, S, dtype = _check(query, qkeys, qvalues, key_residual, value_residual,
                                          key_mask, tq_attend)
    tensors = [query, key_residual, value_residual] + ([] if key_mask is None else [key_mask])
    if qkeys is not None:
        tensors += [qkeys.packed, qkeys.scale, qkeys.minimum, qvalues.packed, qvalues.scale,
                    qvalues.minimum]
    device = query.device
    if any(t.device != device for t in tensors):
        raise ValueError(f"every tensor must be on {device} (the query's device), got "
                         f"{sorted({str(t.device) for t in tensors})}")
    if backend == "auto":
        backend = "cpu" if device.type == "cpu" else "triton"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors, got {device}")
    ok, why = backend_ready(backend, device)
    if not ok:
        raise RuntimeError(f"fused attention backend {backend!r} cannot run on {device}: {why}")
    if B == 0:  # no sequences: the kernels split work per sequence x head (C++: / (B * H))
        return query.new_empty((0, H * R, D))
    q = query.to(torch.float32).contiguous()
    kr = key_residual.to(torch.float32).contiguous()
    vr = value_residual.to(torch.float32).contiguous()
    parts = None
    if qkeys is not None:
        parts = [t.contiguous() for t in (qkeys.packed, qkeys.scale, qkeys.minimum,
                                          qvalues.packed, qvalues.scale, qvalues.minimum)]
    scale = 1.0 / math.sqrt(D) if scaling is None else float(scaling)
    if backend == "triton":
        import thunderkv.triton_kernels as kernels

        from .backends import on_device_of

        mask = None if key_mask is None else key_mask.contiguous().view(torch.uint8)
        with on_device_of(q):
            out = kernels.kivi_decode_attention(
                q, parts, kr, vr, mask, heads=H, tq=Tq if parts is not None else 0,
                group_size=qkeys.group_size if parts is not None else 1,
                bits=qkeys.spec.bits if parts is not None else 8, dtype=dtype, scaling=scale)
        return out.to(query.dtype)
    out = torch.empty((B, H * R, D), dtype=torch.float32)
    mask = None if key_mask is None else key_mask.contiguous()
    if parts is not None:
        bits, G = qkeys.spec.bits, qkeys.group_size
    else:
        parts, bits, G = [q] * 6, 8, 1  # never read: Tq = 0
    ptrs = [t.data_ptr() for t in parts]
    load_extension().cpu_kivi_attention(
        q.data_ptr(), out.data_ptr(), *ptrs, kr.data_ptr(), vr.data_ptr(),
        0 if mask is None else mask.data_ptr(), B, H, R, D, Tq, Tr, S, G, bits,
        DTYPE_CODES[dtype], scale,
        torch.get_num_threads() if threads is None else threads,
    )
    return out.to(query.dtype)


def kivi_decode_attention_reference(
    query: torch.Tensor,
    qkeys: QuantizedTensor | None,
    qvalues: QuantizedTensor | None,
    key_residual: torch.Tensor,
    value_residual: torch.Tensor,
    *,
    scaling: float | None = None,
    key_mask: torch.Tensor | None = None,
    tq_attend: int | None = None,
) -> torch.Tensor:
    """Definition of :func:`kivi_decode_attention`: dequantize (reference backend), then float64
    attention over the format's float32 dequantized values. Any device. Same arguments."""
    B, H, R, D, Tq, Tr, S, dtype = _check(query, qkeys, qvalues, key_residual, value_residual,
                                          key_mask, tq_attend)
    keys = [key_residual.double()]
    values = [value_residual.double()]
    if qkeys is not None and Tq:
        # the kernel uses code*scale+minimum in float32 without narrowing to the cache dtype
        k = QuantizedTensor(qkeys.packed, qkeys.scale.float(), qkeys.minimum.float(),
                            qkeys.spec, qkeys.shape, torch.float32).dequantize(backend="reference")
        v = QuantizedTensor(qvalues.packed, qvalues.scale.float(), qvalues.minimum.float(),
                            qvalues.spec, qvalues.shape, torch.float32).dequantize(
                                backend="reference")
        keys.insert(0, k[..., :Tq, :].double())
        values.insert(0, v[..., :Tq, :].double())
    k = torch.cat(keys, dim=-2).repeat_interleave(R, dim=1)   # [B, H*R, T, D]
    v = torch.cat(values, dim=-2).repeat_interleave(R, dim=1)
    s = 1.0 / math.sqrt(D) if scaling is None else float(scaling)
    scores = torch.einsum("bhd,bhtd->bht", query.double(), k) * s
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :].to(scores.device), float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: zeros
    return torch.einsum("bht,bhtd->bhd", p, v).to(query.dtype)
