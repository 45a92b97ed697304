"""export_kv / import_kv: round trip, and every malformed message rejected before allocation."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from conftest import prompt, teacher_forced

from thunderkv.hf import KVMessageError, ThunderKVCache, export_kv, import_kv, read_header
from thunderkv.hf.wire import HEADER


@pytest.fixture(scope="module")
def filled(tiny):
    config, model = tiny
    cache = ThunderKVCache(config, bits=4, group_size=32, residual_length=16)
    teacher_forced(model, prompt(2, 77), cache, 40)
    return config, model, cache


def reheader(msg: bytes, **changes) -> bytes:
    """Rewrite header fields (by index) and fix the header CRC, so only the field is wrong."""
    fields = list(HEADER.unpack_from(msg))
    for index, value in changes.items():
        fields[int(index[1:])] = value
    head = HEADER.pack(*fields)[:-4]
    return head + struct.pack("<I", zlib.crc32(head)) + msg[HEADER.size:]


def test_round_trip_is_bit_exact_and_decodes_identically(filled):
    config, model, cache = filled
    msg = export_kv(cache, request_id=42)
    h = read_header(msg)
    assert (h.layers, h.batch, h.heads, h.head_dim, h.bits, h.group_size) == (2, 2, 2, 32, 4, 32)
    assert (h.key_axis, h.value_axis, h.request_id, h.dtype) == (-2, -1, 42, torch.float32)
    assert h.quant_tokens + h.residual_tokens == 76 and h.quant_tokens % 32 == 0
    assert len(msg) == HEADER.size + cache.nbytes
    for cfg in (config, None):
        got = import_kv(msg, cfg)
        assert all(torch.equal(a, b) for a, b in zip(cache.tensors(), got.tensors()))
        assert got.get_seq_length() == cache.get_seq_length() == 76
    got = import_kv(bytearray(msg), config)
    cache = import_kv(msg, config)  # a copy, so the module fixture stays as it was
    nxt = prompt(2, 1, seed=9)
    with torch.no_grad():
        ref = model(nxt, cache=cache, use_cache=True).logits
        out = model(nxt, cache=got, use_cache=True).logits
    assert torch.equal(ref, out)


def test_round_trip_without_quantized_history(tiny):
    config, model = tiny
    cache = ThunderKVCache(config, bits=2, group_size=32, residual_length=64)
    teacher_forced(model, prompt(1, 20), cache, 10)
    msg = export_kv(cache)
    assert read_header(msg).quant_tokens == 0
    got = import_kv(msg, config)
    assert all(torch.equal(a, b) for a, b in zip(cache.tensors(), got.tensors()))


@pytest.mark.parametrize("cut", [0, 10, HEADER.size - 1, HEADER.size, HEADER.size + 5, -1])
def test_truncated_messages_raise(filled, cut):
    msg = export_kv(filled[2])
    with pytest.raises(KVMessageError, match="truncated|bytes"):
        import_kv(msg[:cut])


def test_every_corrupted_header_byte_is_caught(filled):
    msg = bytearray(export_kv(filled[2]))
    for i in range(HEADER.size):
        bad = bytearray(msg)
        bad[i] ^= 0x40
        with pytest.raises(KVMessageError):
            import_kv(bytes(bad))


def test_corrupted_payload_is_caught(filled):
    msg = bytearray(export_kv(filled[2]))
    msg[HEADER.size + 1000] ^= 1
    with pytest.raises(KVMessageError, match="payload checksum"):
        import_kv(bytes(msg))


@pytest.mark.parametrize("changes, why", [
    ({"f0": b"NOPE"}, "magic"),
    ({"f1": 2}, "wire version"),
    ({"f2": 9}, "format version"),
    ({"f3": 7}, "dtype"),
    ({"f4": 3}, "bits"),
    ({"f5": 0}, "axis"),
    ({"f7": 1}, "flags"),
    ({"f8": 24}, "group_size|divisible|multiple"),
    ({"f10": 0}, "layers"),
    ({"f10": 10**6}, "layers"),
    ({"f11": 0}, "batch"),
    ({"f12": 10**5}, "heads"),
    ({"f13": 10**5}, "head_dim"),
    ({"f14": 2**31}, "tokens"),
    ({"f15": 1}, "payload length"),
    ({"f17": 2**62}, "limit"),
    ({"f17": 8}, "payload length"),
])
def test_each_invalid_field_is_rejected(filled, changes, why):
    msg = reheader(export_kv(filled[2]), **changes)
    with pytest.raises(KVMessageError, match=why):
        import_kv(msg)


def test_size_cap_and_model_mismatch(filled, tiny):
    config, _, cache = filled
    msg = export_kv(cache)
    with pytest.raises(KVMessageError, match="limit"):
        import_kv(msg, max_bytes=1000)
    other = type(config)(**{**config.to_dict(), "num_key_value_heads": 4})
    with pytest.raises(KVMessageError, match="heads"):
        import_kv(msg, other)
    with pytest.raises(ValueError, match="forward pass"):
        export_kv(ThunderKVCache(config))
    with pytest.raises(TypeError):
        export_kv(object())
