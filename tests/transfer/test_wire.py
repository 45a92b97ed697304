"""Wire format v1 of KV messages (thunderkv.transfer.wire): round trips, every rejection rule,
agreement with the paged cache's transfer buffer, and a decode_header fuzz test."""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thunderkv import QuantizedTensor, dequantize, quantize
from thunderkv.format import FormatSpec
from thunderkv.paged import PagedKVCache, pack_for_transfer, quantize_to_paged
from thunderkv.transfer.checksum import crc32c
from thunderkv.transfer.wire import (
    DEFAULT_LIMITS,
    HEADER,
    MAGIC,
    WIRE_LIMITS,
    KVHeader,
    KVMessageError,
    Limits,
    build_header,
    decode_header,
    decode_message,
    encode_message,
    layer_views,
)

FIELDS = ("magic", "wire_version", "header_size", "format_version", "dtype", "bits", "layout",
          "flags", "key_axis", "value_axis", "sink_tokens", "group_size", "layers", "batch",
          "heads", "head_dim", "quant_tokens", "residual_tokens", "seq_len", "request_id",
          "payload_length", "payload_crc", "header_crc")


def unpack(data: bytes) -> dict:
    return dict(zip(FIELDS, HEADER.unpack(data[:HEADER.size])))


def repack(fields: dict) -> bytes:
    """The header bytes of ``fields`` with header_crc recomputed."""
    body = HEADER.pack(*(fields[f] for f in FIELDS[:-1]), 0)[:-4]
    return body + struct.pack("<I", crc32c(body))


def random_parts(header: KVHeader, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape, dtype in header.parts():
        if dtype == torch.uint8:
            out[name] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen).to(dtype)
    return out


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def assert_layers_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w) or sorted(g) == sorted(w)
        for name in w:
            assert bits_equal(g[name], w[name]), name


# --------------------------------------------------------------------------- round trips

