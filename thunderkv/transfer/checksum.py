"""CRC-32C (Castagnoli), the checksum of the transfer wire format.

CRC-32C rather than zlib's CRC-32 because x86 (SSE 4.2) and ARMv8 compute it in hardware: the
compiled extension checks a multi-GiB/s stream without becoming the bottleneck. Parameters: the
reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF (``crc32c(b"123456789")
== 0xE3069283``). ``seed`` continues a running checksum: ``crc32c(b, crc32c(a)) == crc32c(a + b)``.

:func:`crc32c` uses ``thunderkv._C.crc32c`` when the extension is built and this pure-Python
table version otherwise (slow: tests and tiny messages only). A contiguous CUDA tensor is
checksummed on its GPU (``thunderkv._C.cuda_crc32c``, on torch's current stream) when the
extension has CUDA kernels, so a GPU-resident payload needs no host copy; otherwise it is
copied to the host first.
"""

from __future__ import annotations

from typing import Any

from .._extension import load_extension

_POLY = 0x82F63B78


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_reference(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Bytewise table CRC-32C of ``data`` continuing from ``seed`` (the executable definition)."""
    crc = (seed ^ 0xFFFFFFFF) & 0xFFFFFFFF
    table = _TABLE
    for byte in memoryview(data).cast("B"):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _as_bytes_array(data: Any):
    """A zero-copy contiguous uint8 numpy view of a bytes-like, numpy array or CPU tensor."""
    import numpy as np

    if hasattr(data, "data_ptr"):  # torch.Tensor
        if data.device.type != "cpu" or not data.is_contiguous():
            raise ValueError("crc32c needs a contiguous CPU tensor")
        import torch

        return data.reshape(-1).view(torch.uint8).numpy()
    arr = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError("crc32c needs a contiguous buffer")
    return arr.reshape(-1).view(np.uint8)


def crc32c(data: Any, seed: int = 0, *, threads: int = 0) -> int:
    """CRC-32C of a contiguous buffer (bytes-like, numpy array, CPU or CUDA tensor), from
    ``seed``.

    ``threads``: OpenMP threads for large host buffers (0: OpenMP's default; 1 when the caller
    overlaps the checksum with work that needs the other cores, such as a PUT)."""
    if hasattr(data, "data_ptr") and data.device.type == "cuda":
        return _crc32c_cuda(data, seed)
    arr = _as_bytes_array(data)  # keeps ``data`` alive while C++ reads it
    ext = load_extension()
    if ext is None or not hasattr(ext, "crc32c"):
        return crc32c_reference(arr.tobytes(), seed)
    return ext.crc32c(arr.ctypes.data, arr.nbytes, seed & 0xFFFFFFFF, threads)


def _crc32c_cuda(data, seed: int) -> int:
    """On the tensor's GPU when the extension has CUDA kernels, else through a host copy."""
    if not data.is_contiguous():
        raise ValueError("crc32c needs a contiguous tensor")
    ext = load_extension()
    if ext is None or not getattr(ext, "has_cuda", False):
        return crc32c(data.cpu(), seed)
    from ..backends.cuda_backend import cuda_launch

    with cuda_launch(data) as (index, stream):
        return ext.cuda_crc32c(data.data_ptr(), data.numel() * data.element_size(),
                               seed & 0xFFFFFFFF, index, stream)


def crc32c_running(data: Any, block_nbytes: int, count: int, seed: int = 0, *,
                   threads: int = 0) -> list[int]:
    """Running CRC-32C at the end of each of ``count`` consecutive ``block_nbytes`` blocks of
    ``data`` (``[crc32c(blocks 0..i, seed) for i in range(count)]``). On the host with the
    extension the blocks are checksummed in parallel (``threads``; 0: OpenMP's default)."""
    if block_nbytes < 0 or count < 0:
        raise ValueError("block_nbytes and count must be >= 0")
    on_gpu = hasattr(data, "data_ptr") and data.device.type == "cuda"
    ext = load_extension()
    if not on_gpu and ext is not None and hasattr(ext, "crc32c_running"):
        arr = _as_bytes_array(data)
        if arr.nbytes < block_nbytes * count:
            raise ValueError(f"{arr.nbytes} bytes hold fewer than {count} blocks of "
                             f"{block_nbytes}")
        return list(ext.crc32c_running(arr.ctypes.data, block_nbytes, count,
                                       seed & 0xFFFFFFFF, threads))
    out, crc = [], seed
    for i in range(count):
        crc = crc32c(data[i * block_nbytes:(i + 1) * block_nbytes], crc)
        out.append(crc)
    return out
