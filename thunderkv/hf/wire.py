"""``export_kv`` / ``import_kv``: a ThunderKVCache's compressed KV as one transfer wire message.

The bytes are a KV message in the transfer wire format v1 (:mod:`thunderkv.transfer.wire`,
docs/transfer.md "Wire format v1"): the 72-byte header (magic ``TKVX``), then the payload, so
the serving loop can ship a prefix's KV with the transfer layer unchanged. A cache maps onto the
header as follows:

- layout "head": the layer stores ``[batch, heads, tokens, head_dim]`` tensors;
- ``bits``, ``group_size``, ``key_axis``, ``value_axis``: the cache's (KIVI: -2 and -1);
- ``sink_tokens``: the layers' exact first tokens (attention sinks), ``quant_tokens``: their
  quantized history (a multiple of group_size), ``residual_tokens``: their full-precision
  residual, ``seq_len``: all three (no padding);
- ``dtype``: the layers' dtype; ``layers``, ``batch``, ``heads`` (KV heads), ``head_dim``.

Per layer the payload holds the key and value sinks (when ``sink_tokens > 0``), key
packed/scale/min, value packed/scale/min (when ``quant_tokens > 0``), then the key and value
residuals (when ``residual_tokens > 0``): exactly
the layer's tensors, which already have the shapes of :meth:`KVHeader.parts` (format v1 with
axis -2 stores keys transposed, ``[batch, heads, head_dim, quant_tokens * bits / 8]``).

The header does not carry the cache's ``residual_length`` (the full-precision capacity) or
``sink_length``: they do not describe the stored KV, only what the *receiver* does with the
tokens it appends. They are arguments of :func:`import_kv` (default: :class:`ThunderKVCache`'s
defaults).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from ..api import QuantizedTensor
from ..transfer.checksum import crc32c
from ..transfer.wire import (
    DEFAULT_LIMITS,
    HEADER,
    MAGIC,
    WIRE_LIMITS,
    WIRE_VERSION,
    KVHeader,
    KVMessageError,
    Limits,
    build_header,
    decode_header,
    decode_message,
)
from .cache import ThunderKVCache, full_attention_layers, head_dim_of

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_RESIDUAL_LENGTH", "DEFAULT_SINK_LENGTH", "HEADER", "MAGIC",
    "WIRE_VERSION",
    "KVHeader", "KVMessageError", "Limits", "export_kv", "export_kv_into", "import_kv",
    "import_kv_parts", "kv_header", "read_header",
]

DEFAULT_MAX_BYTES = DEFAULT_LIMITS.max_payload_bytes
# What a receiver that builds ``ThunderKVCache(config)`` itself would get.
_CACHE_DEFAULTS = inspect.signature(ThunderKVCache.__init__).parameters
DEFAULT_RESIDUAL_LENGTH: int = _CACHE_DEFAULTS["residual_length"].default
DEFAULT_SINK_LENGTH: int = _CACHE_DEFAULTS["sink_length"].default


def kv_header(cache: ThunderKVCache, *, request_id: int = 0, streamed: bool = False
              ) -> KVHeader:
    """The wire header of ``cache``'s KV, without producing the payload.

    For a sender that needs ``payload_length`` (and :meth:`KVHeader.layer_nbytes`) before it
    writes the payload, e.g. to allocate a slice of a registered send pool, then fills it with
    :func:`export_kv_into`. ``payload_crc`` is 0: :meth:`KVSender.send
    <thunderkv.transfer.KVSender.send>` then checksums per layer (as for ``streamed=True``).

    Raises
    ------
    TypeError if ``cache`` is not a ThunderKVCache; ValueError if a layer holds no KV yet,
    its keys and values differ in shape (MLA / latent-KV models: the header has one head_dim),
    or the layers differ in shape or dtype.
    """
    if not isinstance(cache, ThunderKVCache):
        raise TypeError(f"expected a ThunderKVCache, got {type(cache).__name__}")
    exact = sorted({kind for kind in cache.layer_types if kind != "full_attention"})
    if exact:
        raise ValueError(
            f"export_kv: this cache keeps {exact} layers exact (a hybrid model); a KV message "
            "carries caches whose every layer is full attention")
    layers = cache.layers
    if not layers or not all(layer.is_initialized for layer in layers):
        raise ValueError("export_kv: every layer must hold KV (run a forward pass first)")
    first = layers[0]
    B, H, Tr, D = first.keys.shape
    Ts, Tq = first.sink_tokens, first.quantized_length
    for i, layer in enumerate(layers):
        if layer.values.shape != layer.keys.shape:
            # e.g. MLA / latent-KV models, which cache a latent and a rotary key
            raise ValueError(
                f"export_kv: layer {i} holds keys {tuple(layer.keys.shape)} and values "
                f"{tuple(layer.values.shape)} (head dims {layer.keys.shape[-1]} vs "
                f"{layer.values.shape[-1]}): the wire header has one heads x head_dim for both")
        if ((layer.sink_tokens, layer.quantized_length, *layer.keys.shape) != (Ts, Tq, B, H, Tr, D)
                or layer.dtype != first.dtype):
            raise ValueError(f"export_kv: layer {i} differs in shape or dtype from layer 0")
    # The sender states what it holds; the receiver applies its own Limits when decoding.
    return build_header(
        dtype=first.dtype, bits=cache.bits, group_size=cache.group_size,
        key_axis=cache.key_axis, value_axis=cache.value_axis, layout="head", layers=len(layers),
        batch=B, heads=H, head_dim=D, sink_tokens=Ts, quant_tokens=Tq, residual_tokens=Tr,
        seq_len=Ts + Tq + Tr,
        request_id=request_id, streamed=streamed, limits=WIRE_LIMITS)


def _payload(cache: ThunderKVCache, header: KVHeader) -> Iterator[torch.Tensor]:
    """The payload as flat uint8 tensors (views where the layer's tensor is contiguous), in
    wire order. Every tensor must already have its part's shape and dtype: bytes are never
    reinterpreted or reordered to fit."""
    parts = header.parts()
    for i, layer in enumerate(cache.layers):
        held: dict[str, torch.Tensor] = {"key_residual": layer.keys,
                                         "value_residual": layer.values,
                                         "key_sink": layer.sink_keys,
                                         "value_sink": layer.sink_values}
        for prefix, q in (("key", layer.qkeys), ("value", layer.qvalues)):
            if q is not None:
                held.update({f"{prefix}_packed": q.packed, f"{prefix}_scale": q.scale,
                             f"{prefix}_min": q.minimum})
        for name, shape, dtype in parts:
            t = held.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"export_kv: layer {i} {name} must be {dtype} {shape} "
                                 f"(wire format v1), the layer holds {got}")
            yield t.detach().reshape(-1).view(torch.uint8)


def export_kv(cache: ThunderKVCache, *, request_id: int = 0) -> bytes:
    """Serialize ``cache`` (every layer, same token counts) into one KV message.

    Returns
    -------
    bytes : a whole, non-streamed transfer wire format v1 message (72-byte header with the
        payload's CRC-32C, then ``cache.nbytes`` bytes of payload), what
        :func:`thunderkv.transfer.wire.decode_message` reads and :func:`import_kv` rebuilds a
        bit-identical cache from. Copies each tensor once (plus once from a GPU).

    Raises
    ------
    TypeError / ValueError as :func:`kv_header`.
    """
    header = kv_header(cache, request_id=request_id)
    arrays = [t.cpu().numpy() for t in _payload(cache, header)]
    crc = 0
    for a in arrays:
        crc = crc32c(a, crc)
    return b"".join([replace(header, payload_crc=crc).pack(), *arrays])


def export_kv_into(cache: ThunderKVCache, out: torch.Tensor, *, request_id: int = 0,
                   streamed: bool = False) -> KVHeader:
    """Write ``cache``'s payload into ``out`` and return its header (:func:`kv_header`).

    ``out``: a 1-D contiguous uint8 tensor of exactly ``kv_header(cache).payload_length`` bytes
    on any device, e.g. a slice of a registered send pool; one copy per tensor, no staging.
    The header's ``payload_crc`` is 0 (see :func:`kv_header`).
    """
    header = kv_header(cache, request_id=request_id, streamed=streamed)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.dim() != 1 or (
            not out.is_contiguous()) or out.numel() != header.payload_length:
        raise ValueError(f"out must be a contiguous 1-D uint8 tensor of {header.payload_length} "
                         f"bytes (header.payload_length), got "
                         f"{getattr(out, 'dtype', type(out).__name__)} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    offset = 0
    for t in _payload(cache, header):
        n = t.numel()
        out[offset:offset + n].copy_(t)  # bytes: no alignment needed, unlike typed views
        offset += n
    return header


def _limits(limits: Limits | None, max_bytes: int | None) -> Limits:
    limits = DEFAULT_LIMITS if limits is None else limits
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a thunderkv.transfer.wire.Limits, got "
                        f"{type(limits).__name__}")
    return limits if max_bytes is None else replace(limits, max_payload_bytes=max_bytes)


def read_header(data: Any, *, max_bytes: int | None = None, limits: Limits | None = None
                ) -> KVHeader:
    """Decode and validate a whole message's header (not its payload checksum).

    Like :func:`thunderkv.transfer.wire.decode_header`, plus: the message must be exactly
    ``HEADER.size + payload_length`` bytes. ``max_bytes`` (default ``limits``'
    ``max_payload_bytes``, 16 GiB) caps the payload. Raises :class:`KVMessageError`.
    """
    header = decode_header(data, limits=_limits(limits, max_bytes))
    n = data.numel() if isinstance(data, torch.Tensor) else memoryview(data).nbytes
    total = HEADER.size + header.payload_length
    if n < total:
        raise KVMessageError(f"KV message truncated: {n} bytes, the header says {total}")
    if n > total:
        raise KVMessageError(f"KV message has {n - total} trailing bytes after the {total} the "
                             f"header says")
    return header


def _check_importable(h: KVHeader, config) -> None:
    """Reject, before anything is allocated, a valid message a ThunderKVCache cannot hold."""
    if h.raw:
        raise KVMessageError(f"KV message: bits: {h.bits} is a raw (uncompressed) message; a "
                             f"ThunderKVCache holds format v1 (2, 4 or 8 bits)")
    if h.layout != "head":
        raise KVMessageError(f"KV message: layout: {h.layout!r}; a ThunderKVCache holds layout "
                             f"'head' ([batch, heads, tokens, head_dim])")
    if h.seq_len != h.tokens:
        raise KVMessageError(f"KV message: seq_len: {h.seq_len} of {h.tokens} stored tokens are "
                             f"valid; a ThunderKVCache holds no padding tokens")
    if config is not None:
        try:
            full_attention_layers(config)
        except ValueError as e:
            raise KVMessageError(f"KV message: import_kv rebuilds caches whose every layer is "
                                 f"full attention; {e}") from None
        text = config.get_text_config(decoder=True)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = head_dim_of(config)
        if (text.num_hidden_layers, heads, head_dim) != (h.layers, h.heads, h.head_dim):
            raise KVMessageError(
                f"KV message holds layers/heads/head_dim {(h.layers, h.heads, h.head_dim)}, the "
                f"model has {(text.num_hidden_layers, heads, head_dim)}")


def import_kv(
    data: Any,
    config=None,
    *,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    max_bytes: int | None = None,
    residual_length: int = DEFAULT_RESIDUAL_LENGTH,
    limits: Limits | None = None,
    sink_length: int = DEFAULT_SINK_LENGTH,
) -> ThunderKVCache:
    """Rebuild a :class:`ThunderKVCache` from a KV message (e.g. :func:`export_kv`'s bytes).

    Parameters
    ----------
    data : the whole message, bytes-like (or a contiguous CPU uint8 tensor). Validated
        completely (header fields, limits, length, payload CRC-32C) before the payload is
        copied; the cache's tensors are views of that one copy (moved to ``device``).
    config : the receiving model's config; when given, its layer count, KV heads and head_dim
        must match the message.
    device : where the cache's tensors go.
    backend : the thunderkv backend the new cache uses.
    max_bytes : largest payload accepted (default ``limits.max_payload_bytes``, 16 GiB).
    residual_length : the new cache's full-precision capacity. The message does not carry it:
        it is the receiver's decoding policy, not part of the stored KV. Default
        :data:`DEFAULT_RESIDUAL_LENGTH`, ThunderKVCache's own (128). Decoding continues exactly
        as it would have in the sender's cache only with the sender's residual_length; any
        other value is valid (a residual over capacity is quantized at the next update).
    limits : the receiver's :class:`~thunderkv.transfer.wire.Limits` (default
        ``Limits()``); ``max_bytes`` overrides its ``max_payload_bytes``.
    sink_length : the new cache's sink policy (default :data:`DEFAULT_SINK_LENGTH`). The
        message's own sink tokens are kept whatever it is; a cache whose sink is shorter than
        ``sink_length`` fills it only while it holds nothing after the sink.

    Bits, group size, key/value axes, dtype, batch and token counts come from the header.

    Raises
    ------
    KVMessageError (a ValueError) for a malformed, truncated, corrupted or over-limit message,
    one a ThunderKVCache cannot hold (raw, layout "token", padding tokens: ``seq_len`` below
    the stored tokens), or one that does not fit ``config``.
    """
    limits = _limits(limits, max_bytes)
    _check_importable(decode_header(data, limits=limits), config)
    header, layers = decode_message(data, limits=limits)  # one private copy of the payload
    return _build(header, layers, config, device, backend, residual_length, sink_length,
                  copy=False)


def import_kv_parts(
    header: KVHeader,
    layers: list[dict[str, torch.Tensor]],
    config=None,
    *,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    residual_length: int = DEFAULT_RESIDUAL_LENGTH,
    sink_length: int = DEFAULT_SINK_LENGTH,
) -> ThunderKVCache:
    """Build a :class:`ThunderKVCache` from a decoded header and its layers' parts.

    For the receive side of :mod:`thunderkv.transfer`: ``header`` and
    ``[received.layer(i) for i in range(header.layers)]`` of a
    :class:`~thunderkv.transfer.ReceivedKV` (or :func:`~thunderkv.transfer.wire.decode_message`'s
    result). The tensors are copied to ``device``, so the receive pool's slice may be released
    afterwards. Other parameters and errors as :func:`import_kv`; a ``layers`` list that does
    not match ``header.parts()`` raises ValueError.
    """
    if not isinstance(header, KVHeader):
        raise TypeError(f"header must be a KVHeader, got {type(header).__name__}")
    header.validate(WIRE_LIMITS)
    _check_importable(header, config)
    parts = header.parts()
    if not isinstance(layers, (list, tuple)) or len(layers) != header.layers:
        raise ValueError(f"layers must be a list of header.layers = {header.layers} dicts")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or sorted(layer) != sorted(n for n, _, _ in parts):
            raise ValueError(f"layer {i} must hold exactly the parts {[n for n, _, _ in parts]}")
        for name, shape, dtype in parts:
            t = layer[name]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"layer {i} {name} must be a {dtype} tensor of shape {shape}")
    return _build(header, layers, config, device, backend, residual_length, sink_length,
                  copy=True)


def _exact_pair(parts: dict[str, torch.Tensor], name: str, count: int, empty, dtype,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``key_<name>``/``value_<name>`` parts, or two empty tensors when ``count`` is 0."""
    if count:
        return parts[f"key_{name}"], parts[f"value_{name}"]
    return (torch.empty(empty, dtype=dtype, device=device),
            torch.empty(empty, dtype=dtype, device=device))


def _build(h: KVHeader, layers: list[dict[str, torch.Tensor]], config, device, backend: str,
           residual_length: int, sink_length: int, *, copy: bool) -> ThunderKVCache:
    """A cache holding ``layers`` (validated parts of ``h``) on ``device``."""
    cache = ThunderKVCache(config, h.bits, h.group_size, residual_length, backend,
                           key_axis=h.key_axis, value_axis=h.value_axis,
                           sink_length=sink_length,
                           num_layers=None if config is not None else h.layers)
    device = torch.device(device)
    full = torch.Size(h.shape(h.quant_tokens))
    empty = h.shape(0)
    for layer, parts in zip(cache.layers, layers, strict=True):
        p = {name: t.to(device, copy=copy, memory_format=torch.contiguous_format)
             for name, t in parts.items()}
        if h.quant_tokens:
            layer.qkeys = QuantizedTensor(p["key_packed"], p["key_scale"], p["key_min"],
                                          layer.key_spec, full, h.dtype)
            layer.qvalues = QuantizedTensor(p["value_packed"], p["value_scale"], p["value_min"],
                                            layer.value_spec, full, h.dtype)
        layer.keys, layer.values = _exact_pair(p, "residual", h.residual_tokens, empty, h.dtype,
                                               device)
        layer.sink_keys, layer.sink_values = _exact_pair(p, "sink", h.sink_tokens, empty,
                                                         h.dtype, device)
        layer.device, layer.dtype, layer.is_initialized = layer.keys.device, h.dtype, True
    return cache
