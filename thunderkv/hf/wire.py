"""``export_kv`` / ``import_kv``: a ThunderKVCache's compressed KV as one self-describing message.

Layout: a fixed 68-byte little-endian header (:data:`HEADER`), then the payload. Per layer, in
order: key packed, key scale, key minimum, value packed, value scale, value minimum (the
quantized history of ``quant_tokens`` tokens, format v1, shapes as in
:class:`~thunderkv.hf.layer.ThunderKVLayer`), then residual keys and residual values
(``[batch, heads, residual_tokens, head_dim]`` in the header's dtype). Every array is C-contiguous.

A receiver validates every header field, caps sizes, checks that the payload length equals the
one the fields imply and that both CRC-32s match, before it allocates anything.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

from ..api import QuantizedTensor
from ..format import DTYPE_CODES, FORMAT_VERSION, FormatSpec
from .cache import ThunderKVCache

MAGIC = b"TKVC"
WIRE_VERSION = 1
# magic, wire version, format version, dtype, bits, key axis, value axis, flags, group size,
# residual length, layers, batch, heads, head_dim, quant tokens, residual tokens, request id,
# payload length, payload crc32, header crc32 (of the 64 bytes before it).
HEADER = struct.Struct("<4sHBBBbbBIIIIIIIIQQII")
MAX_LAYERS, MAX_BATCH, MAX_HEADS, MAX_HEAD_DIM = 4096, 65536, 4096, 4096
MAX_TOKENS = 1 << 24
DEFAULT_MAX_BYTES = 1 << 34
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class KVMessageError(ValueError):
    """A KV message is malformed, truncated, corrupted or over the receiver's limits."""


