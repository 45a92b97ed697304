"""Paged compressed KV cache: slot writes, batch gathers, transfer pack/unpack, bad input."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers import bits_equal, random_kv, same_values

import thunderkv as tk
from thunderkv.paged import (
    PagedKVCache,
    cache_from_parts,
    gather_dequantize,
    pack_for_transfer,
    quantize_to_paged,
    transfer_nbytes,
    unpack_from_transfer,
)

# These tests use CPU caches: Triton joins only where it runs on CPU tensors (the interpreter,
# which conftest picks when there is no GPU). On a GPU machine it refuses CPU tensors, and
# the compiled kernels are covered by test_paged_ops_on_gpu_match_the_cpu_cache below.
BACKENDS = ["reference", "cpu"] + (
    ["triton"] if importlib.util.find_spec("triton")
    and tk.backends.unavailable_reason("triton", torch.device("cpu")) is None else [])
H, D, BS = 3, 64, 16


def _cache(num_blocks=12, dtype=torch.float16, bits=4, group_size=32) -> PagedKVCache:
    return PagedKVCache.allocate(num_blocks, BS, H, D, dtype=dtype, bits=bits,
                                 group_size=group_size)


def _snapshot(cache: PagedKVCache) -> list[torch.Tensor]:
    return [t.clone() for t in cache.parts()]


def _unchanged(cache: PagedKVCache, snap) -> bool:
    return all(bits_equal(a, b) for a, b in zip(cache.parts(), snap))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_slots_hold_exactly_the_quantized_tokens(backend, dtype, gen):
    cache = _cache(dtype=dtype)
    n = 40
    key, value = random_kv((n, H, D), dtype, gen), random_kv((n, H, D), dtype, gen)
    slots = torch.randperm(cache.num_blocks * BS, generator=gen)[:n]
    slots[5] = -1  # padding token: skipped
    quantize_to_paged(key, value, cache, slots, backend=backend)
    for x, prefix in ((key, "key"), (value, "value")):
        q = tk.quantize(x, bits=4, group_size=32, backend="reference")
        flat = {p: getattr(cache, f"{prefix}_{p}").view(-1, H, getattr(cache, f"{prefix}_{p}").shape[-1])
                for p in ("packed", "scale", "min")}
        keep = slots >= 0
        assert torch.equal(flat["packed"][slots[keep]], q.packed[keep])
        assert bits_equal(flat["scale"][slots[keep]], q.scale[keep])
        assert bits_equal(flat["min"][slots[keep]], q.minimum[keep])
        written = torch.zeros(cache.num_blocks * BS, dtype=torch.bool)
        written[slots[keep]] = True
        assert (flat["packed"][~written] == 0).all(), "a slot that was not targeted was written"


def _fill_sequences(cache, lens, gen, dtype=torch.float16):
    """Write sequences of the given lengths into shuffled blocks; return (table, dense K, V)."""
    max_blocks = max(-(-n // BS) for n in lens)
    order = torch.randperm(cache.num_blocks, generator=gen)
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    ks, vs, used = [], [], 0
    for b, n in enumerate(lens):
        nb = -(-n // BS)
        table[b, :nb] = order[used:used + nb].int()
        used += nb
        k, v = random_kv((n, H, D), dtype, gen), random_kv((n, H, D), dtype, gen)
        pos = torch.arange(n)
        slots = table[b].long()[pos // BS] * BS + pos % BS
        quantize_to_paged(k, v, cache, slots)
        ks.append(k)
        vs.append(v)
    return table, ks, vs


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_dequantize_matches_dense_round_trip(backend, gen):
    cache = _cache()
    lens = [37, 16, 5]
    table, ks, vs = _fill_sequences(cache, lens, gen)
    k_out, v_out = gather_dequantize(cache, table, torch.tensor(lens), backend=backend)
    assert k_out.shape == (3, 37, H, D) and v_out.dtype == torch.float16
    for b, n in enumerate(lens):
        for dense, out in ((ks[b], k_out), (vs[b], v_out)):
            want = tk.quantize(dense, bits=4, group_size=32, backend="reference").dequantize(
                backend="reference")
            assert same_values(out[b, :n], want)
            assert (out[b, n:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_of_empty_sequences_or_batch_is_empty(backend):
    cache = _cache()
    k, v = gather_dequantize(cache, torch.zeros(2, 3, dtype=torch.int32), torch.tensor([0, 0]),
                             backend=backend)
    assert k.shape == v.shape == (2, 0, H, D)
    k, v = gather_dequantize(cache, torch.zeros(0, 3, dtype=torch.int32),
                             torch.zeros(0, dtype=torch.int64), backend=backend)
    assert k.shape == (0, 0, H, D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_into_reused_workspaces_matches_fresh_outputs(backend, gen):
    cache = _cache()
    lens = [37, 16, 5]
    table, _, _ = _fill_sequences(cache, lens, gen)
    want = gather_dequantize(cache, table, torch.tensor(lens), backend=backend)
    shape = (3, table.shape[1] * BS, H, D)
    out = (torch.full(shape, 9.0, dtype=torch.float16), torch.full(shape, 9.0, dtype=torch.float16))
    for _ in range(2):  # reused: stale contents must not leak into the result
        got = gather_dequantize(cache, table, torch.tensor(lens), backend=backend, out=out)
        assert got[0].data_ptr() == out[0].data_ptr()
        for g, w in zip(got, want):
            assert bits_equal(g, w)
    with pytest.raises(ValueError, match="out key must be"):
        gather_dequantize(cache, table, torch.tensor(lens), out=(out[0][:, :-1], out[1]))
    with pytest.raises(ValueError, match="out value must be"):
        gather_dequantize(cache, table, torch.tensor(lens), out=(out[0], out[1].float()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_with_max_len_pads_or_cuts_like_the_default(backend, gen):
    """max_len (what keeps the gather free of host syncs) sets the output length: shorter cuts
    every sequence there, longer pads with zeros; workspace positions past it are left alone."""
    cache = _cache()
    lens = [37, 16, 5]
    table, _, _ = _fill_sequences(cache, lens, gen)
    want = gather_dequantize(cache, table, torch.tensor(lens), backend="reference")
    width = table.shape[1] * BS  # 48
    for max_len in (37, 20, 5, 0, 44, width, np.int64(30)):
        shape = (3, width, H, D)
        out = tuple(torch.full(shape, 9.0, dtype=torch.float16) for _ in range(2))
        for got in (gather_dequantize(cache, table, torch.tensor(lens), max_len=max_len,
                                      backend=backend),
                    gather_dequantize(cache, table, torch.tensor(lens), max_len=max_len,
                                      backend=backend, out=out)):
            for g, w in zip(got, want):
                assert g.shape == (3, max_len, H, D)
                n = min(max_len, 37)
                assert bits_equal(g[:, :n], w[:, :n])
                assert bits_equal(g[:, n:], torch.zeros_like(g[:, n:]))  # +0.0 past the ends
        for o in out:
            assert (o[:, max_len:] == 9.0).all(), "a position past max_len was written"


def test_token_rows_index_each_output_position():
    """The gather's per-token index: slot, ZERO_ROW past the sequence, -1 from max_len on; and
    unchecked (under capture) a block id outside the cache gives -1, never a slot."""
    from thunderkv.backends import ZERO_ROW
    from thunderkv.paged import _token_rows

    cache = PagedKVCache.allocate(4, 2, 1, 32, bits=4, group_size=32)  # block_size 2
    table = torch.tensor([[3, 1, 0], [2, 9, -5]])
    lens = torch.tensor([5, 4])
    z, s = ZERO_ROW, -1
    got = _token_rows(cache, table, lens, width=3, max_len=5, checked=False).view(2, 6)
    assert got.tolist() == [[6, 7, 2, 3, 0, s], [4, 5, s, s, z, s]]
    got = _token_rows(cache, table[:1], lens[:1] - 2, width=2, max_len=4).view(1, 4)
    assert got.tolist() == [[6, 7, 2, z]]


def test_gather_rejects_a_bad_max_len(gen):
    cache = _cache()
    table, _, _ = _fill_sequences(cache, [20], gen)
    out = tuple(torch.full((1, table.shape[1] * BS, H, D), 9.0, dtype=torch.float16)
                for _ in range(2))
    for bad in (-1, table.shape[1] * BS + 1, 3.0, True, "8", torch.tensor(20)):
        with pytest.raises(ValueError, match="max_len must be an int in"):
            gather_dequantize(cache, table, torch.tensor([20]), max_len=bad, out=out)
    with pytest.raises(TypeError, match="seq_lens must be an int32/int64"):
        gather_dequantize(cache, table, torch.tensor([20.0]), out=out)
    assert all((o == 9.0).all() for o in out)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_row_kernels_zero_a_zero_row_and_leave_a_skipped_one(backend, gen):
    """dequantize_rows: ZERO_ROW writes +0.0 into its output row (the gather past a sequence's
    end, with no host loop), -1 leaves the row as it was."""
    from thunderkv import backends

    rows_impl = backends.resolve(backend, torch.device("cpu"))
    cache = _cache()
    capacity = cache.num_blocks * BS
    x = random_kv((3, H, D), torch.float16, gen)
    quantize_to_paged(x, x, cache, torch.tensor([4, 7, 9]), backend="reference")
    packed, scale, mn = (getattr(cache, f"key_{p}").view(capacity, -1)
                         for p in ("packed", "scale", "min"))
    out = torch.full((4, H * D), 7.0, dtype=torch.float16)
    rows = torch.tensor([backends.ZERO_ROW, 7, -1, backends.ZERO_ROW], dtype=torch.int64)
    rows_impl.dequantize_rows(packed, scale, mn, out, rows, cache.spec)
    want = tk.quantize(x[1], bits=4, group_size=32, backend="reference").dequantize(
        backend="reference")
    assert bits_equal(out[[0, 3]], torch.zeros(2, H * D, dtype=torch.float16))
    assert same_values(out[1], want.reshape(-1))
    assert (out[2] == 7.0).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_row_kernels_match_row_by_row_on_mixed_runs(backend, gen):
    """The CPU gather hands runs of consecutive slots (a block's tokens) and of ZERO_ROWs to
    one kernel call: runs broken anywhere, skips inside runs and chunk edges (hundreds of rows
    over two threads) give exactly what dequantizing row by row gives."""
    from thunderkv import backends

    rows_impl = backends.resolve(backend, torch.device("cpu"))
    cache = _cache()
    capacity = cache.num_blocks * BS
    x = random_kv((capacity, H, D), torch.float16, gen)
    quantize_to_paged(x, x, cache, torch.arange(capacity), backend="reference")
    dense = tk.quantize(x, bits=4, group_size=32, backend="reference").dequantize(
        backend="reference").reshape(capacity, -1)
    pieces = []
    while sum(map(len, pieces)) < 300:
        kind, n = torch.randint(0, 4, (2,), generator=gen).tolist()
        n = 1 + n * 7
        start = int(torch.randint(0, capacity - n, (1,), generator=gen))
        pieces.append([torch.arange(start, start + n), torch.full((n,), backends.ZERO_ROW),
                       torch.full((n,), -1), torch.randint(0, capacity, (n,), generator=gen)
                       ][kind])
    rows = torch.cat(pieces).long()
    out = torch.full((rows.numel(), H * D), 7.0, dtype=torch.float16)
    packed, scale, mn = (getattr(cache, f"key_{p}").view(capacity, -1)
                         for p in ("packed", "scale", "min"))
    rows_impl.dequantize_rows(packed, scale, mn, out, rows, cache.spec)
    want = torch.full_like(out, 7.0)
    want[rows >= 0] = dense[rows[rows >= 0]]
    want[rows == backends.ZERO_ROW] = 0
    assert same_values(out, want)


def test_pack_unpack_moves_blocks_bit_exactly_to_other_ids(gen):
    src = _cache()
    table, _, _ = _fill_sequences(src, [40], gen)
    ids = table[0, :3]
    buf = pack_for_transfer(src, ids)
    assert buf.dtype == torch.uint8 and buf.numel() == transfer_nbytes(src, 3)
    assert buf.numel() == 3 * src.block_nbytes
    dst = _cache(num_blocks=5)
    new_ids = torch.tensor([4, 0, 2])
    unpack_from_transfer(buf, dst, new_ids)
    for a, b in zip(src.parts(), dst.parts()):
        assert bits_equal(a[ids.long()], b[new_ids])
    assert (dst.key_packed[[1, 3]] == 0).all()
    out = torch.empty_like(buf)
    assert pack_for_transfer(src, ids, out=out) is out and torch.equal(out, buf)


def test_compressed_block_is_smaller_by_format_ratio():
    c = _cache(dtype=torch.float16, bits=4, group_size=64)
    raw = 2 * BS * H * D * 2  # K and V of one block in fp16
    assert c.block_nbytes == pytest.approx(raw * tk.FormatSpec(4, 64).bytes_per_element(torch.float16) / 2)


@pytest.mark.parametrize(
    "slots,exc,words",
    [
        (torch.tensor([0, 1, 12 * BS]), ValueError, r"values in \[0, 192\], outside \[-1, 191\]"),
        (torch.tensor([0, -2, 3]), ValueError, r"values in \[-2, 3\], outside \[-1, 191\]"),
        (torch.tensor([0, 1]), ValueError, r"slot_mapping must be \[num_tokens=3\], got \(2,\)"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "slot_mapping must be an int32/int64"),
    ],
)
def test_bad_slots_raise_and_leave_cache_untouched(slots, exc, words, gen):
    cache = _cache()
    snap = _snapshot(cache)
    k = random_kv((3, H, D), torch.float16, gen)
    with pytest.raises(exc, match=words):
        quantize_to_paged(k, k, cache, slots)
    assert _unchanged(cache, snap)


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda k: k[:, :2], ValueError, r"kv_heads=3, head_dim=64\], got \(3, 2, 64\)"),
        (lambda k: k.float(), TypeError, "key has dtype torch.float32 but the cache holds"),
        (lambda k: k[0], ValueError, r"key must be \[num_tokens, .*\], got \(3, 64\)"),
    ],
)
def test_bad_kv_shapes_raise(make, exc, words, gen):
    cache = _cache()
    k = random_kv((3, H, D), torch.float16, gen)
    with pytest.raises(exc, match=words):
        quantize_to_paged(make(k), make(k), cache, torch.tensor([0, 1, 2]))


def test_bad_block_tables_and_lengths_raise(gen):
    cache = _cache()
    with pytest.raises(ValueError, match="outside"):
        gather_dequantize(cache, torch.tensor([[0, 12]]), torch.tensor([20]))
    with pytest.raises(ValueError, match="seq_lens must lie"):
        gather_dequantize(cache, torch.tensor([[0, 1]]), torch.tensor([33]))
    with pytest.raises(ValueError, match="block_table must be"):
        gather_dequantize(cache, torch.tensor([0, 1]), torch.tensor([3]))


def test_bad_transfer_buffers_raise_and_write_nothing(gen):
    src = _cache()
    _fill_sequences(src, [40], gen)
    buf = pack_for_transfer(src, torch.tensor([0, 1]))
    dst = _cache()
    snap = _snapshot(dst)
    with pytest.raises(ValueError, match="bytes"):
        unpack_from_transfer(buf[:-1], dst, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must not repeat"):
        unpack_from_transfer(buf, dst, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="outside"):
        unpack_from_transfer(buf, dst, torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="contiguous 1-D uint8"):
        pack_for_transfer(src, torch.tensor([0, 1]), out=torch.empty(7, dtype=torch.uint8))
    assert _unchanged(dst, snap)


@pytest.mark.skipif(tk.backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
                    reason="extension not built")
def test_fused_row_kernels_check_every_index_before_writing(gen):
    """The compiled paged write/gather re-check their row indices (defence in depth behind the
    Python validation) and write nothing when one is out of range."""
    from thunderkv._extension import load_extension

    ext = load_extension()
    cache = _cache()
    x = random_kv((3, H, D), torch.float16, gen)
    packed, scale, mn = (getattr(cache, f"key_{p}").view(cache.num_blocks * BS, -1)
                         for p in ("packed", "scale", "min"))
    snap = _snapshot(cache)
    for bad in (cache.num_blocks * BS, -2):
        slots = torch.tensor([0, bad, 1], dtype=torch.int64)
        with pytest.raises(IndexError, match="outside"):
            ext.cpu_quantize_rows(x.data_ptr(), packed.data_ptr(), scale.data_ptr(),
                                  mn.data_ptr(), H * D // 32, 32, 4, 0, slots.data_ptr(), 3,
                                  packed.shape[0])
    assert _unchanged(cache, snap)
    out = torch.full((2, BS * H * D), 7.0, dtype=torch.float16)
    for bad in (cache.num_blocks, -3):  # -2 is ZERO_ROW, -1 skips
        rows = torch.tensor([0, bad], dtype=torch.int64)
        with pytest.raises(IndexError, match="outside"):
            ext.cpu_dequantize_rows(packed.data_ptr(), scale.data_ptr(), mn.data_ptr(),
                                    out.data_ptr(), BS * H * D // 32, 32, 4, 0, rows.data_ptr(),
                                    2, cache.num_blocks)
    assert (out == 7.0).all()


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton does not run on CPU tensors here")
def test_triton_row_kernels_drop_slots_past_the_cache(gen):
    """Under CUDA-graph capture nothing checks slots on the host, so the GPU row kernels drop
    a slot outside [0, capacity) like a -1 (never writing past the cache). The Triton kernels
    run here under the interpreter; the CUDA ones in test_cuda_emulation.py."""
    from thunderkv import backends

    triton_rows = backends.resolve("triton", torch.device("cpu"))
    cache = _cache()
    capacity = cache.num_blocks * BS
    packed, scale, mn = (getattr(cache, f"key_{p}").view(capacity, -1)
                         for p in ("packed", "scale", "min"))
    x = random_kv((4, H, D), torch.float16, gen)
    snap = _snapshot(cache)
    slots = torch.tensor([capacity, 5, -1, capacity + 10**6], dtype=torch.int64)
    triton_rows.quantize_rows(x, packed, scale, mn, slots, cache.spec)
    want = _cache()
    quantize_to_paged(x[1:2], x[1:2], want, torch.tensor([5]), backend="reference")
    assert bits_equal(cache.key_packed, want.key_packed) and bits_equal(cache.key_scale,
                                                                        want.key_scale)
    assert bits_equal(cache.key_min, want.key_min)
    assert all(bits_equal(a, b) for a, b in zip(cache.parts()[3:], snap[3:]))  # values untouched
    out = torch.full((4, H * D), 7.0, dtype=torch.float16)
    triton_rows.dequantize_rows(packed, scale, mn, out, slots, cache.spec)
    assert (out[[0, 2, 3]] == 7.0).all()
    row = tk.quantize(x[1], bits=4, group_size=32, backend="reference").dequantize(
        backend="reference")
    assert same_values(out[1], row.reshape(-1))


def test_pack_falls_back_when_a_section_is_not_aligned_for_its_dtype(gen):
    """One block of 1 token x 1 head x 4 dims at 2 bits is a 1-byte code section, so the fp16
    scale section starts at an odd offset: packing copies bytes instead of selecting in place."""
    src = PagedKVCache.allocate(4, 1, 1, 4, bits=2, group_size=4)
    k, v = random_kv((4, 1, 4), torch.float16, gen), random_kv((4, 1, 4), torch.float16, gen)
    quantize_to_paged(k, v, src, torch.arange(4))
    ids = torch.tensor([2])
    assert src.key_packed[0].numel() == 1  # the key scales would start at byte 1
    buf = pack_for_transfer(src, ids)
    assert buf.numel() == src.block_nbytes
    dst = PagedKVCache.allocate(2, 1, 1, 4, bits=2, group_size=4)
    unpack_from_transfer(buf, dst, torch.tensor([1]))
    for a, b in zip(src.parts(), dst.parts()):
        assert bits_equal(a[2], b[1])


GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available()
                and tk.backends.unavailable_reason(b, torch.device("cuda")) is None]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device with a cuda/triton backend")
@pytest.mark.parametrize("backend,scalar", [
    (b, s) for b in GPU_BACKENDS or ["cuda"] for s in ((False, True) if b == "cuda" else (False,))])
def test_paged_ops_on_gpu_match_the_cpu_cache(backend, scalar, gen, monkeypatch):
    """Write, gather, pack and unpack on the GPU give the bits the reference gives on the CPU
    (CUDA: the 16-byte-vector kernels, and with THUNDERKV_CUDA_SCALAR=1 the one-thread-per-group
    kernels that misaligned caches take)."""
    if scalar:
        monkeypatch.setenv("THUNDERKV_CUDA_SCALAR", "1")
    lens = [37, 16, 5]
    cpu, gpu = _cache(), PagedKVCache.allocate(12, BS, H, D, bits=4, group_size=32, device="cuda")
    table, ks, vs = _fill_sequences(cpu, lens, gen)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = torch.cat([table[b].long()[pos // BS] * BS + pos % BS, torch.tensor([-1])])
        pad = random_kv((1, H, D), torch.float16, gen)  # a padding token: must land nowhere
        k, v = torch.cat([ks[b], pad]), torch.cat([vs[b], pad])
        quantize_to_paged(k.cuda(), v.cuda(), gpu, slots.cuda(), backend=backend)
    for a, g in zip(cpu.parts(), gpu.parts()):
        assert bits_equal(a, g.cpu())
    want = gather_dequantize(cpu, table, torch.tensor(lens), backend="reference")
    got = gather_dequantize(gpu, table.cuda(), torch.tensor(lens).cuda(), backend=backend)
    for w, g in zip(want, got):
        assert same_values(g.cpu(), w)
    ids = table[0, :2]
    assert torch.equal(pack_for_transfer(gpu, ids.cuda()).cpu(), pack_for_transfer(cpu, ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_paged_ops(backend, gen):
    """The paged ops are registered custom ops: schema (declared mutations only), fake
    implementations and AOT dispatch agree with the real ones."""
    cache = _cache()
    parts = cache.parts()
    spec = (cache.spec.bits, cache.spec.group_size)
    key, value = random_kv((20, H, D), torch.float16, gen), random_kv((20, H, D), torch.float16, gen)
    slots = torch.randperm(cache.num_blocks * BS, generator=gen)[:20]
    slots[3] = -1
    torch.library.opcheck(torch.ops.thunderkv.quantize_to_paged.default,
                          (key, value, *parts, slots, *spec, backend))
    table, _, _ = _fill_sequences(cache, [37, 5], gen)
    lens = torch.tensor([37, 5])
    outs = [torch.zeros(2, table.shape[1] * BS, H, D, dtype=torch.float16) for _ in range(2)]
    torch.library.opcheck(torch.ops.thunderkv.gather_dequantize_into.default,
                          (*parts, table, lens, *outs, -1, *spec, backend))
    torch.library.opcheck(torch.ops.thunderkv.gather_dequantize_into.default,
                          (*parts, table, lens, *outs, 40, *spec, backend))
    ids = table[0, :2]
    buf = torch.zeros(transfer_nbytes(cache, 2), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.thunderkv.pack_for_transfer.default,
                          (*parts, ids, buf, *spec))
    dst = _cache(num_blocks=4)
    torch.library.opcheck(torch.ops.thunderkv.unpack_from_transfer.default,
                          (pack_for_transfer(cache, ids), torch.tensor([3, 1]), *dst.parts(), *spec))


def test_paged_ops_trace_under_torch_compile(gen):
    """torch.compile(fullgraph) through the write and pack ops gives the eager bits."""
    cache, twin = _cache(), _cache()
    key, value = random_kv((16, H, D), torch.float16, gen), random_kv((16, H, D), torch.float16, gen)
    slots = torch.arange(16) * 3

    def write_and_pack(k, v, s):
        quantize_to_paged(k, v, cache, s)
        return pack_for_transfer(cache, torch.tensor([0, 1, 2]))

    got = torch.compile(write_and_pack, fullgraph=True)(key, value, slots)
    quantize_to_paged(key, value, twin, slots)
    assert torch.equal(got, pack_for_transfer(twin, torch.tensor([0, 1, 2])))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device with a cuda/triton backend")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["cuda"])
def test_paged_write_can_be_captured_in_a_cuda_graph(backend, gen):
    """A serving engine records its decode step in a CUDA graph: quantize_to_paged must not
    sync the host there. Replays with new tokens and slots write what eager calls write, and a
    slot past the cache (unchecked under capture) is dropped, not written out of bounds."""
    num_tokens = 4
    graph_cache = PagedKVCache.allocate(12, BS, H, D, bits=4, group_size=32, device="cuda")
    eager_cache = PagedKVCache.allocate(12, BS, H, D, bits=4, group_size=32, device="cuda")
    k = torch.zeros(num_tokens, H, D, dtype=torch.float16, device="cuda")
    v = torch.zeros_like(k)
    slots = torch.full((num_tokens,), -1, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (Triton compiles here)
        quantize_to_paged(k, v, graph_cache, slots, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quantize_to_paged(k, v, graph_cache, slots, backend=backend)
        quantize_to_paged(k[:0], v[:0], graph_cache, slots[:0], backend=backend)  # no tokens
    capacity = 12 * BS
    for step in range(3):
        new_k = random_kv((num_tokens, H, D), torch.float16, gen).cuda()
        new_v = random_kv((num_tokens, H, D), torch.float16, gen).cuda()
        new_slots = torch.tensor([step, 20 + step, -1, capacity + step], device="cuda")
        k.copy_(new_k), v.copy_(new_v), slots.copy_(new_slots)
        graph.replay()
        quantize_to_paged(new_k[:2], new_v[:2], eager_cache, new_slots[:2], backend=backend)
    torch.cuda.synchronize()
    for a, b in zip(graph_cache.parts(), eager_cache.parts()):
        assert bits_equal(a, b)



@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device with a cuda/triton backend")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["cuda"])
def test_paged_gather_can_be_captured_in_a_cuda_graph(backend, gen):
    """The decode step also reads the cache back: with max_len given, gather_dequantize syncs
    nothing, so it records into a CUDA graph, and replays with new block tables, lengths and
    cache contents give the bits eager calls give (zeros past each sequence included)."""
    lens0 = [37, 16, 5]
    cpu = _cache()
    table0, _, _ = _fill_sequences(cpu, lens0, gen)
    cache = PagedKVCache.allocate(12, BS, H, D, bits=4, group_size=32, device="cuda")
    width = table0.shape[1] * BS
    table = torch.zeros(table0.shape, dtype=torch.int64, device="cuda")
    lens = torch.zeros(3, dtype=torch.int64, device="cuda")
    out = tuple(torch.full((3, width, H, D), 9.0, dtype=torch.float16, device="cuda")
                for _ in range(2))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (Triton compiles here)
        gather_dequantize(cache, table, lens, max_len=40, backend=backend, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = gather_dequantize(cache, table, lens, max_len=40, backend=backend, out=out)
    for step in range(3):
        fresh = _cache()
        new_table, _, _ = _fill_sequences(fresh, lens0, gen)
        new_lens = torch.tensor(lens0).roll(step) - 2 * step
        for a, b in zip(cache.parts(), fresh.parts()):
            a.copy_(b)
        table.copy_(new_table.roll(step, 0)), lens.copy_(new_lens)
        graph.replay()
        want = gather_dequantize(cache, table, lens, max_len=40, backend=backend)
        torch.cuda.synchronize()
        for g, w, o in zip(got, want, out):
            assert g.shape == (3, 40, H, D) and bits_equal(g, w)
            assert (o[:, 40:] == 9.0).all()


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton does not run on CPU tensors here")
def test_gpu_row_kernels_refuse_a_slotted_side_that_is_not_a_row_view(gen):
    """The GPU row kernels bound slots by the slotted side's row count, so they take only the
    [capacity, row bytes] view thunderkv.paged passes; the 4-D cache raises instead of
    silently dropping every slot past num_blocks."""
    from thunderkv import backends

    triton_rows = backends.resolve("triton", torch.device("cpu"))
    cache = _cache()
    x = random_kv((2, H, D), torch.float16, gen)
    slots = torch.tensor([0, 20], dtype=torch.int64)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="row view"):
        triton_rows.quantize_rows(x, cache.key_packed, cache.key_scale, cache.key_min, slots,
                                  cache.spec)
    assert _unchanged(cache, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_reads_only_the_blocks_seq_lens_covers(backend, gen):
    """Block-table entries past a sequence's blocks (and past max_len) are never read, so they
    may hold anything (-1 padding, ids outside the cache); covered ones are still checked."""
    cache = _cache()
    lens = [37, 16, 5, 0]
    table, _, _ = _fill_sequences(cache, lens[:3], gen)
    table = torch.cat([table, torch.zeros(1, table.shape[1], dtype=table.dtype)])
    table = torch.cat([table, torch.zeros(4, 5, dtype=table.dtype)], dim=1)  # 8 columns
    want = gather_dequantize(cache, table, torch.tensor(lens), backend="reference")
    padded = table.clone()
    junk = torch.randint(-5, 10**6, padded.shape, generator=gen, dtype=padded.dtype)
    need = torch.tensor([-(-n // BS) for n in lens])
    unread = torch.arange(padded.shape[1])[None, :] >= need[:, None]
    padded[unread] = junk[unread]
    padded[3, 0] = -1  # an empty sequence reads nothing
    for got in (gather_dequantize(cache, padded, torch.tensor(lens), backend=backend),
                gather_dequantize(cache, padded, torch.tensor(lens), backend=backend,
                                  max_len=8 * BS)):
        for g, w in zip(got, want):
            assert bits_equal(g[:, :37], w)
            assert (g[:, 37:] == 0).all()
    # max_len=16 reads one block per sequence: the 37-token row's later blocks are unread
    cut = padded.clone()
    cut[0, 1:] = -1
    got = gather_dequantize(cache, cut, torch.tensor(lens), backend=backend, max_len=16)
    assert bits_equal(got[0], want[0][:, :16])
    bad = padded.clone()
    bad[0, 2] = -1  # the 37-token sequence's third block
    with pytest.raises(ValueError, match="outside"):
        gather_dequantize(cache, bad, torch.tensor(lens), backend=backend)
    bad[0, 2] = cache.num_blocks
    with pytest.raises(ValueError, match="outside"):
        gather_dequantize(cache, bad, torch.tensor(lens), backend=backend, max_len=40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_into_overlapping_workspaces_raises_and_writes_nothing(backend, gen):
    """out=(w, w) used to return the values as the keys (the value pass overwrote them)."""
    cache = _cache()
    lens = [37, 5]
    table, _, _ = _fill_sequences(cache, lens, gen)
    shape = (2, table.shape[1] * BS, H, D)
    w = random_kv(shape, torch.float16, gen, specials=False)
    buf = torch.zeros(2 * w.numel(), dtype=torch.float16)
    half = w.numel() // 2
    overlapping = (buf[:w.numel()].view(shape), buf[half:half + w.numel()].view(shape))
    for out in ((w, w), overlapping):
        before = [o.clone() for o in out]
        with pytest.raises(ValueError, match="share memory"):
            gather_dequantize(cache, table, torch.tensor(lens), out=out, backend=backend)
        assert all(bits_equal(o, b) for o, b in zip(out, before))


def test_transfer_ops_reject_non_tensor_arguments_clearly():
    """Non-tensors used to reach the torch op and dump its schema (RuntimeError)."""
    cache = _cache()
    buf = pack_for_transfer(cache, torch.tensor([0, 1]))
    snap = _snapshot(cache)
    with pytest.raises(TypeError, match="block_ids must be an int32/int64 tensor"):
        unpack_from_transfer(buf, cache, [2, 3])
    with pytest.raises(TypeError, match="buffer must be a 1-D uint8 tensor"):
        unpack_from_transfer(bytes(buf.numpy()), cache, torch.tensor([2, 3]))
    with pytest.raises(TypeError, match="out must be a contiguous 1-D uint8 tensor"):
        pack_for_transfer(cache, torch.tensor([0]), out=bytearray(transfer_nbytes(cache, 1)))
    assert _unchanged(cache, snap)


def test_readme_paged_example_runs_as_written():
    """The README's paged-cache snippet, executed verbatim."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("Paged cache for serving engines:", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    k, workspaces = scope["k"], scope["workspaces"]
    assert k.shape == (1, 40, 8, 128) and k.data_ptr() == workspaces[0].data_ptr()
    assert (k[0] - scope["key"]).abs().max() < 0.5  # 4-bit codes of N(0, 1) data
    assert scope["payload"].numel() == 3 * scope["cache"].block_nbytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_transfer_buffers_over_the_cache_raise_and_write_nothing(backend, gen):
    """pack's out= (or unpack's buffer) inside the cache's own tensors used to be accepted: the
    pack wrote the payload over the cache's key codes, silently corrupting other blocks."""
    cache = PagedKVCache.allocate(64, BS, H, D, dtype=torch.float32, group_size=32)
    n = 40
    k, v = (random_kv((n, H, D), torch.float32, gen) for _ in range(2))
    quantize_to_paged(k, v, cache, torch.arange(n), backend=backend)
    ids = torch.tensor([2, 0])
    nbytes = transfer_nbytes(cache, 2)
    assert nbytes <= cache.key_packed.numel()
    inside = cache.key_packed.view(-1)[:nbytes]
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="share memory"):
        pack_for_transfer(cache, ids, out=inside)
    assert _unchanged(cache, snap)
    with pytest.raises(ValueError, match="share memory"):
        unpack_from_transfer(inside, cache, torch.tensor([5, 6]))
    assert _unchanged(cache, snap)


