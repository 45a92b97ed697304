"""Registered buffer pools: memory mapped once with UCX and carved into per-request slices.

A sender's pool holds the packed KV that quantize kernels write straight into; a receiver's
pool is the target of the sender's PUTs, and dequantize reads straight from it. Both are plain
uint8 torch tensors (host, or CUDA when the device is a GPU), so callers get zero-copy views.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import torch

from ._args import int_arg
from .errors import RequestRejected, TransferError, TransferUnavailable
from .ucx import load_ucx, ucx_call, ucx_unavailable_reason

ALIGN = 256


class PoolFull(RequestRejected):
    """No free slice large enough right now (retry after releasing, or use a larger pool)."""


@dataclass(frozen=True, slots=True)
class Slice:
    """``nbytes`` bytes at ``offset`` of a pool; ``view`` is a zero-copy uint8 tensor of them."""

    offset: int
    nbytes: int
    view: torch.Tensor


class BufferPool:
    """``nbytes`` of registered memory on ``device`` with a first-fit allocator.

    Parameters
    ----------
    worker : the ``_ucx.Worker`` that registers the memory (one per process side).
    nbytes : pool size in bytes (an int > 0; need not be a multiple of 256).
    device : "cpu" or a CUDA device (CUDA needs a UCX built with CUDA support).

    A wrong ``nbytes`` or ``device`` raises TypeError / ValueError; memory that cannot be
    allocated or registered raises TransferError.
    """

    def __init__(self, worker, nbytes: int, device: torch.device | str = "cpu") -> None:
        if load_ucx() is None:
            raise TransferUnavailable(f"UCX transfer unavailable: {ucx_unavailable_reason()}")
        nbytes = pool_size_arg(nbytes)
        self.device = pool_device_arg(device)
        try:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except (RuntimeError, MemoryError, AssertionError) as exc:  # torch: out of memory,
            # or no CUDA in this build (an AssertionError), or no such GPU
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = "; use a smaller pool" if _out_of_memory(exc) else ""
            raise TransferError(f"cannot allocate a {nbytes}-byte pool on {self.device} ({why})"
                                f"{hint}") from None
        if self.device.type == "cpu":
            self.tensor.zero_()  # touch the pages now, not during the first transfer
        self.region = ucx_call(worker.register_memory, self.tensor.data_ptr(), nbytes)
        self.nbytes = nbytes
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # sorted (offset, size)
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def address(self) -> int:
        return self.tensor.data_ptr()

    @property
    def memory_type(self) -> str:
        return self.region.memory_type

    def allocate(self, nbytes: int) -> Slice:
        """A free slice of ``nbytes`` (starting at a multiple of 256 bytes); raise PoolFull if
        none fits. Any ``nbytes`` up to the pool's size fits an empty pool: a slice ending at
        the pool's end is not rounded up. TypeError / ValueError for a size that is not an int
        >= 0 (the pool is left unchanged)."""
        nbytes = int_arg(nbytes, "nbytes")
        if nbytes == 0:  # takes no space; release() of it is a no-op
            return Slice(0, 0, self.tensor[:0])
        if nbytes > self.nbytes:
            raise PoolFull(f"{nbytes} bytes can never fit the {self.nbytes}-byte pool")
        size = -(-nbytes // ALIGN) * ALIGN
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                # the free block at the pool's end may be shorter than a whole ALIGN unit
                take = min(size, free) if off + free == self.nbytes else size
                if nbytes <= free and take <= free:
                    if free == take:
                        del self._free[i]
                    else:
                        self._free[i] = (off + take, free - take)
                    self._used[off] = take
                    return Slice(off, nbytes, self.tensor[off:off + nbytes])
        raise PoolFull(f"no free {nbytes}-byte slice in the {self.nbytes}-byte pool "
                       f"({self.free_bytes()} bytes free, fragmented or in use)")

    def release(self, piece: Slice) -> None:
        """Return ``piece`` to the pool (merging free neighbours)."""
        if piece.nbytes == 0:
            return
        offset = piece.offset
        with self._lock:
            size = self._used.pop(offset, None)
            if size is None:
                raise ValueError(f"no allocated slice at offset {offset}")
            i = bisect.bisect(self._free, (offset, 0))
            self._free.insert(i, (offset, size))
            # merge with the next, then the previous neighbour
            if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
                self._free[i] = (offset, size + self._free.pop(i + 1)[1])
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
                prev_off, prev_size = self._free[i - 1]
                self._free[i - 1] = (prev_off, prev_size + self._free.pop(i)[1])

    def free_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._free)

    def close(self) -> None:
        self.region.release()


def _out_of_memory(exc: BaseException) -> bool:
    """Whether torch failed to allocate for want of memory (a smaller pool may fit), rather
    than for want of the device (no CUDA in this build, no such GPU)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "allocate" in text or "out of memory" in text


def pool_size_arg(nbytes, name: str = "pool size") -> int:
    """A pool size: an int > 0 (TypeError / ValueError otherwise)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"{name} must be an int number of bytes, got {type(nbytes).__name__}")
    if nbytes <= 0:
        raise ValueError(f"{name} must be a positive number of bytes, got {nbytes!r}")
    return nbytes


def pool_device_arg(device) -> torch.device:
    """``device`` as a torch.device where a pool can live: the CPU or a CUDA GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r} ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
    return dev