QUANT_LAYOUTS = [("token", -1, -1), ("head", -1, -1), ("head", -2, -1), ("head", -2, -2),
                 ("head", -1, -2)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("layout,key_axis,value_axis", QUANT_LAYOUTS)
@pytest.mark.parametrize("residual", [0, 5])
@pytest.mark.parametrize("sink", [0, 3])
def test_round_trip_quantized(bits, layout, key_axis, value_axis, residual, sink, gen):
    dtype = DTYPES[(bits + residual + len(layout)) % 3]
    h = build_header(dtype=dtype, bits=bits, layers=2, batch=2, heads=2, head_dim=32,
                     group_size=16, quant_tokens=32, residual_tokens=residual, layout=layout,
                     key_axis=key_axis, value_axis=value_axis, request_id=2**64 - 1,
                     seq_len=30 + residual + sink, sink_tokens=sink)
    layers = [random_parts(h, gen) for _ in range(h.layers)]
    msg = encode_message(h, layers)
    assert len(msg) == HEADER.size + h.expected_payload() < 64 * 1024
    got_h, got = decode_message(msg)
    assert got_h.payload_crc == crc32c(msg[HEADER.size:])
    assert got_h == KVHeader(**{**{f: getattr(h, f) for f in h.__slots__},
                                "payload_crc": got_h.payload_crc})
    assert [n for n, _, _ in h.parts()] == list(got[0])
    assert_layers_equal(got, layers)
    assert ("key_residual" in got[0]) == (residual > 0)
    # the sink comes first, in the model dtype, S(sink)
    assert (list(got[0])[:2] == ["key_sink", "value_sink"]) == (sink > 0)
    if sink:
        shape = (2, sink, 2, 32) if layout == "token" else (2, 2, sink, 32)
        assert h.parts()[0] == ("key_sink", shape, dtype) and h.tokens == sink + 32 + residual


@pytest.mark.parametrize("dtype,bits", [(torch.float16, 16), (torch.bfloat16, 16),
                                        (torch.float32, 32)])
@pytest.mark.parametrize("layout", ["token", "head"])
def test_round_trip_raw(dtype, bits, layout, gen):
    h = build_header(dtype=dtype, bits=bits, layers=3, batch=2, heads=3, head_dim=8,
                     residual_tokens=7, layout=layout, seq_len=6)
    assert h.raw and (h.group_size, h.key_axis, h.value_axis, h.quant_tokens) == (0, 0, 0, 0)
    shape = (2, 7, 3, 8) if layout == "token" else (2, 3, 7, 8)
    assert h.parts() == [("key_residual", shape, dtype), ("value_residual", shape, dtype)]
    layers = [random_parts(h, gen) for _ in range(h.layers)]
    msg = encode_message(h, layers)
    # A raw layer block is just key then value.
    n = h.layer_nbytes()
    first = msg[HEADER.size:HEADER.size + n]
    assert first == b"".join(layers[0][k].view(torch.uint8).numpy().tobytes()
                             for k in ("key_residual", "value_residual"))
    got_h, got = decode_message(msg)
    assert got_h.bits == bits and got_h.dtype == dtype and got_h.seq_len == 6
    assert_layers_equal(got, layers)


def test_round_trip_residual_only_quantized(gen):
    """A quantized message whose tokens all sit in the residual (a prompt shorter than G)."""
    h = build_header(dtype=torch.bfloat16, bits=2, layers=1, heads=1, head_dim=16,
                     group_size=16, layout="head", key_axis=-2, residual_tokens=9)
    assert [n for n, _, _ in h.parts()] == ["key_residual", "value_residual"]
    layers = [random_parts(h, gen)]
    assert_layers_equal(decode_message(encode_message(h, layers))[1], layers)


def test_round_trip_quantize_kivi(gen):
    """Realistic parts from thunderkv.quantize: KIVI keys per channel, values per token."""
    B, H, Tq, Tr, D, G = 2, 2, 64, 5, 32, 32
    key = torch.randn(B, H, Tq + Tr, D, generator=gen).to(torch.bfloat16)
    value = torch.randn(B, H, Tq + Tr, D, generator=gen).to(torch.bfloat16)
    qk = quantize(key[:, :, :Tq], bits=2, group_size=G, axis=-2)
    qv = quantize(value[:, :, :Tq], bits=2, group_size=G, axis=-1)
    h = build_header(dtype=torch.bfloat16, bits=2, group_size=G, layers=1, batch=B, heads=H,
                     head_dim=D, quant_tokens=Tq, residual_tokens=Tr, layout="head",
                     key_axis=-2, value_axis=-1, request_id=7)
    layer = {"key_packed": qk.packed, "key_scale": qk.scale, "key_min": qk.minimum,
             "value_packed": qv.packed, "value_scale": qv.scale, "value_min": qv.minimum,
             "key_residual": key[:, :, Tq:], "value_residual": value[:, :, Tq:]}
    got_h, (got,) = decode_message(encode_message(h, [layer]))
    assert_layers_equal([got], [layer])
    for prefix, q in (("key", qk), ("value", qv)):
        back = QuantizedTensor(got[f"{prefix}_packed"], got[f"{prefix}_scale"],
                               got[f"{prefix}_min"], FormatSpec(2, G, q.axis),
                               torch.Size((B, H, Tq, D)), torch.bfloat16)
        assert bits_equal(dequantize(back), dequantize(q))


def test_layer_block_equals_paged_pack_for_transfer(gen):
    """One layer block of a token-major batch-1 message is pack_for_transfer's buffer."""
    H, D, G, bs = 2, 64, 32, 16
    block_ids = torch.tensor([4, 1, 3])
    T = block_ids.numel() * bs
    slots = (block_ids.repeat_interleave(bs) * bs + torch.arange(T) % bs)
    caches, layers = [], []
    for _ in range(2):
        cache = PagedKVCache.allocate(6, bs, H, D, dtype=torch.float16, bits=4, group_size=G)
        key = torch.randn(T, H, D, generator=gen).half()
        value = torch.randn(T, H, D, generator=gen).half()
        quantize_to_paged(key, value, cache, slots)
        caches.append(cache)
        qk = quantize(key.unsqueeze(0), bits=4, group_size=G)
        qv = quantize(value.unsqueeze(0), bits=4, group_size=G)
        layers.append({"key_packed": qk.packed, "key_scale": qk.scale, "key_min": qk.minimum,
                       "value_packed": qv.packed, "value_scale": qv.scale,
                       "value_min": qv.minimum})
    # The sequence has 45 valid tokens; the sender ships its 3 whole blocks.
    h = build_header(dtype=torch.float16, bits=4, group_size=G, layers=2, heads=H, head_dim=D,
                     quant_tokens=T, seq_len=T - 3)
    packs = [pack_for_transfer(c, block_ids) for c in caches]
    assert all(p.numel() == h.layer_nbytes() for p in packs)
    msg = encode_message(h, layers)
    assert msg[HEADER.size:] == b"".join(p.numpy().tobytes() for p in packs)
    for p, layer in zip(packs, layers):
        views = layer_views(h, p)
        assert_layers_equal([views], [layer])
        assert all(v.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                   for v in views.values())  # zero-copy


def test_pack_decode_header_round_trip_streamed():
    h = build_header(dtype=torch.float16, bits=8, layers=4, heads=8, head_dim=128,
                     group_size=128, quant_tokens=1024, residual_tokens=3, streamed=True,
                     request_id=12345)
    data = h.pack()
    assert len(data) == HEADER.size == 72
    assert decode_header(data + b"payload ignored") == h
    assert decode_header(bytearray(data)) == h
    assert decode_header(memoryview(data)) == h
    assert decode_header(torch.frombuffer(bytearray(data), dtype=torch.uint8)) == h
    f = unpack(data)
    assert (f["magic"], f["wire_version"], f["header_size"], f["flags"], f["payload_crc"]) == (
        MAGIC, 1, 72, 1, 0)
    assert f["payload_length"] == h.expected_payload() == 4 * h.layer_nbytes()


def test_huge_consistent_header_is_capped_not_allocated():
    """A consistent header describing 2**49 bytes: rejected by the default cap, accepted by
    a receiver with no cap, and neither decode allocates anything like its size."""
    h = build_header(dtype=torch.float16, bits=16, layers=1024, batch=1024, heads=64,
                     head_dim=128, residual_tokens=1 << 14, limits=WIRE_LIMITS)
    assert h.payload_length == 1 << 49
    data = h.pack()
    with pytest.raises(KVMessageError, match="payload_length.*over the limit"):
        decode_header(data)
    tracemalloc.start()
    try:
        assert decode_header(data, limits=WIRE_LIMITS) == h
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --------------------------------------------------------------------------- rejections


def base_header() -> KVHeader:
    """A valid header exercising both axis rules (keys per channel, values per token)."""
    return build_header(dtype=torch.float16, bits=4, group_size=16, layers=2, batch=2, heads=2,
                        head_dim=32, quant_tokens=32, residual_tokens=4, layout="head",
                        key_axis=-2, value_axis=-1, seq_len=33, request_id=99,
                        payload_crc=0xDEADBEEF)


def raw_header() -> KVHeader:
    return build_header(dtype=torch.bfloat16, bits=16, layers=2, heads=2, head_dim=8,
                        residual_tokens=4)


# (base, mutation, pattern the KVMessageError message must match)
BAD = [
    ("q", {"magic": b"TKVC"}, "magic"),
    ("q", {"wire_version": 2}, "wire_version.*unsupported"),
    ("q", {"wire_version": 0}, "wire_version.*unsupported"),
    ("q", {"header_size": 80}, "header_size"),
    ("q", {"format_version": 2}, "format_version"),
    ("q", {"format_version": 0}, "format_version"),
    ("q", {"dtype": 3}, "dtype.*unknown dtype code"),
    ("q", {"dtype": 255}, "dtype.*unknown dtype code"),
    ("q", {"bits": 3}, "bits.*neither"),
    ("q", {"bits": 0}, "bits.*neither"),
    ("q", {"bits": 32}, "bits.*neither"),  # float16's raw width is 16
    ("r", {"bits": 32}, "bits.*neither"),  # bfloat16 too
    ("q", {"layout": 2}, "layout.*unknown layout"),
    ("q", {"layout": 0}, "key_axis.*layout 'head'"),
    ("q", {"flags": 2}, "flags.*unknown flag"),
    ("q", {"flags": 0x81}, "flags.*unknown flag"),
    ("q", {"sink_tokens": 1}, "payload_length.*does not match"),
    ("r", {"sink_tokens": 1}, "sink_tokens.*must be 0 for a raw message"),
    ("q", {"key_axis": 0}, "key_axis.*-1.*-2"),
    ("q", {"key_axis": -3}, "key_axis"),
    ("q", {"value_axis": 1}, "value_axis"),
    ("q", {"value_axis": -128}, "value_axis"),
    ("q", {"group_size": 0}, "group_size.*positive"),
    ("q", {"group_size": 3}, "group_size.*multiple of 8"),
    ("q", {"group_size": 24}, "head_dim.*not divisible by group_size"),
    ("q", {"value_axis": -2, "group_size": 64}, "quant_tokens.*not a multiple of group_size"),
    ("q", {"quant_tokens": 40}, "quant_tokens.*not a multiple of group_size"),
    ("q", {"value_axis": -2, "group_size": (1 << 24) + 8}, "group_size.*max_tokens"),
    ("q", {"layers": 0}, "layers.*outside 1..4096"),
    ("q", {"layers": 4097}, "layers.*outside 1..4096"),
    ("q", {"batch": 0}, "batch.*outside"),
    ("q", {"batch": 65537}, "batch.*outside"),
    ("q", {"heads": 0}, "heads.*outside"),
    ("q", {"heads": 2**32 - 1}, "heads.*outside"),
    ("q", {"head_dim": 0}, "head_dim.*outside"),
    ("q", {"head_dim": 4097}, "head_dim.*outside"),
    ("q", {"residual_tokens": 1 << 24}, "residual_tokens.*max_tokens"),
    ("q", {"quant_tokens": 2**32 - 16}, "max_tokens"),
    ("q", {"seq_len": 37}, "seq_len.*outside 0..36"),
    ("q", {"payload_length": 0}, "payload_length.*does not match"),
    ("q", {"payload_length": 1}, "payload_length.*does not match"),
    ("q", {"payload_length": 2**60}, "payload_length.*over the limit"),
    ("q", {"payload_length": 2**64 - 1}, "payload_length.*over the limit"),
    ("q", {"flags": 1}, "payload_crc.*STREAMED"),
    ("r", {"group_size": 64}, "group_size.*raw"),
    ("r", {"key_axis": -1}, "key_axis.*raw"),
    ("r", {"value_axis": -1}, "value_axis.*raw"),
    ("r", {"quant_tokens": 16}, "quant_tokens.*raw"),
    ("r", {"dtype": 2}, "bits.*neither.*32"),  # the same bits for float32 is not its width
]


@pytest.mark.parametrize("base,mutation,pattern", BAD,
                         ids=[f"{b}-{'-'.join(f'{k}={v}' for k, v in m.items())}"
                              for b, m, _ in BAD])
def test_decode_header_rejects(base, mutation, pattern):
    good = (base_header() if base == "q" else raw_header()).pack()
    decode_header(good)  # the base is valid ...
    with pytest.raises(KVMessageError, match=pattern):
        decode_header(repack({**unpack(good), **mutation}))  # ... the mutation is not


@pytest.mark.parametrize("limits,pattern", [
    (Limits(max_layers=1), "layers.*max_layers"), (Limits(max_batch=1), "batch"),
    (Limits(max_heads=1), "heads"), (Limits(max_head_dim=16), "head_dim"),
    (Limits(max_tokens=35), "max_tokens"), (Limits(max_payload_bytes=1000), "over the limit"),
])
def test_decode_header_applies_receiver_limits(limits, pattern):
    data = base_header().pack()
    with pytest.raises(KVMessageError, match=pattern):
        decode_header(data, limits=limits)


def test_every_flipped_header_bit_is_caught():
    good = base_header().pack()
    for i, bit in itertools.product(range(HEADER.size), range(8)):
        bad = bytearray(good)
        bad[i] ^= 1 << bit
        # magic, then wire_version and header_size are read before the CRC (so that a newer
        # version is reported as such); every other byte is covered by header_crc.
        field = "magic" if i < 4 else "wire_version" if i < 6 else "header_size" if i < 8 \
            else "header_crc"
        with pytest.raises(KVMessageError, match=field):
            decode_header(bytes(bad))


@pytest.mark.parametrize("n", [0, 1, 4, HEADER.size - 1])
def test_truncated_header(n):
    with pytest.raises(KVMessageError, match="truncated"):
        decode_header(base_header().pack()[:n])


@pytest.fixture
def message(gen) -> tuple[KVHeader, bytes]:
    h = base_header()
    return h, encode_message(h, [random_parts(h, gen) for _ in range(h.layers)])


def test_decode_message_rejects_truncated_payload(message):
    _, msg = message
    for cut in (1, 100, len(msg) - HEADER.size):
        with pytest.raises(KVMessageError, match="truncated"):
            decode_message(msg[:-cut])


def test_decode_message_rejects_trailing_bytes(message):
    _, msg = message
    with pytest.raises(KVMessageError, match="trailing"):
        decode_message(msg + b"\0")


def test_decode_message_rejects_payload_corruption(message):
    _, msg = message
    for pos in (HEADER.size, len(msg) // 2, len(msg) - 1):
        bad = bytearray(msg)
        bad[pos] ^= 0x10
        with pytest.raises(KVMessageError, match="payload_crc mismatch"):
            decode_message(bytes(bad))


def test_decode_message_rejects_streamed(message, gen):
    h, msg = message
    f = unpack(msg)
    streamed = repack({**f, "flags": 1, "payload_crc": 0}) + msg[HEADER.size:]
    assert decode_header(streamed).streamed
    with pytest.raises(KVMessageError, match="STREAMED"):
        decode_message(streamed)


# --------------------------------------------------------------------------- API errors


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"bits": 16, "group_size": 64}, KVMessageError, "group_size.*raw"),
    ({"bits": 16, "key_axis": -1}, KVMessageError, "key_axis.*raw"),
    ({"bits": 16, "quant_tokens": 64}, KVMessageError, "quant_tokens.*raw"),
    ({"bits": 16, "quant_tokens": 0, "sink_tokens": 1}, KVMessageError, "sink_tokens.*raw"),
    ({"sink_tokens": 256}, KVMessageError, "sink_tokens.*wire field"),
    ({"sink_tokens": -1}, KVMessageError, "sink_tokens.*wire field"),
    ({"sink_tokens": 2, "seq_len": 67}, KVMessageError, "seq_len.*sink_tokens"),
    ({"bits": 16, "dtype": torch.float32}, KVMessageError, "bits.*neither"),
    ({"bits": 32}, KVMessageError, "bits.*neither"),
    ({"bits": 5}, KVMessageError, "bits.*neither"),
    ({"key_axis": -2}, KVMessageError, "key_axis.*layout 'head'"),
    ({"layout": "tokens"}, KVMessageError, "layout"),
    ({"dtype": torch.int8}, KVMessageError, "dtype"),
    ({"dtype": "float16"}, TypeError, "dtype"),
    ({"group_size": 48}, KVMessageError, "head_dim.*not divisible"),
    ({"seq_len": 65}, KVMessageError, "seq_len"),
    ({"streamed": True, "payload_crc": 5}, KVMessageError, "payload_crc.*STREAMED"),
    ({"layers": 2.0}, TypeError, "layers must be an int"),
    ({"heads": True}, TypeError, "heads must be an int"),
    ({"request_id": -1}, KVMessageError, "request_id.*wire field"),
    ({"payload_crc": 1 << 32}, KVMessageError, "payload_crc.*wire field"),
    ({"layers": 5000}, KVMessageError, "layers.*max_layers"),
])
def test_build_header_rejects(kwargs, error, pattern):
    args = {"dtype": torch.float16, "bits": 4, "layers": 2, "heads": 2, "head_dim": 64,
            "quant_tokens": 64, **kwargs}
    with pytest.raises(error, match=pattern):
        build_header(**args)


