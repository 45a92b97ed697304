"""serve.kvwire: one sequence's KV through the wire layouts the workers use."""

from __future__ import annotations

import pytest
import torch
from thunderkv.serve.kvwire import message_header, read_layers, write_layer

from thunderkv import FormatSpec, quantize
from thunderkv.bench.transfer import KVGeometry

GEO = KVGeometry("test", 2, 3, 64)


def roundtrip(tokens: int, bits: int, gen, sink: int = 1):
    layers = [tuple(torch.randn(tokens, 3, 64, generator=gen).half() for _ in range(2))
              for _ in range(GEO.layers)]
    header = message_header(GEO, tokens, bits, 5, sink=sink)
    payload = torch.full((header.payload_length,), 0xAB, dtype=torch.uint8)
    for i, (k, v) in enumerate(layers):
        write_layer(header, payload, i, k, v)
    return layers, header, read_layers(header, payload)


@pytest.mark.parametrize("tokens", [1, 63, 64, 130])
def test_16bit_is_lossless(gen, tokens):
    layers, header, back = roundtrip(tokens, 16, gen)
    assert header.layout == "token" and header.residual_tokens == tokens
    for (k, v), (k2, v2) in zip(layers, back):
        assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("sink", [0, 1, 3])
def test_4bit_is_kivi_after_an_exact_sink_with_a_raw_tail(gen, tokens, sink):
    layers, header, back = roundtrip(tokens, 4, gen, sink)
    Ts = min(sink, tokens)
    Tq = (tokens - Ts) // 64 * 64
    assert (header.layout, header.key_axis, header.value_axis) == ("head", -2, -1)
    assert (header.sink_tokens, header.quant_tokens, header.residual_tokens) == (
        Ts, Tq, tokens - Ts - Tq)
    for (k, v), (k2, v2) in zip(layers, back):
        assert k2.shape == k.shape == v2.shape
        assert torch.equal(k2[:Ts], k[:Ts]) and torch.equal(v2[:Ts], v[:Ts])  # the sink
        end = Ts + Tq
        assert torch.equal(k2[end:], k[end:]) and torch.equal(v2[end:], v[end:])  # the raw tail
        if Tq:  # the middle: exactly format v1 of the head-major tensor, keys per channel
            kq = quantize(k[Ts:end].transpose(0, 1)[None].contiguous(), bits=4, group_size=64,
                          axis=-2)
            assert torch.equal(k2[Ts:end].transpose(0, 1)[None], kq.dequantize())
            assert kq.spec == FormatSpec(4, 64, -2)
            assert (k2[Ts:end] - k[Ts:end]).abs().max() < 0.5
