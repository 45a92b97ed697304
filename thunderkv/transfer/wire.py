"""Wire format v1 of a KV message: a fixed 72-byte little-endian header, then the payload.

The header (:data:`HEADER`, fields in :class:`KVHeader`) says what the payload holds: the model
dtype, the format v1 parameters (bits, group size, key/value axes) or "raw" (uncompressed),
the layout of the tensors (token-major ``[batch, tokens, heads, head_dim]`` or head-major
``[batch, heads, tokens, head_dim]``), the counts (layers, batch, heads, head_dim, quantized and
sink, residual tokens, valid tokens), the request id and the payload's length and CRC-32C.

The payload is ``layers`` equal-size layer blocks. One layer block, arrays C-contiguous and
concatenated without padding (:meth:`KVHeader.parts` lists them):

- if ``sink_tokens > 0`` (quantized messages only): key sink ``S(sink_tokens)``, value sink
  ``S(sink_tokens)`` in the model dtype: the sequence's first tokens, kept exact (attention
  sinks, see :class:`thunderkv.hf.ThunderKVCache`);
- if ``quant_tokens > 0`` (quantized messages only): key codes, key scale, key minimum (format v1
  with ``FormatSpec(bits, group_size, key_axis)`` applied to a key tensor of shape
  ``S(quant_tokens)``), then value codes, value scale, value minimum (``value_axis``);
- if ``residual_tokens > 0``: key residual ``S(residual_tokens)``, value residual
  ``S(residual_tokens)``, in the model dtype (a raw message holds only these);

where ``S(t) = (batch, t, heads, head_dim)`` (layout "token") or ``(batch, heads, t, head_dim)``
(layout "head"). One layer of :func:`thunderkv.paged.pack_for_transfer` (batch 1, token-major,
axes -1, ``quant_tokens = blocks * block_size``) is exactly one layer block.

A receiver decodes the header with :func:`decode_header`, which validates every field against
the receiver's :class:`Limits` without allocating anything proportional to a field's value,
then receives the layer blocks into its own buffers and views them with :func:`layer_views`.
:func:`encode_message` / :func:`decode_message` handle a whole message in memory (small
messages, tests). The normative description with a field table is docs/transfer.md.
"""

from __future__ import annotations

import math
import operator
import struct
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np
import torch

from ..format import DTYPE_CODES, FORMAT_VERSION, MAX_SINK_TOKENS, SUPPORTED_BITS, FormatSpec
from .checksum import crc32c

MAGIC = b"TKVX"
WIRE_VERSION = 1
# magic, wire_version, header_size, format_version, dtype, bits, layout, flags, key_axis,
# value_axis, sink_tokens, group_size, layers, batch, heads, head_dim, quant_tokens,
# residual_tokens, seq_len, request_id, payload_length, payload_crc, header_crc.
# Every field sits at a multiple of its size: no implicit padding, 72 bytes.
HEADER = struct.Struct("<4sHHBBBBBbbBIIIIIIIIQQII")
FLAG_STREAMED = 0x01
LAYOUT_CODES: dict[str, int] = {"token": 0, "head": 1}
Layout = Literal["token", "head"]

_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_LAYOUTS = {code: name for name, code in LAYOUT_CODES.items()}
_RAW_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32}
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
# Wire width of each integer field of KVHeader: (min, max).
_RANGES = {
    "bits": (0, 255), "group_size": (0, _U32), "key_axis": (-128, 127),
    "value_axis": (-128, 127), "layers": (0, _U32), "batch": (0, _U32), "heads": (0, _U32),
    "head_dim": (0, _U32), "quant_tokens": (0, _U32), "residual_tokens": (0, _U32),
    "seq_len": (0, _U32), "request_id": (0, _U64), "payload_length": (0, _U64),
    "payload_crc": (0, _U32), "sink_tokens": (0, MAX_SINK_TOKENS),
}


class KVMessageError(ValueError):
    """A KV message is malformed, truncated, corrupted, inconsistent or over the limits."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts; every count must be in ``1..max``.

    max_payload_bytes : largest payload (all layers), checked before anything else is sized.
    max_layers, max_batch, max_heads, max_head_dim : per field.
    max_tokens : largest ``sink_tokens + quant_tokens + residual_tokens`` (and, for messages
        with an axis of -2, largest ``group_size``).
    """

    max_payload_bytes: int = 1 << 34
    max_layers: int = 4096
    max_batch: int = 65536
    max_heads: int = 4096
    max_head_dim: int = 4096
    max_tokens: int = 1 << 24

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {v!r}")


