"""Bytes per KV-cache element, uncompressed or in ThunderKV format v1 (DESIGN.md)."""

from __future__ import annotations

VALID_BITS = (2, 4, 8, 16)


def kv_bytes_per_element(bits: int = 16, group_size: int = 64, dtype_bytes: int = 2) -> float:
    """Bytes one KV element occupies on the wire.

    Parameters
    ----------
    bits : 2, 4 or 8 for format v1 (packed codes plus a ``dtype`` scale and minimum per group of
        ``group_size`` elements); 16 means uncompressed ``dtype_bytes`` per element.
    group_size : format v1 group size G (ignored for bits=16); ``G * bits % 8 == 0`` is required.
    dtype_bytes : bytes of the cache dtype (2 for fp16/bf16, 4 for fp32).

    Returns
    -------
    ``bits/8 + 2*dtype_bytes/G`` for format v1, ``dtype_bytes`` for bits=16.
    4-bit, G=64, fp16 gives 0.5625 B (3.56x smaller than 2 B).
    """
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits}")
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 or 4, got {dtype_bytes}")
    if bits == 16:
        return float(dtype_bytes)
    if group_size <= 0 or (group_size * bits) % 8:
        raise ValueError(f"group_size must be > 0 with group_size*bits % 8 == 0, got {group_size}")
    return bits / 8 + 2 * dtype_bytes / group_size


def compression_ratio(bits: int, group_size: int = 64, dtype_bytes: int = 2) -> float:
    """Uncompressed bytes divided by format-v1 bytes (1.0 for bits=16)."""
    return dtype_bytes / kv_bytes_per_element(bits, group_size, dtype_bytes)
