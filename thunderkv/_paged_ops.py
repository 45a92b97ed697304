"""The paged-cache ops (:mod:`thunderkv.paged`) registered with ``torch.library``.

A :class:`~thunderkv.paged.PagedKVCache` is passed as its six tensors (key codes, scales,
minima, value codes, scales, minima) plus ``bits``/``group_size``; the cache dtype is the
scales'. Every op validates all of its arguments before touching a mutated tensor and runs the
body :mod:`thunderkv.paged` runs eagerly; the fake implementations check what can be checked
without data (shapes, dtypes), so ``torch.compile`` and ``opcheck`` can trace them.

- ``thunderkv::quantize_to_paged(key, value, kp!, ks!, km!, vp!, vs!, vm!, slot_mapping, bits,
  group_size, backend)``
- ``thunderkv::gather_dequantize_into(kp, ks, km, vp, vs, vm, block_table, seq_lens, key_out!,
  value_out!, max_len, bits, group_size, backend)`` (max_len -1: max(seq_lens))
- ``thunderkv::pack_for_transfer(kp, ks, km, vp, vs, vm, block_ids, out!, bits, group_size)``
- ``thunderkv::unpack_from_transfer(buffer, block_ids, kp!, ks!, km!, vp!, vs!, vm!, bits,
  group_size)``
"""

from __future__ import annotations

import torch

from . import backends, paged

_DEVICES = ("cpu", "cuda")
_CACHE = ("key_packed", "key_scale", "key_min", "value_packed", "value_scale", "value_min")


def _cache(kp, ks, km, vp, vs, vm, bits, group_size) -> paged.PagedKVCache:
    return paged.cache_from_parts((kp, ks, km, vp, vs, vm), bits, group_size)


# ---------------------------------------------------------------- write
@torch.library.custom_op("thunderkv::quantize_to_paged", mutates_args=_CACHE,
                         device_types=_DEVICES)
def quantize_to_paged(key: torch.Tensor, value: torch.Tensor, key_packed: torch.Tensor,
                      key_scale: torch.Tensor, key_min: torch.Tensor, value_packed: torch.Tensor,
                      value_scale: torch.Tensor, value_min: torch.Tensor,
                      slot_mapping: torch.Tensor, bits: int, group_size: int,
                      backend: str) -> None:
    quantize_to_paged_impl(key, value, key_packed, key_scale, key_min, value_packed, value_scale,
                           value_min, slot_mapping, bits, group_size, backend)


def quantize_to_paged_impl(key, value, kp, ks, km, vp, vs, vm, slot_mapping, bits, group_size,
                           backend) -> None:
    """Body of ``thunderkv::quantize_to_paged``."""
    paged._write(key, value, _cache(kp, ks, km, vp, vs, vm, bits, group_size), slot_mapping,
                 backend)


@quantize_to_paged.register_fake
def _(key, value, kp, ks, km, vp, vs, vm, slot_mapping, bits, group_size, backend) -> None:
    paged._check_kv(key, value, _cache(kp, ks, km, vp, vs, vm, bits, group_size))
    backends.check_backend_name(backend)


# ---------------------------------------------------------------- gather
@torch.library.custom_op("thunderkv::gather_dequantize_into", mutates_args=("key_out", "value_out"),
                         device_types=_DEVICES)
def gather_dequantize_into(key_packed: torch.Tensor, key_scale: torch.Tensor,
                           key_min: torch.Tensor, value_packed: torch.Tensor,
                           value_scale: torch.Tensor, value_min: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor,
                           key_out: torch.Tensor, value_out: torch.Tensor, max_len: int,
                           bits: int, group_size: int, backend: str) -> None:
    gather_dequantize_into_impl(key_packed, key_scale, key_min, value_packed, value_scale,
                                value_min, block_table, seq_lens, key_out, value_out, max_len,
                                bits, group_size, backend)


def gather_dequantize_into_impl(kp, ks, km, vp, vs, vm, block_table, seq_lens, key_out,
                                value_out, max_len, bits, group_size, backend) -> None:
    """Body of ``thunderkv::gather_dequantize_into``."""
    paged._gather(_cache(kp, ks, km, vp, vs, vm, bits, group_size), block_table, seq_lens,
                  (key_out, value_out), max_len, backend)


@gather_dequantize_into.register_fake
def _(kp, ks, km, vp, vs, vm, block_table, seq_lens, key_out, value_out, max_len, bits,
      group_size, backend) -> None:
    cache = _cache(kp, ks, km, vp, vs, vm, bits, group_size)
    paged._check_gather_out((key_out, value_out), cache,  # fake tensors have no addresses
                            (block_table.shape[0], None, cache.kv_heads, cache.head_dim),
                            disjoint=False)
    backends.check_backend_name(backend)


# ---------------------------------------------------------------- transfer
@torch.library.custom_op("thunderkv::pack_for_transfer", mutates_args=("out",),
                         device_types=_DEVICES)
def pack_for_transfer(key_packed: torch.Tensor, key_scale: torch.Tensor, key_min: torch.Tensor,
                      value_packed: torch.Tensor, value_scale: torch.Tensor,
                      value_min: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor,
                      bits: int, group_size: int) -> None:
    pack_for_transfer_impl(key_packed, key_scale, key_min, value_packed, value_scale, value_min,
                           block_ids, out, bits, group_size)


def pack_for_transfer_impl(kp, ks, km, vp, vs, vm, block_ids, out, bits, group_size) -> None:
    """Body of ``thunderkv::pack_for_transfer``."""
    paged._pack(_cache(kp, ks, km, vp, vs, vm, bits, group_size), block_ids, out)


@pack_for_transfer.register_fake
def _(kp, ks, km, vp, vs, vm, block_ids, out, bits, group_size) -> None:
    cache = _cache(kp, ks, km, vp, vs, vm, bits, group_size)
    if out.numel() != paged.transfer_nbytes(cache, block_ids.numel()):
        raise ValueError("out must hold exactly the packed blocks")


@torch.library.custom_op("thunderkv::unpack_from_transfer", mutates_args=_CACHE,
                         device_types=_DEVICES)
def unpack_from_transfer(buffer: torch.Tensor, block_ids: torch.Tensor, key_packed: torch.Tensor,
                         key_scale: torch.Tensor, key_min: torch.Tensor,
                         value_packed: torch.Tensor, value_scale: torch.Tensor,
                         value_min: torch.Tensor, bits: int, group_size: int) -> None:
    unpack_from_transfer_impl(buffer, block_ids, key_packed, key_scale, key_min, value_packed,
                              value_scale, value_min, bits, group_size)


def unpack_from_transfer_impl(buffer, block_ids, kp, ks, km, vp, vs, vm, bits, group_size
                              ) -> None:
    """Body of ``thunderkv::unpack_from_transfer``."""
    paged._unpack(buffer, _cache(kp, ks, km, vp, vs, vm, bits, group_size), block_ids)


@unpack_from_transfer.register_fake
def _(buffer, block_ids, kp, ks, km, vp, vs, vm, bits, group_size) -> None:
    cache = _cache(kp, ks, km, vp, vs, vm, bits, group_size)
    if buffer.numel() != paged.transfer_nbytes(cache, block_ids.numel()):
        raise ValueError("buffer must hold exactly the packed blocks")
