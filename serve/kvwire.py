"""One sequence's KV <-> a transfer message (wire format v1, batch 1).

16-bit: layout "token", every token raw (fp16), so the decode side's cache is bit-identical to
the prefill side's. Quantized (KIVI-style, as in :mod:`thunderkv.hf`): layout "head", keys
quantized per channel (groups of ``group_size`` tokens, axis -2: key outliers live in channels),
values per token (axis -1), and the ragged tail of ``tokens % group_size`` tokens sent raw, so
no token is padded or quantized across a partial group. Optionally the first ``sink`` tokens
(the attention sink, see docs/hf.md) are sent raw too, ahead of the quantized ones.

The prefill side writes each layer's K/V straight into its slice of the registered send buffer;
the decode side reads each layer from the receive pool (dequantizing straight from it).
"""

from __future__ import annotations

import torch

from thunderkv.api import QuantizedTensor, dequantize, quantize_into
from thunderkv.bench.transfer import KVGeometry, make_header
from thunderkv.format import FormatSpec
from thunderkv.transfer.wire import KVHeader, build_header, layer_views


def geometry_of(runner) -> KVGeometry:
    return KVGeometry(runner.name, runner.num_layers, runner.num_kv_heads, runner.head_dim)


DEFAULT_SINK = 0  # opt-in (--kv-sink-tokens): see docs/serving.md, "Attention sink, opt-in"


def message_header(geo: KVGeometry, tokens: int, bits: int, request_id: int,
                   group_size: int = 64, sink: int = DEFAULT_SINK) -> KVHeader:
    """The header of one sequence's KV: raw token-major for bits 16, KIVI head-major else
    (``sink`` exact first tokens, whole groups quantized, the ragged tail raw)."""
    if bits >= 16:
        return make_header(geo, tokens, 16, 0, request_id)
    g = min(group_size, geo.head_dim)
    sink = min(sink, tokens)
    quant = (tokens - sink) // g * g
    return build_header(dtype=torch.float16, bits=bits, layers=geo.layers, heads=geo.kv_heads,
                        head_dim=geo.head_dim, sink_tokens=sink, quant_tokens=quant,
                        residual_tokens=tokens - sink - quant, group_size=g, key_axis=-2,
                        value_axis=-1, layout="head", request_id=request_id, streamed=True)


def write_layer(header: KVHeader, payload: torch.Tensor, layer: int, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """Write layer ``layer``'s K/V (``[T, kv_heads, head_dim]``) into the message payload."""
    n = header.layer_nbytes()
    views = layer_views(header, payload[layer * n:(layer + 1) * n])
    for name, x in (("key", k), ("value", v)):
        x = x.to(header.dtype)
        if header.raw:
            views[f"{name}_residual"][0].copy_(x)
            continue
        x = x.transpose(0, 1)  # [H, T, D]
        Ts, Tq = header.sink_tokens, header.quant_tokens
        if Ts:
            views[f"{name}_sink"][0].copy_(x[:, :Ts])
        if Tq:
            axis = header.key_axis if name == "key" else header.value_axis
            quantize_into(x[None, :, Ts:Ts + Tq].contiguous(), views[f"{name}_packed"],
                          views[f"{name}_scale"], views[f"{name}_min"], bits=header.bits,
                          group_size=header.group_size, axis=axis)
        if header.residual_tokens:
            views[f"{name}_residual"][0].copy_(x[:, Ts + Tq:])


def read_layers(header: KVHeader, payload: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) ``[T, kv_heads, head_dim]`` in the message dtype, from the payload
    (e.g. a view into the receive pool): views for 16-bit, dequantized tensors otherwise."""
    n = header.layer_nbytes()
    out = []
    for i in range(header.layers):
        views = layer_views(header, payload[i * n:(i + 1) * n])
        pair = []
        for name in ("key", "value"):
            if header.raw:
                pair.append(views[f"{name}_residual"][0])
                continue
            pieces = [views[f"{name}_sink"][0]] if header.sink_tokens else []
            if header.quant_tokens:
                axis = header.key_axis if name == "key" else header.value_axis
                q = QuantizedTensor(views[f"{name}_packed"], views[f"{name}_scale"],
                                    views[f"{name}_min"],
                                    FormatSpec(header.bits, header.group_size, axis),
                                    torch.Size(header.shape(header.quant_tokens)), header.dtype)
                pieces.append(dequantize(q)[0])
            if header.residual_tokens:
                pieces.append(views[f"{name}_residual"][0])
            pair.append(torch.cat(pieces, dim=1).transpose(0, 1))  # [T, H, D]
        out.append(tuple(pair))
    return out


def read_sequence(received, runner):
    """A runner SequenceKV holding the received KV (copied out of the receive pool)."""
    from .runner import SequenceKV

    return SequenceKV.from_layers(read_layers(received.header, received.buffer))