def test_build_header_defaults():
    h = build_header(dtype=torch.float16, bits=4, layers=2, heads=2, head_dim=64,
                     quant_tokens=64, residual_tokens=3)
    assert (h.group_size, h.key_axis, h.value_axis, h.layout, h.batch) == (64, -1, -1, "token", 1)
    assert h.seq_len == 67 and not h.streamed and not h.raw
    assert h.payload_length == h.expected_payload() == 2 * h.layer_nbytes()
    # build_header accepts numpy-style ints.
    import numpy as np

    assert build_header(dtype=torch.float16, bits=np.int64(4), layers=np.int32(2), heads=2,
                        head_dim=64, quant_tokens=64, residual_tokens=3) == h
    with pytest.raises(ValueError, match="positive"):
        Limits(max_layers=0)


def test_pack_rejects_invalid_header():
    h = base_header()
    with pytest.raises(KVMessageError, match="payload_length"):
        KVHeader(**{**{f: getattr(h, f) for f in h.__slots__}, "payload_length": 5}).pack()


def test_layer_views_checks_and_alignment(gen):
    h = base_header()
    n = h.layer_nbytes()
    with pytest.raises(ValueError, match=f"{n} bytes"):
        layer_views(h, torch.zeros(n + 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f"{n} bytes"):
        layer_views(h, torch.zeros(2, n // 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        layer_views(h, torch.zeros(n // 2, dtype=torch.float16))
    with pytest.raises(TypeError, match="Tensor"):
        layer_views(h, bytes(n))
    # Sections with odd byte counts (2-bit codes of head_dim 4, 3 tokens): the parts after them
    # are unaligned for float16 and come back as copies, still bit-exact.
    odd = build_header(dtype=torch.float16, bits=2, group_size=4, layers=3, heads=1,
                       head_dim=4, quant_tokens=3, residual_tokens=1)
    layers = [random_parts(odd, gen) for _ in range(odd.layers)]
    assert_layers_equal(decode_message(encode_message(odd, layers))[1], layers)


def test_encode_message_checks_layers(gen):
    h = base_header()
    layers = [random_parts(h, gen) for _ in range(h.layers)]
    with pytest.raises(ValueError, match="2 dicts"):
        encode_message(h, layers[:1])
    missing = [dict(layers[0]), layers[1]]
    del missing[0]["key_min"]
    with pytest.raises(ValueError, match="exactly"):
        encode_message(h, missing)
    wrong = [{**layers[0], "key_scale": layers[0]["key_scale"].float()}, layers[1]]
    with pytest.raises(ValueError, match="key_scale"):
        encode_message(h, wrong)
    with pytest.raises(ValueError, match="STREAMED"):
        encode_message(build_header(dtype=torch.float16, bits=16, layers=1, heads=1,
                                    head_dim=4, residual_tokens=1, streamed=True), [{}])
    # Non-contiguous inputs are fine: they are serialized in C order.
    t = {k: (v.transpose(0, 1).contiguous().transpose(0, 1)) for k, v in layers[0].items()}
    assert encode_message(h, [t, layers[1]]) == encode_message(h, layers)


# --------------------------------------------------------------------------- fuzzing

_U8, _I8, _U16, _U32, _U64 = (0, 255), (-128, 127), (0, 2**16 - 1), (0, 2**32 - 1), (0, 2**64 - 1)
FIELD_RANGES = {  # wire range of every field but magic and header_crc
    "wire_version": _U16, "header_size": _U16,
    **dict.fromkeys(("format_version", "dtype", "bits", "layout", "flags", "sink_tokens"), _U8),
    "key_axis": _I8, "value_axis": _I8,
    **dict.fromkeys(("group_size", "layers", "batch", "heads", "head_dim", "quant_tokens",
                     "residual_tokens", "seq_len", "payload_crc"), _U32),
    "request_id": _U64, "payload_length": _U64,
}
# Values near the rules' edges, mixed with the full ranges.
EDGES = (0, 1, 2, 3, 4, 8, 16, 32, 64, 255, 2**16, 2**24, 2**34, 2**60, 2**32 - 1, -1, -2)


def field_values(name: str) -> st.SearchStrategy[int]:
    lo, hi = FIELD_RANGES[name]
    return st.one_of(st.integers(lo, hi), st.sampled_from([v for v in EDGES if lo <= v <= hi]))


SMALL = Limits(max_payload_bytes=1 << 16, max_layers=4, max_batch=4, max_heads=4,
               max_head_dim=256, max_tokens=1024)
VALID = [base_header(), raw_header(),
         build_header(dtype=torch.float32, bits=8, layers=1, heads=1, head_dim=8, group_size=8,
                      quant_tokens=8, streamed=True)]
def check_decode(data: bytes, limits: Limits) -> None:
    tracemalloc.start()
    try:
        try:
            h = decode_header(data, limits=limits)
        except KVMessageError:
            h = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    if h is not None:
        h.validate(limits)
        assert h.payload_length <= limits.max_payload_bytes
        assert h.payload_length == h.expected_payload()
        assert h.pack() == bytes(data[:HEADER.size])


LIMITS = st.sampled_from([DEFAULT_LIMITS, SMALL, WIRE_LIMITS])
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=3 * HEADER.size), limits=LIMITS)
def test_fuzz_arbitrary_bytes(data, limits):
    check_decode(data, limits)


@FUZZ
@given(body=st.binary(min_size=HEADER.size - 12, max_size=HEADER.size - 12), limits=LIMITS)
def test_fuzz_random_body_with_valid_crc(body, limits):
    """Past magic, version, header size and CRC: random field bytes hit the later rules."""
    head = MAGIC + struct.pack("<HH", 1, HEADER.size) + body
    check_decode(head + struct.pack("<I", crc32c(head)), limits)


@FUZZ
@given(base=st.sampled_from(VALID), limits=LIMITS, data=st.data())
def test_fuzz_mutated_valid_headers(base, limits, data):
    fields = unpack(base.pack())
    names = data.draw(st.lists(st.sampled_from(sorted(FIELD_RANGES)), min_size=1, max_size=4,
                               unique=True))
    for name in names:
        fields[name] = data.draw(field_values(name), label=name)
    check_decode(repack(fields) + b"\0" * data.draw(st.integers(0, 8)), limits)


def test_an_empty_message_is_valid():
    """Zero tokens: a zero-byte payload (the protocol still runs; nothing is allocated)."""
    header = build_header(dtype=torch.float16, bits=4, layers=3, heads=2, head_dim=64)
    assert header.payload_length == 0 and header.seq_len == 0 and header.parts() == []
    assert decode_header(header.pack()) == header
