"""A paged, format v1-compressed KV cache and the ops a serving engine calls on it.

Layout (per layer), like vLLM's paged cache with codes instead of values:

- ``key_packed``, ``value_packed``: uint8 ``[num_blocks, block_size, kv_heads, head_dim*bits/8]``
- ``key_scale``, ``key_min``, ``value_scale``, ``value_min``:
  ``[num_blocks, block_size, kv_heads, head_dim/G]`` in the model dtype.

Slot ``s`` is token ``s % block_size`` of block ``s // block_size``. Groups run along head_dim
(per-token quantization), so a token can be written the moment it is computed.

Ops:

- :func:`quantize_to_paged` writes new tokens' K/V into their slots (vLLM's reshape_and_cache);
- :func:`gather_dequantize` reads a batch of sequences back into dense tensors;
- :func:`pack_for_transfer` / :func:`unpack_from_transfer` copy a sequence's blocks into / out
  of one contiguous buffer (the wire payload: one registered buffer holds a request's KV).

Each op is also a registered ``torch.library`` custom op on the cache's six tensors
(``thunderkv::quantize_to_paged``, ``gather_dequantize_into``, ``pack_for_transfer``,
``unpack_from_transfer``; :mod:`thunderkv._paged_ops`), so ``torch.compile`` can trace it;
eager calls run the same body directly. The quantization itself uses the chosen backend's
format v1 kernels, so the cache holds exactly the bits format v1 defines. Backends with row
kernels (``quantize_rows`` / ``dequantize_rows``: cpu, cuda and triton) write and read slots
directly; the reference quantizes into temporaries and index-copies.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .api import QuantizedTensor, dequantize, quantize
from .format import SUPPORTED_DTYPES, FormatSpec, check_disjoint

_PARTS = ("key_packed", "key_scale", "key_min", "value_packed", "value_scale", "value_min")


@dataclass(slots=True)
class PagedKVCache:
    """One layer's compressed paged KV cache (see the module docstring for shapes)."""

    key_packed: torch.Tensor
    key_scale: torch.Tensor
    key_min: torch.Tensor
    value_packed: torch.Tensor
    value_scale: torch.Tensor
    value_min: torch.Tensor
    spec: FormatSpec
    dtype: torch.dtype

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        bits: int = 4,
        group_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """Allocate an empty (zeroed) cache.

        Parameters
        ----------
        num_blocks, block_size : blocks in the pool and tokens per block (positive ints); slot
            ``s`` is token ``s % block_size`` of block ``s // block_size``.
        kv_heads, head_dim : per-token K/V geometry (positive ints).
        dtype : the model dtype, of scales and minima and of what goes in and comes out
            (float16, bfloat16 or float32; default float16).
        bits : 2, 4 or 8 bits per code (default 4).
        group_size : G along head_dim (default 64); must divide head_dim.
        device : where the six tensors live (default "cpu").

        Raises ValueError/TypeError for anything else; see the module docstring for shapes.
        """
        spec = FormatSpec(bits, group_size, -1)
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size),
                        ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:  # True is an int
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        if head_dim % group_size:
            raise ValueError(f"head_dim = {head_dim} is not divisible by group_size = {group_size}")
        lead = (num_blocks, block_size, kv_heads)
        packed = (*lead, head_dim * bits // 8)
        params = (*lead, head_dim // group_size)

        def z(shape, dt):
            return torch.zeros(shape, dtype=dt, device=device)

        return cls(z(packed, torch.uint8), z(params, dtype), z(params, dtype),
                   z(packed, torch.uint8), z(params, dtype), z(params, dtype), spec, dtype)

    @property
    def num_blocks(self) -> int:
        return self.key_packed.shape[0]

    @property
    def block_size(self) -> int:
        return self.key_packed.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.key_packed.shape[2]

    @property
    def head_dim(self) -> int:
        return self.key_packed.shape[3] * 8 // self.spec.bits

    @property
    def device(self) -> torch.device:
        return self.key_packed.device

    def parts(self) -> list[torch.Tensor]:
        """The six tensors, in wire order: key_packed, key_scale, key_min, value_packed,
        value_scale, value_min (the cache's own tensors, not copies; the argument order of the
        ``torch.ops.thunderkv`` paged ops and of :func:`cache_from_parts`)."""
        return [getattr(self, n) for n in _PARTS]

    @property
    def block_nbytes(self) -> int:
        """Bytes one block occupies (K and V codes, scales and minima)."""
        return sum(t[0].numel() * t.element_size() for t in self.parts())

    @property
    def nbytes(self) -> int:
        return self.block_nbytes * self.num_blocks


def _check_cache(cache: PagedKVCache) -> PagedKVCache:
    """The six parts agree with each other and with the cache's spec (they may come straight
    from a ``torch.ops`` caller)."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    parts = cache.parts()
    if not all(isinstance(t, torch.Tensor) for t in parts):
        raise TypeError("every cache part must be a torch.Tensor")
    kp = cache.key_packed
    if kp.dim() != 4 or kp.dtype != torch.uint8:
        raise ValueError(f"key_packed must be uint8 [num_blocks, block_size, kv_heads, "
                         f"head_dim*bits/8], got {kp.dtype} {tuple(kp.shape)}")
    if cache.head_dim % cache.spec.group_size:
        raise ValueError(f"head_dim {cache.head_dim} is not divisible by group_size "
                         f"{cache.spec.group_size}")
    params = (*kp.shape[:3], cache.head_dim // cache.spec.group_size)
    for name, t in zip(_PARTS, parts):
        want = tuple(kp.shape) if name.endswith("packed") else params
        dtype = torch.uint8 if name.endswith("packed") else cache.dtype
        if tuple(t.shape) != want or t.dtype != dtype or t.device != kp.device or (
                not t.is_contiguous()):
            raise ValueError(f"cache part {name} must be a contiguous {dtype} tensor of shape "
                             f"{list(want)} on {kp.device}, got {t.dtype} {list(t.shape)} on "
                             f"{t.device}")
    if cache.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cache dtype must be float16, bfloat16 or float32, got {cache.dtype}")
    return cache


def cache_from_parts(parts, bits: int, group_size: int) -> PagedKVCache:
    """A validated :class:`PagedKVCache` over six existing tensors (in ``_PARTS`` order)."""
    parts = list(parts)
    if len(parts) != 6:
        raise ValueError(f"a paged cache has 6 parts, got {len(parts)}")
    return _check_cache(PagedKVCache(*parts, spec=FormatSpec(bits, group_size, -1),
                                     dtype=parts[1].dtype))


def _eager(*tensors) -> bool:
    from ._ops import eager_ok

    return eager_ok(*tensors)


def _check_kv(key: torch.Tensor, value: torch.Tensor, cache: PagedKVCache) -> None:
    want = (cache.kv_heads, cache.head_dim)
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 or tuple(t.shape[1:]) != want:
            raise ValueError(
                f"{name} must be [num_tokens, kv_heads={want[0]}, head_dim={want[1]}], "
                f"got {tuple(t.shape)}"
            )
        if t.dtype != cache.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {cache.dtype}")
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {cache.device}")
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key has {key.shape[0]} tokens but value has {value.shape[0]}")


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s op is being recorded into a CUDA graph (no host syncs allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_index(name: str, t: torch.Tensor, limit: int, device: torch.device,
                 allow_negative: bool = False, check_range: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the cache is on {device}")
    if t.numel() and check_range:
        lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one device sync, not two
        if hi >= limit or (lo < 0 and not (allow_negative and lo == -1)) or lo < -1:
            raise ValueError(
                f"{name} holds values in [{lo}, {hi}], outside [{-1 if allow_negative else 0}, "
                f"{limit - 1}]" + (" (-1 marks a padding token)" if allow_negative else "")
            )
    return t.long()


def _row_kernels(backend: str, device: torch.device):
    """The backend module when it has fused row kernels (quantize_rows / dequantize_rows) for
    ``device``, else None (then the ops quantize into temporaries and index-copy)."""
    from . import backends

    module = backends.resolve(backend, device)
    return module if hasattr(module, "quantize_rows") else None


def _cache_rows(cache: PagedKVCache, prefix: str) -> tuple[torch.Tensor, ...]:
    """(packed, scale, min) of ``prefix`` viewed as one row per slot."""
    n = cache.num_blocks * cache.block_size
    return tuple(getattr(cache, f"{prefix}_{p}").view(n, -1) for p in ("packed", "scale", "min"))


def quantize_to_paged(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: PagedKVCache,
    slot_mapping: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """Quantize new tokens' K/V into their cache slots.

    Parameters
    ----------
    key, value : ``[num_tokens, kv_heads, head_dim]`` in the cache's dtype and device, sharing
        no memory with the cache (one tensor may be both).
    cache : the layer's :class:`PagedKVCache`.
    slot_mapping : int32/int64 ``[num_tokens]``: slot of each token (-1: padding, skipped).
        Non-negative slots must be distinct, as a serving engine's are (vLLM's
        reshape_and_cache has the same rule): two tokens written to one slot race on the GPU
        backends and can leave one token's scale beside the other's codes. Not checked (it
        would cost a device sync per call).
    backend : quantization backend, as for :func:`thunderkv.quantize`.

    Everything is validated before the cache is touched. Under CUDA-graph capture
    (``torch.cuda.graph``, as a serving engine records its decode step) the slot range check,
    a device sync, cannot run: it is skipped, and the cuda and triton row kernels then drop
    tokens whose slot lies outside ``[0, num_blocks * block_size)`` instead of raising (they
    never write outside the cache). Other backends cannot be captured.
    """
    _check_cache(cache)
    _check_kv(key, value, cache)
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError("slot_mapping must be an int32/int64 tensor")
    if _eager(key, value, slot_mapping, *cache.parts()):  # the op's body, without the dispatcher
        _write(key, value, cache, slot_mapping, backend)
    else:
        torch.ops.thunderkv.quantize_to_paged(key, value, *cache.parts(), slot_mapping,
                                              cache.spec.bits, cache.spec.group_size, backend)


def _write(key, value, cache: PagedKVCache, slot_mapping, backend: str) -> None:
    """Body of ``thunderkv::quantize_to_paged`` (arguments not yet validated)."""
    _check_kv(key, value, cache)
    capturing = _capturing(slot_mapping)
    slots = _check_index("slot_mapping", slot_mapping, cache.num_blocks * cache.block_size,
                         cache.device, allow_negative=True, check_range=not capturing)
    if slots.dim() != 1 or slots.numel() != key.shape[0]:
        raise ValueError(
            f"slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}"
        )
    fused = _row_kernels(backend, cache.device)  # resolved first: a bad backend always raises
    if slots.numel() == 0:
        return
    # K/V (or the slots) viewing cache memory would be overwritten while still being read
    check_disjoint(reads={"key": key, "value": value, "slot_mapping": slot_mapping},
                   **dict(zip(_PARTS, cache.parts())))
    spec = cache.spec
    if capturing and fused is None:
        raise RuntimeError(f"quantize_to_paged with backend {backend!r} cannot be captured in a "
                           "CUDA graph: only the cuda and triton backends write slots without a "
                           "host sync")
    if fused is not None:  # one pass from K/V into the slots
        slots64 = slots.to(torch.int64).contiguous()
        for x, prefix in ((key, "key"), (value, "value")):
            fused.quantize_rows(x.contiguous(), *_cache_rows(cache, prefix), slots64, spec)
        return
    keep = slots >= 0
    if not bool(keep.all()):
        key, value, slots = key[keep], value[keep], slots[keep]
    if slots.numel() == 0:
        return
    for x, prefix in ((key, "key"), (value, "value")):
        q = quantize(x, bits=spec.bits, group_size=spec.group_size, backend=backend)
        for part, src in (("packed", q.packed), ("scale", q.scale), ("min", q.minimum)):
            dst = getattr(cache, f"{prefix}_{part}")
            dst.view(-1, *dst.shape[2:]).index_copy_(0, slots, src)


def gather_dequantize(
    cache: PagedKVCache,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    max_len: int | None = None,
    backend: str = "auto",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize a batch of sequences from the paged cache.

    Parameters
    ----------
    block_table : int32/int64 ``[batch, max_blocks]``: block ids of each sequence, in order.
        Only a sequence's first ``ceil(min(seq_len, max_len) / block_size)`` entries are read
        (and range-checked); the rest may hold anything, e.g. -1 padding. ``max_blocks`` bounds
        ``max_len``: size it for the longest sequence the engine serves (vLLM: max_model_len /
        block_size columns).
    seq_lens : int ``[batch]``: tokens of each sequence (<= max_blocks * block_size).
    max_len : length of the returned tensors, in [0, max_blocks * block_size]; sequences longer
        than it are cut there. Default ``max(seq_lens)``, which needs seq_lens on the host: pass
        it (the batch's known maximum, or the engine's maximum model length) and the call can be
        captured in a CUDA graph on the cuda and triton backends, which then read seq_lens on
        the device only. (Eagerly, block_table and seq_lens are still range-checked on the host,
        a sync; under capture nothing is, and block ids outside the cache are skipped, never
        read: their positions keep what the output held.)
    out : optional (key, value) workspaces, each contiguous
        ``[batch, max_blocks * block_size, kv_heads, head_dim]`` in the cache dtype and device,
        reused across calls (fresh multi-MB outputs cost more in page faults than the
        dequantization itself); validated before anything is written. Positions past
        ``max_len`` are left as they are.

    Returns
    -------
    (key, value) : ``[batch, max_len, kv_heads, head_dim]`` in the cache dtype; positions past a
    sequence's length are zero. (Views of a buffer padded to whole blocks, or of ``out``: not
    contiguous when max_len is not the buffer's length.)
    """
    _check_cache(cache)
    table, lens, max_len = _gather_lengths(cache, block_table, seq_lens, max_len)
    batch, H, D = table.shape[0], cache.kv_heads, cache.head_dim
    if out is None:
        padded = -(-max_len // cache.block_size) * cache.block_size
        out = tuple(torch.empty((batch, padded, H, D), dtype=cache.dtype, device=cache.device)
                    for _ in range(2))
    else:
        _check_gather_out(out, cache, (batch, table.shape[1] * cache.block_size, H, D))
    if _eager(block_table, seq_lens, *out, *cache.parts()):  # already validated above
        _gather_checked(cache, table, lens, max_len, out, backend, disjoint=False)
    else:
        torch.ops.thunderkv.gather_dequantize_into(*cache.parts(), block_table, seq_lens, out[0],
                                                   out[1], max_len, cache.spec.bits,
                                                   cache.spec.group_size, backend)
    return out[0][:, :max_len], out[1][:, :max_len]


def _gather_lengths(cache: PagedKVCache, block_table, seq_lens, max_len: int | None):
    """Validated (table as int64, seq_lens as int64 on the cache's device, max_len: the given
    one or max(seq_lens)). Under CUDA-graph capture nothing that needs a host sync is checked,
    and max_len must be given."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise ValueError("block_table must be a 2-D [batch, max_blocks] tensor")
    capturing = _capturing(block_table)
    # only the blocks seq_lens covers are read, and range-checked below (eagerly)
    table = _check_index("block_table", block_table, cache.num_blocks, cache.device,
                         check_range=False)
    if not isinstance(seq_lens, torch.Tensor) or tuple(seq_lens.shape) != (table.shape[0],):
        raise ValueError(f"seq_lens must be [batch={table.shape[0]}]")
    if seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_lens must be an int32/int64 tensor, got {seq_lens.dtype}")
    capacity = table.shape[1] * cache.block_size
    if max_len is not None:
        try:  # a tensor (e.g. seq_lens.max()) would be read to the host: exactly what max_len avoids
            n = (None if isinstance(max_len, (bool, torch.Tensor))
                 else operator.index(max_len))
        except TypeError:
            n = None
        if n is None or not 0 <= n <= capacity:
            raise ValueError(f"max_len must be an int in [0, {capacity}] (max_blocks * "
                             f"block_size), got {max_len!r}")
        max_len = n
    if capturing:
        if max_len is None:
            raise RuntimeError("gather_dequantize under CUDA-graph capture needs max_len=: "
                               "max(seq_lens) would need a host sync")
        if seq_lens.device != cache.device:
            raise ValueError(f"under CUDA-graph capture seq_lens must be on {cache.device}, "
                             f"got {seq_lens.device}")
        return table, seq_lens.to(torch.int64), max_len
    host = seq_lens.tolist()  # one sync; Python ints from here on
    lo, hi = (min(host), max(host)) if host else (0, 0)
    if lo < 0 or hi > capacity:
        raise ValueError(
            f"seq_lens must lie in [0, {capacity}] (max_blocks * block_size), got [{lo}, {hi}]"
        )
    if max_len is None:
        max_len = hi
    lens = seq_lens.to(device=cache.device, dtype=torch.int64)
    _check_read_blocks(cache, table, host, lens, max_len)
    return table, lens, max_len


def _check_read_blocks(cache: PagedKVCache, table: torch.Tensor, host: list[int],
                       lens: torch.Tensor, max_len: int) -> None:
    """Range-check the block ids the gather reads: row b's first ceil(min(seq_lens[b], max_len)
    / block_size). Entries past them are never read (any value, e.g. -1 padding): they are
    checked as block 0, which always exists. ``host``: seq_lens already on the host, ``lens``
    the same on the table's device. One sync."""
    bs = cache.block_size
    n = -(-min(max(host, default=0), max_len) // bs)
    if n == 0:
        return
    read = table[:, :n]
    if any(-(-min(x, max_len) // bs) < n for x in host):
        need = (lens.clamp(max=max_len) + bs - 1) // bs  # on the device: no copy, no sync
        cols = torch.arange(n, device=table.device)
        read = torch.where(cols[None, :] < need[:, None], read, 0)
    lo, hi = torch.stack(torch.aminmax(read)).tolist()
    if lo < 0 or hi >= cache.num_blocks:
        raise ValueError(f"block_table holds values in [{lo}, {hi}] among the blocks seq_lens "
                         f"covers, outside [0, {cache.num_blocks - 1}]")


def _gather(cache: PagedKVCache, block_table, seq_lens, out, max_len: int, backend: str) -> None:
    """Body of ``thunderkv::gather_dequantize_into``: ``out`` (key, value) are
    ``[batch, L, kv_heads, head_dim]`` with L a block multiple between the blocks max_len needs
    and max_blocks * block_size; positions up to max_len (-1: max(seq_lens)) are written
    (zeros past each sequence), later ones left alone."""
    table, lens, max_len = _gather_lengths(cache, block_table, seq_lens,
                                           None if max_len < 0 else max_len)
    _gather_checked(cache, table, lens, max_len, out, backend)


def _token_rows(cache: PagedKVCache, table, lens, width: int, max_len: int,
                checked: bool = True) -> torch.Tensor:
    """The row kernels' index for a gather into ``width`` blocks per sequence: int64
    ``[batch * width * block_size]``, per output token its slot in the cache, ``ZERO_ROW`` past
    its sequence's end, -1 (left alone) from ``max_len`` on or where the block id lies outside
    the cache (possible only unchecked, under capture: ``checked=False``). Device ops only: no
    host sync. (A dozen small ops: ~45 us of dispatch on the CPU, which a CUDA graph removes.)"""
    from .backends import ZERO_ROW

    bs = cache.block_size
    pos = torch.arange(width * bs, device=table.device)
    blk = table[:, :width, None].expand(-1, -1, bs).reshape(table.shape[0], -1)  # per token
    slot = blk * bs + pos % bs
    if not checked:
        slot = torch.where((blk >= 0) & (blk < cache.num_blocks), slot, -1)
    slot = torch.where(pos < lens[:, None], slot, ZERO_ROW)
    if max_len < width * bs:
        slot = torch.where(pos < max_len, slot, -1)
    return slot.reshape(-1)


def _gather_checked(cache: PagedKVCache, table, lens, max_len: int, out, backend: str,
                    disjoint: bool = True) -> None:
    """:func:`_gather` after :func:`_gather_lengths` (``disjoint=False``: ``out`` is known not to
    overlap, fresh or checked by the caller)."""
    batch, H, D = table.shape[0], cache.kv_heads, cache.head_dim
    n_blk = -(-max_len // cache.block_size)
    padded = n_blk * cache.block_size
    _check_gather_out(out, cache, (batch, None, H, D), disjoint=disjoint)
    width = out[0].shape[1] // cache.block_size  # blocks per output row
    if out[0].shape[1] % cache.block_size or not n_blk <= width <= table.shape[1]:
        raise ValueError(f"out must hold between {n_blk} and {table.shape[1]} whole blocks of "
                         f"{cache.block_size} tokens per sequence, got {out[0].shape[1]} tokens")
    fused = _row_kernels(backend, cache.device)  # resolved first: a bad backend always raises
    if batch == 0 or n_blk == 0:  # nothing to write: max_len is 0
        return
    if fused is not None:  # one pass from the slots into the dense output, zeros included
        rows = _token_rows(cache, table, lens, width, max_len, checked=not _capturing(table))
        for dense, prefix in zip(out, ("key", "value")):
            fused.dequantize_rows(*_cache_rows(cache, prefix), dense.view(rows.numel(), -1),
                                  rows, cache.spec)
        return
    if _capturing(table):
        raise RuntimeError(f"gather_dequantize with backend {backend!r} cannot be captured in a "
                           "CUDA graph: only the cuda and triton backends gather without a "
                           "host sync")
    # entries past a sequence's blocks are never read: any valid id stands in (zeroed below)
    need = (lens.clamp(max=max_len) + cache.block_size - 1) // cache.block_size
    cols = torch.arange(n_blk, device=table.device)
    blocks = torch.where(cols[None, :] < need[:, None], table[:, :n_blk], 0).reshape(-1)
    for dense_out, prefix in zip(out, ("key", "value")):
        parts = [getattr(cache, f"{prefix}_{p}").index_select(0, blocks).reshape(batch, padded, H, -1)
                 for p in ("packed", "scale", "min")]
        q = QuantizedTensor(*parts, spec=cache.spec, shape=torch.Size((batch, padded, H, D)),
                            dtype=cache.dtype)
        dense = dequantize(q, backend=backend)
        for b, n in enumerate(lens.tolist()):
            dense[b, n:].zero_()
        dense_out[:, :max_len].copy_(dense[:, :max_len])


def _check_gather_out(out, cache: PagedKVCache, shape: tuple[int | None, ...],
                      disjoint: bool = True) -> None:
    """``out`` is a (key, value) pair of contiguous cache-dtype tensors of ``shape`` (None:
    any length on that axis) that share no memory with each other or the cache (``disjoint``;
    the check costs ~20 us, so it runs once per call)."""
    if (not isinstance(out, (tuple, list)) or len(out) != 2
            or not all(isinstance(t, torch.Tensor) for t in out)):
        raise ValueError("out must be a (key, value) pair of tensors")
    for name, t in zip(("key", "value"), out):
        same = t.dim() == len(shape) and all(w is None or w == n for w, n in zip(shape, t.shape))
        if (not same or t.dtype != cache.dtype or t.device != cache.device
                or not t.is_contiguous() or t.shape != out[0].shape):
            raise ValueError(f"out {name} must be a contiguous {cache.dtype} tensor of shape "
                             f"{list(shape)} on {cache.device}, got {t.dtype} {list(t.shape)} "
                             f"on {t.device}")
    if disjoint:  # a key written over the value (out=(w, w)) or over the cache is silently wrong
        check_disjoint(**{"out key": out[0], "out value": out[1]},
                       **dict(zip(_PARTS, cache.parts())))


def transfer_nbytes(cache: PagedKVCache, num_blocks: int) -> int:
    """Size of the :func:`pack_for_transfer` payload for ``num_blocks`` blocks."""
    return cache.block_nbytes * num_blocks


def pack_for_transfer(
    cache: PagedKVCache, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy the blocks ``block_ids`` (in order) into one contiguous uint8 buffer.

    Wire layout: six sections one after the other, each the selected blocks of one cache part
    in order: key codes, key scales, key minima, value codes, value scales, value minima.

    Parameters
    ----------
    block_ids : 1-D int32/int64 tensor on the cache's device (not a list): ids in
        ``[0, num_blocks)``, in sequence order (repeats allowed; 0 ids give 0 bytes).
    out : optional 1-D contiguous uint8 tensor of exactly :func:`transfer_nbytes` bytes on the
        cache's device, e.g. a registered transfer buffer, sharing no memory with the cache;
        validated before anything is written.

    Returns
    -------
    ``out``, or a new uint8 tensor ``[transfer_nbytes(cache, len(block_ids))]``.
    """
    _check_cache(cache)
    if not isinstance(block_ids, torch.Tensor):
        raise TypeError("block_ids must be an int32/int64 tensor")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a contiguous 1-D uint8 tensor, got {type(out).__name__}")
    if out is None:
        out = torch.empty(transfer_nbytes(cache, block_ids.numel()), dtype=torch.uint8,
                          device=cache.device)
    if _eager(block_ids, out, *cache.parts()):
        _pack(cache, block_ids, out)
    else:
        torch.ops.thunderkv.pack_for_transfer(*cache.parts(), block_ids, out, cache.spec.bits,
                                              cache.spec.group_size)
    return out


def _pack(cache: PagedKVCache, block_ids, out) -> None:
    """Body of ``thunderkv::pack_for_transfer``."""
    ids = _check_index("block_ids", block_ids, cache.num_blocks, cache.device)
    if ids.dim() != 1:
        raise ValueError("block_ids must be 1-D")
    nbytes = transfer_nbytes(cache, ids.numel())
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.dim() != 1
            or out.numel() != nbytes or not out.is_contiguous() or out.device != cache.device):
        raise ValueError(
            f"out must be a contiguous 1-D uint8 tensor of {nbytes} bytes on {cache.device}, "
            f"got {getattr(out, 'dtype', type(out).__name__)} "
            f"{tuple(getattr(out, 'shape', ()))} on {getattr(out, 'device', '-')}"
        )
    check_disjoint(out=out, **dict(zip(_PARTS, cache.parts())))  # out over the cache: corrupt
    offset = 0
    for t in cache.parts():
        size = ids.numel() * t[0].numel() * t.element_size()
        try:  # select straight into the buffer (its section viewed in the part's dtype)
            dst = out[offset:offset + size].view(t.dtype).view(ids.numel(), *t.shape[1:])
            torch.index_select(t, 0, ids, out=dst)
        except RuntimeError:  # section not aligned for the dtype: select, then copy bytes
            out[offset:offset + size].copy_(t.index_select(0, ids).reshape(-1).view(torch.uint8))
        offset += size


def unpack_from_transfer(buffer: torch.Tensor, cache: PagedKVCache, block_ids: torch.Tensor) -> None:
    """Inverse of :func:`pack_for_transfer`: write the buffer's blocks into ``block_ids`` of
    ``cache`` (which may differ from the sender's ids). Validated before anything is written.

    Parameters
    ----------
    buffer : 1-D uint8 tensor of exactly ``transfer_nbytes(cache, len(block_ids))`` bytes, on
        any device: one on another device than the cache (e.g. a host receive buffer for a
        CUDA cache) is copied to the cache's device first, whole. It must not share memory
        with the cache.
    block_ids : 1-D int32/int64 tensor on the cache's device (not a list): distinct ids in
        ``[0, num_blocks)``, one per packed block, in the buffer's order.
    """
    _check_cache(cache)
    if not isinstance(buffer, torch.Tensor):
        raise TypeError(f"buffer must be a 1-D uint8 tensor, got {type(buffer).__name__}")
    if not isinstance(block_ids, torch.Tensor):
        raise TypeError("block_ids must be an int32/int64 tensor")
    if _eager(buffer, block_ids, *cache.parts()):
        _unpack(buffer, cache, block_ids)
    else:
        torch.ops.thunderkv.unpack_from_transfer(buffer, block_ids, *cache.parts(),
                                                 cache.spec.bits, cache.spec.group_size)


def _unpack(buffer, cache: PagedKVCache, block_ids) -> None:
    """Body of ``thunderkv::unpack_from_transfer``."""
    ids = _check_index("block_ids", block_ids, cache.num_blocks, cache.device)
    if ids.dim() != 1:
        raise ValueError("block_ids must be 1-D")
    nbytes = transfer_nbytes(cache, ids.numel())
    if (not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1
            or buffer.numel() != nbytes):
        raise ValueError(
            f"buffer must be a 1-D uint8 tensor of {nbytes} bytes for {ids.numel()} blocks of "
            f"this cache, got {getattr(buffer, 'dtype', type(buffer))} "
            f"{tuple(getattr(buffer, 'shape', ()))}"
        )
    if ids.unique().numel() != ids.numel():
        raise ValueError("block_ids must not repeat a block")
    check_disjoint(buffer=buffer, **dict(zip(_PARTS, cache.parts())))
    buffer = buffer.to(cache.device)
    offset = 0
    for t in cache.parts():
        n = ids.numel() * t[0].numel() * t.element_size()
        raw = buffer[offset:offset + n]
        try:
            section = raw.view(t.dtype)
        except RuntimeError:  # not aligned for the dtype (odd-sized sections before it)
            section = raw.clone().view(t.dtype)
        t.index_copy_(0, ids, section.reshape(ids.numel(), *t.shape[1:]))
        offset += n


from . import _paged_ops as _register_ops  # noqa: E402,F401  (the ops need the bodies above)
