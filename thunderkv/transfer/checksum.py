"""CRC-32C (Castagnoli), the checksum of the transfer wire format.

CRC-32C rather than zlib's CRC-32 because x86 (SSE 4.2) and ARMv8 compute it in hardware: the
compiled extension checks a multi-GiB/s stream without becoming the bottleneck. Parameters: the
reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF (``crc32c(b"123456789")
== 0xE3069283``). ``seed`` continues a running checksum: ``crc32c(b, crc32c(a)) == crc32c(a + b)``.

:func:`crc32c` uses ``thunderkv._C.crc32c`` when the extension is built and this pure-Python
table version otherwise (slow: tests and tiny messages only).
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


def _address(data: Any) -> tuple[int, int]:
    """(address, nbytes) of a contiguous buffer: bytes-like, numpy array or CPU torch tensor."""
    if hasattr(data, "data_ptr"):  # torch.Tensor
        if data.device.type != "cpu" or not data.is_contiguous():
            raise ValueError("crc32c needs a contiguous CPU tensor")
        return data.data_ptr(), data.numel() * data.element_size()
    import numpy as np

    arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if not arr.flags.c_contiguous:
        raise ValueError("crc32c needs a contiguous buffer")
    return arr.ctypes.data, arr.nbytes


def crc32c(data: Any, seed: int = 0) -> int:
    """CRC-32C of a contiguous buffer (bytes-like, numpy array or CPU tensor), from ``seed``."""
    ext = load_extension()
    if ext is None or not hasattr(ext, "crc32c"):
        if hasattr(data, "data_ptr"):
            data = data.contiguous().view(-1).view(__import__("torch").uint8).numpy()
        return crc32c_reference(memoryview(data).cast("B") if not hasattr(data, "tobytes")
                                else data.tobytes(), seed)
    if isinstance(data, bytes):  # keep the object alive while C++ reads it
        if not data:
            return seed & 0xFFFFFFFF
        import numpy as np

        data = np.frombuffer(data, dtype=np.uint8)
    addr, nbytes = _address(data)
    return ext.crc32c(addr, nbytes, seed & 0xFFFFFFFF)