@dataclass(frozen=True, slots=True)
class KVHeader:
    """The decoded header of a KV message (see the module docstring)."""

    dtype: torch.dtype
    bits: int
    group_size: int
    key_axis: int
    value_axis: int
    residual_length: int
    layers: int
    batch: int
    heads: int
    head_dim: int
    quant_tokens: int
    residual_tokens: int
    request_id: int
    payload_length: int

    def parts(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of one layer's arrays, in payload order."""
        B, H, D, Tq, Tr = self.batch, self.heads, self.head_dim, self.quant_tokens, self.residual_tokens
        out: list[tuple[tuple[int, ...], torch.dtype]] = []
        for axis in (self.key_axis, self.value_axis):
            spec = FormatSpec(self.bits, self.group_size, axis)
            if Tq:
                out.append((spec.packed_shape((B, H, Tq, D)), torch.uint8))
                out += [(spec.param_shape((B, H, Tq, D)), self.dtype)] * 2
        return out + [((B, H, Tr, D), self.dtype)] * 2

    def expected_payload(self) -> int:
        n = 0
        for shape, dtype in self.parts():
            count = 1
            for s in shape:
                count *= s
            n += count * (1 if dtype == torch.uint8 else torch.empty((), dtype=dtype).element_size())
        return n * self.layers


def export_kv(cache: ThunderKVCache, *, request_id: int = 0) -> bytes:
    """Serialize ``cache`` (every layer, same token counts) into one message.

    Returns
    -------
    bytes : header + payload; :func:`import_kv` rebuilds a bit-identical cache from it.
    """
    if not isinstance(cache, ThunderKVCache):
        raise TypeError(f"export_kv takes a ThunderKVCache, got {type(cache).__name__}")
    layers = cache.layers
    if not layers or not all(layer.is_initialized for layer in layers):
        raise ValueError("export_kv: every layer must hold KV (run a forward pass first)")
    first = layers[0]
    B, H, _, D = first.keys.shape
    Tq, Tr = first.quantized_length, first.keys.shape[-2]
    for i, layer in enumerate(layers):
        if (layer.quantized_length, *layer.keys.shape) != (Tq, B, H, Tr, D) or (
                layer.values.shape != layer.keys.shape):
            raise ValueError(f"export_kv: layer {i} differs in shape from layer 0")
    chunks: list[bytes] = []
    for layer in layers:
        for t in layer.tensors():
            chunks.append(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    payload = b"".join(chunks)
    fields = (MAGIC, WIRE_VERSION, FORMAT_VERSION, DTYPE_CODES[first.dtype], cache.bits,
              cache.key_axis, cache.value_axis, 0, cache.group_size, cache.residual_length,
              len(layers), B, H, D, Tq, Tr, request_id, len(payload), zlib.crc32(payload))
    head = HEADER.pack(*fields, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def read_header(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
                ) -> KVHeader:
    """Decode and validate a message's header (not its payload checksum); raise KVMessageError."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise KVMessageError(f"message truncated: {len(view)} bytes, header needs {HEADER.size}")
    (magic, wire, fmt, dcode, bits, kax, vax, flags, G, R, L, B, H, D, Tq, Tr, rid, plen, _,
     hcrc) = HEADER.unpack_from(view)
    checks = [
        (magic == MAGIC, f"bad magic {bytes(magic)!r} (expected {MAGIC!r})"),
        (zlib.crc32(view[: HEADER.size - 4]) == hcrc, "header checksum mismatch"),
        (wire == WIRE_VERSION, f"unsupported wire version {wire}"),
        (fmt == FORMAT_VERSION, f"unsupported KV format version {fmt}"),
        (dcode in _DTYPES, f"unknown dtype code {dcode}"),
        (flags == 0, f"unknown flags {flags:#x}"),
        (0 < L <= MAX_LAYERS, f"layers {L} outside 1..{MAX_LAYERS}"),
        (0 < B <= MAX_BATCH, f"batch {B} outside 1..{MAX_BATCH}"),
        (0 < H <= MAX_HEADS, f"heads {H} outside 1..{MAX_HEADS}"),
        (0 < D <= MAX_HEAD_DIM, f"head_dim {D} outside 1..{MAX_HEAD_DIM}"),
        (Tq + Tr <= MAX_TOKENS, f"tokens {Tq + Tr} over {MAX_TOKENS}"),
        (0 <= plen <= max_bytes, f"payload {plen} bytes over the limit of {max_bytes}"),
    ]
    for ok, why in checks:
        if not ok:
            raise KVMessageError(why)
    try:
        for axis in (kax, vax):
            FormatSpec(bits, G, axis)
            if axis == -1 and D % G:
                raise ValueError(f"head_dim {D} not divisible by group_size {G}")
        if Tq % G:
            raise ValueError(f"quantized tokens {Tq} not a multiple of group_size {G}")
    except (TypeError, ValueError) as exc:
        raise KVMessageError(f"invalid format parameters: {exc}") from exc
    header = KVHeader(_DTYPES[dcode], bits, G, kax, vax, R, L, B, H, D, Tq, Tr, rid, plen)
    if header.expected_payload() != plen:
        raise KVMessageError(
            f"payload length {plen} does not match the header ({header.expected_payload()})")
    if len(view) != HEADER.size + plen:
        raise KVMessageError(
            f"message is {len(view)} bytes, header says {HEADER.size + plen} (truncated/padded)")
    return header


def import_kv(
    data: bytes | bytearray | memoryview,
    config=None,
    *,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ThunderKVCache:
    """Rebuild a :class:`ThunderKVCache` from :func:`export_kv`'s bytes.

    Parameters
    ----------
    data : the whole message. Validated completely (header fields, sizes, checksums) first.
    config : the receiving model's config; when given, its layer count, KV heads and head_dim
        must match the message.
    device : where the cache's tensors go.
    backend : the thunderkv backend the new cache uses.
    max_bytes : largest payload accepted.
    """
    h = read_header(data, max_bytes=max_bytes)
    view = memoryview(data)[HEADER.size:]
    if zlib.crc32(view) != HEADER.unpack_from(memoryview(data))[-2]:
        raise KVMessageError("payload checksum mismatch")
    if config is not None:
        text = config.get_text_config(decoder=True)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if (text.num_hidden_layers, heads, head_dim) != (h.layers, h.heads, h.head_dim):
            raise KVMessageError(
                f"message holds layers/heads/head_dim {(h.layers, h.heads, h.head_dim)}, the "
                f"model has {(text.num_hidden_layers, heads, head_dim)}")
    cache = ThunderKVCache(config, h.bits, h.group_size, h.residual_length, backend,
                           key_axis=h.key_axis, value_axis=h.value_axis,
                           num_layers=None if config is not None else h.layers)
    buf = bytearray(view)  # one copy; the tensors below are views of it (then moved)
    offset = 0

    def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nonlocal offset
        t = torch.empty(shape, dtype=dtype)
        n = t.numel() * t.element_size()
        if n == 0:
            return t.to(device)
        t.view(-1).view(torch.uint8).copy_(torch.frombuffer(buf, dtype=torch.uint8, count=n,
                                                            offset=offset))
        offset += n
        return t.to(device)

    parts = h.parts()
    full = torch.Size((h.batch, h.heads, h.quant_tokens, h.head_dim))
    for layer in cache.layers:
        arrays = [take(shape, dtype) for shape, dtype in parts]
        if h.quant_tokens:
            layer.qkeys = QuantizedTensor(*arrays[0:3], layer.key_spec, full, h.dtype)
            layer.qvalues = QuantizedTensor(*arrays[3:6], layer.value_spec, full, h.dtype)
        layer.keys, layer.values = arrays[-2], arrays[-1]
        layer.device, layer.dtype, layer.is_initialized = torch.device(device), h.dtype, True
    return cache