@pytest.mark.parametrize("backend", ["gpu", "cuda"])
def test_bad_backend_raises_even_when_there_is_nothing_to_do(backend):
    """A 0-token write and an empty gather used to return before the backend was looked at,
    so a misspelt or unusable backend passed silently until the first real call."""
    cache = _cache()
    snap = _snapshot(cache)
    empty = torch.zeros(0, H, D, dtype=torch.float16)
    exc = ValueError if backend == "gpu" else RuntimeError
    with pytest.raises(exc, match="backend"):
        quantize_to_paged(empty, empty, cache, torch.zeros(0, dtype=torch.int64),
                          backend=backend)
    with pytest.raises(exc, match="backend"):
        gather_dequantize(cache, torch.zeros(2, 3, dtype=torch.int32), torch.tensor([0, 0]),
                          backend=backend)
    with pytest.raises(exc, match="backend"):
        gather_dequantize(cache, torch.zeros(0, 3, dtype=torch.int32),
                          torch.zeros(0, dtype=torch.int64), backend=backend)
    assert _unchanged(cache, snap)


@pytest.mark.parametrize("field", ["num_blocks", "block_size", "kv_heads", "head_dim"])
def test_allocate_refuses_a_bool_size(field):
    """True is an int to isinstance; a cache of True blocks is a mistake, not one block."""
    sizes = dict(num_blocks=4, block_size=2, kv_heads=1, head_dim=32)
    sizes[field] = True
    with pytest.raises(ValueError, match=f"{field} must be a positive int, got True"):
        PagedKVCache.allocate(**sizes, bits=8, group_size=32 if field != "head_dim" else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_from_cache_memory_or_into_aliased_parts_raises_and_writes_nothing(backend, gen):
    """Keys that were a view of the cache's own codes, or a cache whose scale and minimum were
    one tensor, used to be accepted: the write overwrote the keys while reading them, or left
    one token's minimum in place of its scale."""
    cache = PagedKVCache.allocate(64, BS, H, D, dtype=torch.float32, group_size=32)
    n = 8
    k, v = (random_kv((n, H, D), torch.float32, gen) for _ in range(2))
    quantize_to_paged(k, v, cache, torch.arange(n), backend=backend)
    snap = _snapshot(cache)
    inside = cache.key_packed.view(-1).view(torch.float32)[:n * H * D].view(n, H, D)
    with pytest.raises(ValueError, match="key and key_packed share memory"):
        quantize_to_paged(inside, v, cache, torch.arange(n, 2 * n), backend=backend)
    assert _unchanged(cache, snap)
    parts = list(cache.parts())
    parts[2] = parts[1]  # key_min is key_scale
    aliased = cache_from_parts(parts, bits=4, group_size=32)
    with pytest.raises(ValueError, match="key_scale and key_min share memory"):
        quantize_to_paged(k, v, aliased, torch.arange(n, 2 * n), backend=backend)
    assert _unchanged(cache, snap)
    quantize_to_paged(k, k, cache, torch.arange(n, 2 * n), backend=backend)  # one tensor as
    # both key and value is only read twice: fine
