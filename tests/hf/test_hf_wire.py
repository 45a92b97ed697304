"""export_kv / import_kv: transfer wire format v1 messages, round trips, and every malformed
message rejected before allocation."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
import torch
from conftest import prompt, teacher_forced
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thunderkv.transfer.wire as tw
from thunderkv.api import QuantizedTensor
from thunderkv.hf import KVMessageError, ThunderKVCache, export_kv, import_kv, read_header
from thunderkv.hf.wire import (
    DEFAULT_RESIDUAL_LENGTH,
    HEADER,
    export_kv_into,
    import_kv_parts,
    kv_header,
)
from thunderkv.transfer.checksum import crc32c

# Field names of tw.HEADER, in struct order (docs/transfer.md "Header").
FIELDS = ("magic", "wire_version", "header_size", "format_version", "dtype", "bits", "layout",
          "flags", "key_axis", "value_axis", "sink_tokens", "group_size", "layers", "batch",
          "heads", "head_dim", "quant_tokens", "residual_tokens", "seq_len", "request_id",
          "payload_length", "payload_crc", "header_crc")


@pytest.fixture(scope="module")
def filled(tiny):
    config, model = tiny
    cache = ThunderKVCache(config, bits=4, group_size=32, residual_length=16)
    teacher_forced(model, prompt(2, 77), cache, 40)
    return config, model, cache


def fields(msg: bytes) -> dict:
    return dict(zip(FIELDS, HEADER.unpack_from(msg)))


def reheader(msg: bytes, **changes) -> bytes:
    """Rewrite header fields (by name) and fix the header CRC, so only the field is wrong."""
    values = {**fields(msg), **changes}
    head = HEADER.pack(*(values[name] for name in FIELDS))[:-4]
    return head + struct.pack("<I", crc32c(head)) + msg[HEADER.size:]


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    """A layer's tensors under the wire's part names."""
    out = {}
    if layer.sink_tokens:
        out.update(key_sink=layer.sink_keys, value_sink=layer.sink_values)
    for prefix, q in (("key", layer.qkeys), ("value", layer.qvalues)):
        if q is not None:
            out.update({f"{prefix}_packed": q.packed, f"{prefix}_scale": q.scale,
                        f"{prefix}_min": q.minimum})
    if layer.keys.shape[-2]:
        out.update(key_residual=layer.keys, value_residual=layer.values)
    return out


def assert_same_cache(a: ThunderKVCache, b: ThunderKVCache) -> None:
    assert (a.bits, a.group_size, a.key_axis, a.value_axis) == (
        b.bits, b.group_size, b.key_axis, b.value_axis)
    assert len(a.layers) == len(b.layers) and a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.layers, b.layers):
        assert la.quantized_length == lb.quantized_length and la.dtype == lb.dtype
        assert la.sink_tokens == lb.sink_tokens
        assert la.sink_keys.shape == lb.sink_keys.shape
        ta, tb = layer_tensors(la), layer_tensors(lb)
        assert ta.keys() == tb.keys()
        for name in ta:
            assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
        assert la.keys.shape == lb.keys.shape and la.values.shape == lb.values.shape


def test_message_is_transfer_wire_format_v1(filled):
    _, _, cache = filled
    msg = export_kv(cache, request_id=42)
    assert msg[:4] == b"TKVX" == tw.MAGIC and HEADER is tw.HEADER and HEADER.size == 72
    f = fields(msg)
    assert (f["wire_version"], f["header_size"], f["flags"], f["sink_tokens"]) == (1, 72, 0, 1)
    h = tw.decode_header(msg[:HEADER.size])  # header alone, as a receiver gets it first
    assert (h.layout, h.key_axis, h.value_axis, h.streamed) == ("head", -2, -1, False)
    assert (h.layers, h.batch, h.heads, h.head_dim, h.bits, h.group_size) == (2, 2, 2, 32, 4, 32)
    assert (h.request_id, h.dtype, h.raw) == (42, torch.float32, False)
    Tq, Tr = cache.layers[0].quantized_length, cache.layers[0].keys.shape[-2]
    assert (h.sink_tokens, h.quant_tokens, h.residual_tokens, h.seq_len) == (1, Tq, Tr, 76)
    assert Tq == 64 and Tr == 11  # every kind of part present
    assert h.payload_length == cache.nbytes and len(msg) == HEADER.size + cache.nbytes
    assert h.payload_crc == crc32c(msg[HEADER.size:])
    assert read_header(msg) == h
    # kv_header: the same header before any payload exists, CRC left to the transfer layer
    assert kv_header(cache, request_id=42) == replace(h, payload_crc=0)


def test_decode_message_parts_are_the_cache_tensors(filled):
    _, _, cache = filled
    h, layers = tw.decode_message(export_kv(cache))
    assert [name for name, _, _ in h.parts()] == [
        "key_sink", "value_sink", "key_packed", "key_scale", "key_min", "value_packed",
        "value_scale", "value_min",
        "key_residual", "value_residual"]
    for layer, parts in zip(cache.layers, layers, strict=True):
        held = layer_tensors(layer)
        assert list(parts) == list(held)
        for name, t in parts.items():
            assert t.dtype == held[name].dtype and torch.equal(t, held[name]), name
        # axis -2 keys are stored transposed: [B, H, D, Tq*bits/8], [B, H, D, Tq/G]
        assert tuple(parts["key_packed"].shape) == (2, 2, 32, 64 * 4 // 8)
        assert tuple(parts["key_scale"].shape) == (2, 2, 32, 64 // 32)
        assert tuple(parts["value_packed"].shape) == (2, 2, 64, 32 * 4 // 8)
        # and dequantize to what the layer's own history dequantizes to
        q = layer.qkeys
        rebuilt = QuantizedTensor(parts["key_packed"], parts["key_scale"], parts["key_min"],
                                  q.spec, q.shape, q.dtype)
        assert torch.equal(rebuilt.dequantize(), q.dequantize())


def test_round_trip_is_bit_exact_and_decodes_identically(filled):
    config, model, cache = filled
    msg = export_kv(cache, request_id=42)
    for cfg in (config, None):
        got = import_kv(msg, cfg, residual_length=16)
        assert_same_cache(cache, got)
        assert got.get_seq_length() == cache.get_seq_length() == 76
    got = import_kv(bytearray(msg), config, residual_length=16)
    assert_same_cache(cache, got)
    assert_same_cache(cache, import_kv(torch.frombuffer(bytearray(msg), dtype=torch.uint8)))
    cache = import_kv(msg, config, residual_length=16)  # a copy: the fixture stays as it was
    nxt = prompt(2, 1, seed=9)
    with torch.no_grad():
        ref = model(nxt, cache=cache, use_cache=True).logits
        out = model(nxt, cache=got, use_cache=True).logits
    assert torch.equal(ref, out)


@torch.no_grad()
def greedy(model, cache, last: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, logits = [], []
    for _ in range(steps):
        step = model(last, cache=cache, use_cache=True).logits[:, -1]
        last = step.argmax(-1, keepdim=True)
        tokens.append(last)
        logits.append(step)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def test_generation_continues_identically_after_import(tiny):
    """The receiver, given the sender's residual_length, decodes exactly as the sender would:
    40 greedy steps cross several quantization points of the residual."""
    config, model = tiny
    ids = prompt(2, 45)
    sender = ThunderKVCache(config, bits=4, group_size=32, residual_length=16)
    with torch.no_grad():
        model(ids[:, :-1], cache=sender, use_cache=True)
    receiver = import_kv(export_kv(sender), config, residual_length=16)
    assert receiver.residual_length == 16
    ref_tokens, ref_logits = greedy(model, sender, ids[:, -1:], 40)
    tokens, logits = greedy(model, receiver, ids[:, -1:], 40)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    assert_same_cache(sender, receiver)


def test_residual_length_is_the_receivers_choice(filled):
    config, model, cache = filled
    msg = export_kv(cache)
    got = import_kv(msg, config)  # not in the message: ThunderKVCache's default
    assert got.residual_length == DEFAULT_RESIDUAL_LENGTH == \
        ThunderKVCache(config, group_size=got.group_size).residual_length
    assert all(layer.residual_length == DEFAULT_RESIDUAL_LENGTH for layer in got.layers)
    assert_same_cache(cache, got)
    tight = import_kv(msg, config, residual_length=0)  # residual over capacity: quantized next
    with torch.no_grad():
        model(prompt(2, 1, seed=3), cache=tight, use_cache=True)
    assert tight.layers[0].quantized_length == 64 + 0 and tight.layers[0].keys.shape[-2] == 12
    with torch.no_grad():
        model(prompt(2, 20, seed=3), cache=tight, use_cache=True)
    assert tight.layers[0].quantized_length == 96 and tight.layers[0].keys.shape[-2] == 0
    assert tight.layers[0].sink_tokens == 1
    with pytest.raises(ValueError, match="residual_length"):
        import_kv(msg, config, residual_length=-1)


def test_round_trip_without_quantized_history(tiny):
    config, model = tiny
    cache = ThunderKVCache(config, bits=2, group_size=32, residual_length=64)
    teacher_forced(model, prompt(1, 20), cache, 10)
    msg = export_kv(cache)
    h, layers = tw.decode_message(msg)
    assert (h.sink_tokens, h.quant_tokens, h.residual_tokens) == (1, 0, 18)
    assert list(layers[0]) == ["key_sink", "value_sink", "key_residual", "value_residual"]
    got = import_kv(msg, config, residual_length=64)
    assert_same_cache(cache, got)
    assert got.layers[0].qkeys is None


def test_round_trip_without_residual(tiny):
    config, model = tiny
    cache = ThunderKVCache(config, bits=4, group_size=32, residual_length=0)
    with torch.no_grad():
        model(prompt(1, 65), cache=cache, use_cache=True)
    msg = export_kv(cache)
    h, layers = tw.decode_message(msg)
    assert (h.sink_tokens, h.quant_tokens, h.residual_tokens) == (1, 64, 0)
    assert "key_residual" not in layers[0]
    got = import_kv(msg, config, residual_length=0)
    assert_same_cache(cache, got)
    assert got.layers[0].keys.shape == (1, 2, 0, 32) and got.layers[0].keys.dtype == torch.float32
    nxt = prompt(1, 1, seed=5)
    with torch.no_grad():
        assert torch.equal(model(nxt, cache=cache, use_cache=True).logits,
                           model(nxt, cache=got, use_cache=True).logits)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([2, 4, 8]), group_size=st.sampled_from([4, 8, 16]),
       key_axis=st.sampled_from([-2, -1]), value_axis=st.sampled_from([-2, -1]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       layers=st.integers(1, 2), batch=st.integers(1, 2), heads=st.integers(1, 3),
       chunks=st.lists(st.integers(1, 23), min_size=1, max_size=4),
       residual_length=st.integers(0, 20), sink_length=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_round_trip_property(bits, group_size, key_axis, value_axis, dtype, layers, batch,
                             heads, chunks, residual_length, sink_length, seed):
    """Any cache state: the message decodes into the cache's tensors, imports bit-exactly and
    the imported cache evolves exactly like the original."""
    g = torch.Generator().manual_seed(seed)
    D = 16

    def kv(n):
        return [torch.randn(batch, heads, n, D, generator=g).to(dtype) for _ in range(2)]

    cache = ThunderKVCache(None, bits, group_size, residual_length, key_axis=key_axis,
                           value_axis=value_axis, sink_length=sink_length, num_layers=layers)
    for n in chunks:
        for i in range(layers):
            cache.update(*kv(n), i)
    msg = export_kv(cache, request_id=seed)
    h, parts = tw.decode_message(msg)
    assert (h.layout, h.key_axis, h.value_axis, h.dtype) == ("head", key_axis, value_axis, dtype)
    assert h.seq_len == sum(chunks) and h.payload_length == cache.nbytes
    for layer, p in zip(cache.layers, parts, strict=True):
        held = layer_tensors(layer)
        assert list(p) == list(held)
        assert all(torch.equal(p[name], held[name]) for name in p)
    assert h.sink_tokens == min(sink_length, sum(chunks))
    got = import_kv(msg, residual_length=residual_length, sink_length=sink_length)
    assert_same_cache(cache, got)
    out = torch.empty(h.payload_length + 1, dtype=torch.uint8)[1:]  # unaligned: still exact
    assert export_kv_into(cache, out, request_id=seed) == replace(h, payload_crc=0)
    assert out.numpy().tobytes() == msg[HEADER.size:]
    new = kv(group_size + 1)
    for i in range(layers):
        a, b = cache.update(*new, i), got.update(*new, i)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert_same_cache(cache, got)


def test_export_kv_into_checks_the_buffer(filled):
    cache = filled[2]
    h = kv_header(cache, streamed=True)
    assert h.streamed and h.payload_crc == 0
    with pytest.raises(ValueError, match="payload_length"):
        export_kv_into(cache, torch.empty(h.payload_length - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        export_kv_into(cache, torch.empty(h.payload_length, 2, dtype=torch.uint8)[:, 0])


def test_import_kv_parts_from_a_receive_buffer(filled):
    """The receive side: header + layer views of a (pool) buffer; the cache owns copies."""
    config, _, cache = filled
    h = kv_header(cache, request_id=3)
    pool = torch.zeros(h.payload_length + 8, dtype=torch.uint8)
    buf = pool[8:]
    export_kv_into(cache, buf, request_id=3)
    n = h.layer_nbytes()
    layers = [tw.layer_views(h, buf[i * n:(i + 1) * n]) for i in range(h.layers)]
    got = import_kv_parts(h, layers, config, residual_length=16)
    pool.fill_(0xFF)  # "release" the pool slice: the cache is unaffected
    assert_same_cache(cache, got)
    with pytest.raises(ValueError, match="exactly the parts"):
        import_kv_parts(h, [dict(list(p.items())[:-1]) for p in layers])
    with pytest.raises(ValueError, match="shape"):
        import_kv_parts(h, [{k: v[:1] for k, v in p.items()} for p in layers])
    with pytest.raises(ValueError, match="2 dicts"):
        import_kv_parts(h, layers[:1])
    with pytest.raises(KVMessageError, match="seq_len"):
        import_kv_parts(replace(h, seq_len=h.seq_len - 1), layers)


def test_one_exception_class():
    from thunderkv.hf import wire

    assert KVMessageError is wire.KVMessageError is tw.KVMessageError
    assert issubclass(KVMessageError, ValueError)


@pytest.mark.parametrize("cut", [0, 10, HEADER.size - 1, HEADER.size, HEADER.size + 5, -1])
def test_truncated_messages_raise(filled, cut):
    msg = export_kv(filled[2])
    with pytest.raises(KVMessageError, match="truncated"):
        import_kv(msg[:cut])
    with pytest.raises(KVMessageError, match="truncated"):
        read_header(msg[:cut])


def test_trailing_bytes_raise(filled):
    msg = export_kv(filled[2]) + b"\0"
    with pytest.raises(KVMessageError, match="trailing"):
        import_kv(msg)
    with pytest.raises(KVMessageError, match="trailing"):
        read_header(msg)


def test_every_corrupted_header_byte_is_caught(filled):
    msg = bytearray(export_kv(filled[2]))
    for i in range(HEADER.size):
        bad = bytearray(msg)
        bad[i] ^= 0x40
        with pytest.raises(KVMessageError):
            import_kv(bytes(bad))


def test_corrupted_payload_is_caught(filled):
    msg = bytearray(export_kv(filled[2]))
    for i in (HEADER.size, HEADER.size + 1000, len(msg) - 1):
        bad = bytearray(msg)
        bad[i] ^= 1
        with pytest.raises(KVMessageError, match="payload_crc mismatch"):
            import_kv(bytes(bad))


@pytest.mark.parametrize("changes, why", [
    ({"magic": b"TKVC"}, "magic"),  # the old private HF message is not accepted
    ({"wire_version": 2}, "wire_version"),
    ({"header_size": 68}, "header_size"),
    ({"format_version": 9}, "format_version"),
    ({"dtype": 7}, "dtype"),
    ({"bits": 3}, "bits"),
    ({"layout": 0}, "key_axis.*layout"),
    ({"layout": 5}, "layout"),
    ({"flags": 2}, "flags"),
    ({"flags": 1}, "payload_crc"),  # STREAMED with a CRC in the header
    ({"key_axis": 0}, "key_axis"),
    ({"value_axis": 1}, "value_axis"),
    ({"sink_tokens": 200}, "payload_length"),
    ({"group_size": 24}, "head_dim.*group_size"),
    ({"group_size": 0}, "group_size"),
    ({"layers": 0}, "layers"),
    ({"layers": 10**6}, "layers"),
    ({"batch": 0}, "batch"),
    ({"heads": 10**5}, "heads"),
    ({"head_dim": 10**5}, "head_dim"),
    ({"quant_tokens": 2**31}, "quant_tokens"),
    ({"quant_tokens": 65}, "quant_tokens"),
    ({"residual_tokens": 13}, "payload_length"),
    ({"seq_len": 77}, "seq_len"),
    ({"seq_len": 75}, "seq_len.*padding"),  # valid on the wire, not for a ThunderKVCache
    ({"payload_length": 2**62}, "payload_length.*limit"),
    ({"payload_length": 8}, "payload_length"),
])
def test_each_invalid_field_is_rejected(filled, changes, why):
    msg = reheader(export_kv(filled[2]), **changes)
    with pytest.raises(KVMessageError, match=why):
        import_kv(msg)


def test_valid_messages_a_thunderkv_cache_cannot_hold(filled):
    config = filled[0]
    raw = tw.build_header(dtype=torch.float32, bits=32, layers=2, heads=2, head_dim=32,
                          residual_tokens=5, layout="head")
    token = tw.build_header(dtype=torch.float32, bits=4, group_size=32, layers=2, heads=2,
                            head_dim=32, quant_tokens=4, layout="token")
    for header, why in ((raw, "raw"), (token, "layout")):
        layers = [{name: torch.zeros(shape, dtype=dtype) for name, shape, dtype in
                   header.parts()} for _ in range(header.layers)]
        msg = tw.encode_message(header, layers)
        tw.decode_message(msg)  # a valid transfer message
        with pytest.raises(KVMessageError, match=why):
            import_kv(msg, config)


def test_size_cap_and_model_mismatch(filled):
    config, _, cache = filled
    msg = export_kv(cache)
    for kwargs in ({"max_bytes": 1000}, {"limits": tw.Limits(max_payload_bytes=1000)}):
        with pytest.raises(KVMessageError, match="over the limit"):
            import_kv(msg, **kwargs)
    with pytest.raises(KVMessageError, match="max_layers"):
        import_kv(msg, limits=tw.Limits(max_layers=1))
    assert_same_cache(cache, import_kv(msg, max_bytes=cache.nbytes))
    other = type(config)(**{**config.to_dict(), "num_key_value_heads": 4})
    with pytest.raises(KVMessageError, match="heads"):
        import_kv(msg, other)
    with pytest.raises(ValueError, match="forward pass"):
        export_kv(ThunderKVCache(config, group_size=32))
    with pytest.raises(TypeError, match="expected a ThunderKVCache, got object"):
        export_kv(object())
    with pytest.raises(TypeError, match="expected a ThunderKVCache, got object"):
        kv_header(object())


def test_keys_and_values_of_different_head_dims_are_named(gen):
    """MLA / latent-KV models cache a latent and a rotary key of different widths; the
    message used to blame 'layer 0 differs in shape or dtype from layer 0'."""
    cache = ThunderKVCache(None, bits=4, group_size=16, residual_length=8, num_layers=1)
    cache.update(torch.randn(1, 1, 40, 32, generator=gen), torch.randn(1, 1, 40, 16, generator=gen),
                 0)
    with pytest.raises(ValueError, match=r"head dims 32 vs 16.*one heads x head_dim"):
        kv_header(cache)
    with pytest.raises(ValueError, match="head dims 32 vs 16"):
        export_kv(cache)
