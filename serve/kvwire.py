"""One sequence's KV <-> a transfer message (wire format v1, token-major, batch 1).

The prefill side writes each layer's K/V straight into its slice of the registered send buffer
(quantized with format v1 for 4-bit, copied for 16-bit); the decode side reads each layer from
the receive pool (dequantizing 4-bit straight from it) into the runner's own cache.
"""

from __future__ import annotations

import torch

from thunderkv.api import QuantizedTensor, dequantize, quantize_into
from thunderkv.bench.transfer import KVGeometry
from thunderkv.format import FormatSpec
from thunderkv.transfer.wire import KVHeader, layer_views


def geometry_of(runner) -> KVGeometry:
    return KVGeometry(runner.name, runner.num_layers, runner.num_kv_heads, runner.head_dim)


def write_layer(header: KVHeader, payload: torch.Tensor, layer: int, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """Write layer ``layer``'s K/V (``[T, kv_heads, head_dim]``) into the message payload."""
    n = header.layer_nbytes()
    views = layer_views(header, payload[layer * n:(layer + 1) * n])
    for name, x in (("key", k), ("value", v)):
        x = x.to(header.dtype).unsqueeze(0).contiguous()
        if header.raw:
            views[f"{name}_residual"].copy_(x)
        else:
            quantize_into(x, views[f"{name}_packed"], views[f"{name}_scale"],
                          views[f"{name}_min"], bits=header.bits,
                          group_size=header.group_size, axis=-1)


def read_layers(received) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) ``[T, kv_heads, head_dim]`` in the message dtype, from the receive pool
    (views for 16-bit, freshly dequantized tensors for 4-bit)."""
    header = received.header
    out = []
    for i in range(header.layers):
        views = received.layer(i)
        pair = []
        for name in ("key", "value"):
            if header.raw:
                pair.append(views[f"{name}_residual"][0])
            else:
                shape = header.shape(header.quant_tokens)
                q = QuantizedTensor(views[f"{name}_packed"], views[f"{name}_scale"],
                                    views[f"{name}_min"], FormatSpec(header.bits,
                                                                     header.group_size, -1),
                                    torch.Size(shape), header.dtype)
                pair.append(dequantize(q)[0])
        out.append(tuple(pair))
    return out


def read_sequence(received, runner):
    """A runner SequenceKV holding the received KV (copied out of the receive pool)."""
    from .runner import SequenceKV

    return SequenceKV.from_layers(read_layers(received))