DEFAULT_LIMITS = Limits()
# Everything the wire can represent: what :meth:`KVHeader.pack` checks a header against.
WIRE_LIMITS = Limits(max_payload_bytes=_U64, max_layers=_U32, max_batch=_U32, max_heads=_U32,
                     max_head_dim=_U32, max_tokens=_U32)


def _fail(field: str, rule: str) -> KVMessageError:
    return KVMessageError(f"KV message header: {field}: {rule}")


@dataclass(frozen=True, slots=True)
class KVHeader:
    """A KV message header (see the module docstring and docs/transfer.md).

    dtype : model dtype (float16, bfloat16, float32) of scales, minima and raw tensors.
    bits : 2, 4 or 8 (format v1 codes), or the dtype's width (16 or 32) for a raw message.
    group_size : format v1 group size; 0 for raw.
    key_axis, value_axis : -1 (groups along head_dim) or -2 (groups along tokens, layout
        "head" only); 0 for raw.
    layout : "token" (tensors ``[batch, tokens, heads, head_dim]``) or "head"
        (``[batch, heads, tokens, head_dim]``).
    layers, batch, heads, head_dim : counts (heads = KV heads).
    quant_tokens : tokens stored quantized (0 for raw).
    residual_tokens : tokens stored raw in ``dtype`` after the quantized ones.
    seq_len : valid tokens (the first ``seq_len`` of sink, quantized, then residual ones);
        ``<= tokens``.
    request_id : the sender's request id.
    payload_length : bytes of the payload (``expected_payload()``).
    payload_crc : CRC-32C of the payload (0 when ``streamed``).
    streamed : flag STREAMED: the payload CRC is delivered per layer, not in the header.
    sink_tokens : 0..255 tokens stored exact in ``dtype`` *before* the quantized ones
        (quantized messages only; the header byte was "reserved", always 0, before sinks).
    """

    dtype: torch.dtype
    bits: int
    group_size: int
    key_axis: int
    value_axis: int
    layout: Layout
    layers: int
    batch: int
    heads: int
    head_dim: int
    quant_tokens: int
    residual_tokens: int
    seq_len: int
    request_id: int
    payload_length: int
    payload_crc: int
    streamed: bool
    sink_tokens: int = 0

    @property
    def raw(self) -> bool:
        """True for an uncompressed message (bits 16 or 32: every token is residual)."""
        return self.bits >= 16

    @property
    def tokens(self) -> int:
        """Tokens stored per sequence: ``sink_tokens + quant_tokens + residual_tokens``."""
        return self.sink_tokens + self.quant_tokens + self.residual_tokens

    def shape(self, tokens: int) -> tuple[int, int, int, int]:
        """``S(tokens)``: the shape of a key/value tensor of ``tokens`` tokens in this layout."""
        if self.layout == "token":
            return (self.batch, tokens, self.heads, self.head_dim)
        return (self.batch, self.heads, tokens, self.head_dim)

    def parts(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of each array of one layer block, in payload order.

        First ``key_sink`` and ``value_sink``, ``S(sink_tokens)`` in dtype (if
        ``sink_tokens > 0``). Quantized parts (if ``quant_tokens > 0``): ``key_packed``
        (uint8), ``key_scale``, ``key_min`` (dtype), ``value_packed``, ``value_scale``,
        ``value_min``, shapes as
        :meth:`FormatSpec.packed_shape` / :meth:`FormatSpec.param_shape` of
        ``S(quant_tokens)``; then (if ``residual_tokens > 0``) ``key_residual`` and
        ``value_residual``, ``S(residual_tokens)`` in dtype.
        """
        out: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        if self.sink_tokens:
            sink = self.shape(self.sink_tokens)
            out += [("key_sink", sink, self.dtype), ("value_sink", sink, self.dtype)]
        if not self.raw and self.quant_tokens:
            full = self.shape(self.quant_tokens)
            for prefix, axis in (("key", self.key_axis), ("value", self.value_axis)):
                spec = FormatSpec(self.bits, self.group_size, axis)
                params = spec.param_shape(full)
                out += [(f"{prefix}_packed", spec.packed_shape(full), torch.uint8),
                        (f"{prefix}_scale", params, self.dtype),
                        (f"{prefix}_min", params, self.dtype)]
        if self.residual_tokens:
            res = self.shape(self.residual_tokens)
            out += [("key_residual", res, self.dtype), ("value_residual", res, self.dtype)]
        return out

    def layer_nbytes(self) -> int:
        """Bytes of one layer block (Python ints: exact for any field values)."""
        return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.parts())

    def expected_payload(self) -> int:
        """``layers * layer_nbytes()``: the payload length the other fields imply."""
        return self.layers * self.layer_nbytes()

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Raise :class:`KVMessageError`, naming the field and the rule, unless every field is
        consistent and within ``limits``. Allocates nothing proportional to any field."""
        self._check_fields(limits)
        if self.payload_length > limits.max_payload_bytes:
            raise _fail("payload_length", f"{self.payload_length} bytes is over the limit of "
                        f"{limits.max_payload_bytes} (Limits.max_payload_bytes)")
        expected = self.expected_payload()
        if self.payload_length != expected:
            raise _fail("payload_length", f"{self.payload_length} does not match the "
                        f"{expected} bytes the other fields imply")
        if self.streamed and self.payload_crc != 0:
            raise _fail("payload_crc", f"must be 0 when the STREAMED flag is set, got "
                        f"{self.payload_crc:#010x}")

    def _check_fields(self, limits: Limits) -> None:
        """Every rule except the payload length's."""
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in _RAW_BITS:
            raise _fail("dtype", f"must be float16, bfloat16 or float32, got {self.dtype!r}")
        if self.layout not in LAYOUT_CODES:
            raise _fail("layout", f"must be 'token' or 'head', got {self.layout!r}")
        if not isinstance(self.streamed, bool):
            raise _fail("streamed", f"must be a bool, got {self.streamed!r}")
        for name, (lo, hi) in _RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise _fail(name, f"must be an int, got {v!r}")
            if not lo <= v <= hi:
                raise _fail(name, f"{v} does not fit the wire field ({lo}..{hi})")
        for name, cap, what in (("layers", limits.max_layers, "max_layers"),
                                ("batch", limits.max_batch, "max_batch"),
                                ("heads", limits.max_heads, "max_heads"),
                                ("head_dim", limits.max_head_dim, "max_head_dim")):
            v = getattr(self, name)
            if not 1 <= v <= cap:
                raise _fail(name, f"{v} is outside 1..{cap} (Limits.{what})")
        Ts, Tq, Tr = self.sink_tokens, self.quant_tokens, self.residual_tokens
        # Zero tokens is a valid, empty message (payload 0 bytes): e.g. a prefix-cache hit
        # that leaves nothing to ship still completes the protocol.
        if not Ts + Tq + Tr <= limits.max_tokens:
            raise _fail("sink_tokens + quant_tokens + residual_tokens",
                        f"{Ts} + {Tq} + {Tr} = {Ts + Tq + Tr} is outside "
                        f"0..{limits.max_tokens} (Limits.max_tokens)")
        if not self.seq_len <= Ts + Tq + Tr:
            raise _fail("seq_len", f"{self.seq_len} is outside 0..{Ts + Tq + Tr} "
                        f"(sink_tokens + quant_tokens + residual_tokens)")
        raw_bits = _RAW_BITS[self.dtype]
        axes = (("key_axis", self.key_axis), ("value_axis", self.value_axis))
        if self.bits == raw_bits:
            if self.group_size != 0:
                raise _fail("group_size", f"must be 0 for a raw message, got {self.group_size}")
            for name, axis in axes:
                if axis != 0:
                    raise _fail(name, f"must be 0 for a raw message, got {axis}")
            for name, t in (("sink_tokens", Ts), ("quant_tokens", Tq)):
                if t != 0:
                    raise _fail(name, f"must be 0 for a raw message (all tokens are "
                                f"residual), got {t}")
            return
        if self.bits not in SUPPORTED_BITS:
            raise _fail("bits", f"{self.bits} is neither a format v1 width {SUPPORTED_BITS} nor "
                        f"the raw width {raw_bits} of {self.dtype}")
        for name, axis in axes:
            if axis not in (-1, -2):
                raise _fail(name, f"must be -1 (groups along head_dim) or -2 (groups along "
                            f"tokens), got {axis}")
            if axis == -2 and self.layout != "head":
                raise _fail(name, "-2 (groups along tokens) needs layout 'head' (code 1)")
        G = self.group_size
        if G < 1:
            raise _fail("group_size", f"must be positive for a quantized message, got {G}")
        if G * self.bits % 8:
            raise _fail("group_size", f"group_size * bits must be a multiple of 8, got "
                        f"{G} * {self.bits}")
        if -1 in (self.key_axis, self.value_axis) and self.head_dim % G:
            raise _fail("head_dim", f"{self.head_dim} is not divisible by group_size {G} "
                        f"(an axis is -1: groups run along head_dim)")
        if -2 in (self.key_axis, self.value_axis):
            if G > limits.max_tokens:
                raise _fail("group_size", f"{G} is over {limits.max_tokens} "
                            f"(Limits.max_tokens; an axis is -2: groups run along tokens)")
            if Tq % G:
                raise _fail("quant_tokens", f"{Tq} is not a multiple of group_size {G} "
                            f"(an axis is -2: groups run along tokens)")

    def pack(self) -> bytes:
        """The header's :data:`HEADER.size <HEADER>` bytes, header_crc included.

        Validates the header first against what the wire can represent (:data:`WIRE_LIMITS`),
        not a receiver's limits: a receiver applies its own in :func:`decode_header`.
        """
        self.validate(WIRE_LIMITS)
        body = HEADER.pack(
            MAGIC, WIRE_VERSION, HEADER.size, FORMAT_VERSION, DTYPE_CODES[self.dtype], self.bits,
            LAYOUT_CODES[self.layout], FLAG_STREAMED if self.streamed else 0, self.key_axis,
            self.value_axis, self.sink_tokens, self.group_size, self.layers, self.batch,
            self.heads, self.head_dim, self.quant_tokens, self.residual_tokens, self.seq_len,
            self.request_id, self.payload_length, self.payload_crc, 0)[:-4]
        return body + struct.pack("<I", crc32c(body))


def _int_arg(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {v!r}") from None


def build_header(
    *,
    dtype: torch.dtype,
    bits: int,
    layers: int,
    heads: int,
    head_dim: int,
    quant_tokens: int = 0,
    residual_tokens: int = 0,
    sink_tokens: int = 0,
    batch: int = 1,
    group_size: int | None = None,
    key_axis: int | None = None,
    value_axis: int | None = None,
    layout: Layout = "token",
    seq_len: int | None = None,
    request_id: int = 0,
    payload_crc: int = 0,
    streamed: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> KVHeader:
    """A validated :class:`KVHeader` with ``payload_length`` filled in.

    Parameters
    ----------
    dtype : model dtype (float16, bfloat16 or float32).
    bits : 2, 4 or 8 for format v1; the dtype's width (16 for float16/bfloat16, 32 for
        float32) for a raw message (then ``quant_tokens`` must be 0).
    layers, heads, head_dim, batch : counts (heads = KV heads).
    quant_tokens, residual_tokens, sink_tokens : tokens stored quantized / raw after them /
        exact before them (see :class:`KVHeader`).
    group_size, key_axis, value_axis : format v1 parameters; ``None`` means 64, -1, -1 for a
        quantized message and 0, 0, 0 (the only values allowed) for a raw one.
    layout : "token" (``[batch, tokens, heads, head_dim]``) or "head"
        (``[batch, heads, tokens, head_dim]``, needed for an axis of -2).
    seq_len : valid tokens; default all, ``sink_tokens + quant_tokens + residual_tokens``.
    request_id, payload_crc, streamed : as in :class:`KVHeader` (payload_crc must be 0 when
        streamed).
    limits : the header must also pass these (the default is what a default receiver takes).

    Raises
    ------
    KVMessageError (a ValueError) naming the field for inconsistent arguments; TypeError for
    arguments of the wrong type.
    """
    raw = bits in (16, 32)
    if group_size is None:
        group_size = 0 if raw else 64
    if key_axis is None:
        key_axis = 0 if raw else -1
    if value_axis is None:
        value_axis = 0 if raw else -1
    ints = {name: _int_arg(name, v) for name, v in (
        ("bits", bits), ("layers", layers), ("heads", heads), ("head_dim", head_dim),
        ("quant_tokens", quant_tokens), ("residual_tokens", residual_tokens),
        ("sink_tokens", sink_tokens), ("batch", batch),
        ("group_size", group_size), ("key_axis", key_axis), ("value_axis", value_axis),
        ("request_id", request_id), ("payload_crc", payload_crc))}
    ints["seq_len"] = (ints["sink_tokens"] + ints["quant_tokens"] + ints["residual_tokens"]
                       if seq_len is None
                       else _int_arg("seq_len", seq_len))
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    if not isinstance(streamed, bool):
        raise TypeError(f"streamed must be a bool, got {streamed!r}")
    header = KVHeader(dtype=dtype, layout=layout, payload_length=0, streamed=streamed, **ints)
    header._check_fields(limits)
    header = replace(header, payload_length=header.expected_payload())
    header.validate(limits)
    return header


def _host_bytes(data: Any) -> memoryview:
    """A flat byte view of a bytes-like object (or a contiguous CPU uint8 tensor); no copy."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu" or data.dtype != torch.uint8 or not data.is_contiguous():
            raise TypeError("a tensor holding a KV message must be a contiguous CPU uint8 tensor")
        data = data.reshape(-1).numpy()
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"a KV message must be bytes-like, got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise TypeError("a KV message buffer must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def decode_header(data: Any, *, limits: Limits = DEFAULT_LIMITS) -> KVHeader:
    """Decode and validate the header at the start of ``data``.

    Parameters
    ----------
    data : bytes-like (or contiguous CPU uint8 tensor) of at least ``HEADER.size`` bytes;
        bytes after the header are ignored (the payload arrives separately).
    limits : the receiver's limits.

    Returns
    -------
    KVHeader that passes ``validate(limits)``.

    Raises
    ------
    KVMessageError naming the field and the rule: truncated header, bad magic, unsupported wire
    version or header size, header CRC mismatch, unknown format version / dtype code / layout
    code / flags, then every rule of :meth:`KVHeader.validate`. Reads
    only the header's bytes and allocates nothing proportional to any field value.
    """
    view = _host_bytes(data)
    if len(view) < HEADER.size:
        raise KVMessageError(f"KV message header truncated: {len(view)} bytes, the header is "
                             f"{HEADER.size}")
    head = bytes(view[:HEADER.size])
    (magic, wire, hsize, fmt, dcode, bits, lcode, flags, kax, vax, sink, G, L, B, H, D, Tq,
     Tr, seq, rid, plen, pcrc, hcrc) = HEADER.unpack(head)
    if magic != MAGIC:
        raise _fail("magic", f"{magic!r} is not {MAGIC!r} (not a ThunderKV KV message)")
    if wire != WIRE_VERSION:
        raise _fail("wire_version", f"unsupported version {wire} (this reader knows "
                    f"{WIRE_VERSION})")
    if hsize != HEADER.size:
        raise _fail("header_size", f"{hsize} is not {HEADER.size} (wire version {WIRE_VERSION})")
    if crc32c(head[:-4]) != hcrc:
        raise _fail("header_crc", "checksum mismatch: the header is corrupted")
    if fmt != FORMAT_VERSION:
        raise _fail("format_version", f"unsupported KV format version {fmt} (this reader "
                    f"knows {FORMAT_VERSION})")
    if dcode not in _DTYPES:
        raise _fail("dtype", f"unknown dtype code {dcode} (known: {sorted(_DTYPES)})")
    if lcode not in _LAYOUTS:
        raise _fail("layout", f"unknown layout code {lcode} (0 token-major, 1 head-major)")
    if flags & ~FLAG_STREAMED:
        raise _fail("flags", f"unknown flag bits {flags & ~FLAG_STREAMED:#04x} "
                    f"(only bit 0, STREAMED, is defined)")
    header = KVHeader(
        dtype=_DTYPES[dcode], bits=bits, group_size=G, key_axis=kax, value_axis=vax,
        layout=_LAYOUTS[lcode], layers=L, batch=B, heads=H, head_dim=D, quant_tokens=Tq,
        residual_tokens=Tr, seq_len=seq, request_id=rid, payload_length=plen, payload_crc=pcrc,
        streamed=bool(flags & FLAG_STREAMED), sink_tokens=sink)
    header.validate(limits)
    return header


def layer_views(header: KVHeader, layer_block: torch.Tensor) -> dict[str, torch.Tensor]:
    """Typed views of one layer block, keyed by the names of :meth:`KVHeader.parts`.

    Parameters
    ----------
    header : a validated header.
    layer_block : 1-D contiguous uint8 tensor of exactly ``header.layer_nbytes()`` bytes, on
        CPU or CUDA (e.g. a slice of a registered receive buffer).

    Returns
    -------
    ``{name: tensor}`` in payload order: uint8 codes and ``header.dtype`` scales, minima and
    residuals with the shapes of :meth:`KVHeader.parts`, what :func:`thunderkv.dequantize`
    takes. They are views of ``layer_block`` (no copy), except a part whose byte offset in
    the block's storage is not a multiple of its element size, which is copied: that needs a
    packed part whose byte count is not a multiple of the dtype's size (e.g. 2-bit codes of
    head_dim 4 and an odd token count) or a block that starts unaligned in its buffer.
    """
    if not isinstance(layer_block, torch.Tensor):
        raise TypeError(f"layer_block must be a torch.Tensor, got {type(layer_block).__name__}")
    if layer_block.dtype != torch.uint8:
        raise TypeError(f"layer_block must be uint8, got {layer_block.dtype}")
    nbytes = header.layer_nbytes()
    if layer_block.dim() != 1 or layer_block.numel() != nbytes:
        raise ValueError(f"layer_block must be 1-D with {nbytes} bytes (header.layer_nbytes()), "
                         f"got shape {tuple(layer_block.shape)}")
    if not layer_block.is_contiguous():
        raise ValueError("layer_block must be contiguous")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape, dtype in header.parts():
        n = math.prod(shape) * dtype.itemsize
        chunk = layer_block[offset:offset + n]
        if chunk.storage_offset() % dtype.itemsize:
            chunk = chunk.clone()  # unaligned for this dtype: view() cannot reinterpret it
        out[name] = chunk.view(dtype).view(shape)
        offset += n
    return out


def encode_message(header: KVHeader, layers: list[dict[str, torch.Tensor]]) -> bytes:
    """A whole, non-streamed message: ``header`` with ``payload_crc`` set, then the payload.

    Parameters
    ----------
    header : a header for these tensors (e.g. from :func:`build_header`); its payload_crc is
        replaced by the payload's CRC-32C. Must not be ``streamed``.
    layers : ``header.layers`` dicts, each with exactly the parts of :meth:`KVHeader.parts`
        (names, shapes, dtypes; any device and strides).

    Returns
    -------
    bytes: ``HEADER.size + header.payload_length`` bytes. For small in-memory messages; the
    transfer path writes layer blocks straight into registered buffers instead.
    """
    if not isinstance(header, KVHeader):
        raise TypeError(f"header must be a KVHeader, got {type(header).__name__}")
    header.validate(WIRE_LIMITS)
    if header.streamed:
        raise ValueError("encode_message writes whole messages with the payload CRC in the "
                         "header; a STREAMED header's CRC travels per layer")
    if not isinstance(layers, (list, tuple)) or len(layers) != header.layers:
        raise ValueError(f"layers must be a list of header.layers = {header.layers} dicts, got "
                         f"{len(layers) if isinstance(layers, (list, tuple)) else type(layers)}")
    parts = header.parts()
    names = [name for name, _, _ in parts]
    chunks: list[bytes] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or sorted(layer) != sorted(names):
            got = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise ValueError(f"layer {i} must hold exactly {names}, got {got}")
        for name, shape, dtype in parts:
            t = layer[name]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"layer {i} {name} must be a {dtype} tensor of shape {shape}, got "
                    f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            chunks.append(flat.numpy().tobytes())
    payload = b"".join(chunks)
    return replace(header, payload_crc=crc32c(payload)).pack() + payload


def decode_message(
    data: Any, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[KVHeader, list[dict[str, torch.Tensor]]]:
    """Decode a whole message from :func:`encode_message`.

    Validates the header (:func:`decode_header`), the total length (a truncated message or
    trailing bytes are rejected) and the payload CRC-32C before returning anything.

    Returns
    -------
    (header, layers): one dict per layer as :func:`layer_views` gives, CPU tensors that are
    views of one private copy of the payload.
    """
    header = decode_header(data, limits=limits)
    view = _host_bytes(data)
    if header.streamed:
        raise KVMessageError("KV message: STREAMED messages carry their payload CRC per layer; "
                             "decode_message takes whole messages only")
    total = HEADER.size + header.payload_length
    if len(view) < total:
        raise KVMessageError(f"KV message truncated: {len(view)} bytes, the header says {total}")
    if len(view) > total:
        raise KVMessageError(f"KV message has {len(view) - total} trailing bytes after the "
                             f"{total} the header says")
    payload = view[HEADER.size:]
    if crc32c(payload) != header.payload_crc:
        raise KVMessageError("KV message: payload_crc mismatch: the payload is corrupted")
    buf = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())
    n = header.layer_nbytes()
    return header, [layer_views(header, buf[i * n:(i + 1) * n]) for i in range(header.layers)]
