"""CRC-32C: the compiled versions (VPCLMULQDQ folding, 3-way crc32 instruction, threaded)
against the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from thunderkv._extension import load_extension
from thunderkv.transfer.checksum import crc32c, crc32c_reference, crc32c_running

ext = load_extension()


def test_reference_check_value():
    assert crc32c_reference(b"123456789") == 0xE3069283  # the CRC-32C catalogue check value
    assert crc32c_reference(b"") == 0


@pytest.mark.skipif(ext is None, reason="extension not built")
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 511, 512, 513, 767, 768, 775, 1023, 24575, 24576,
                               24577, 3 * 8192 * 3 + 5, 70001])
@pytest.mark.parametrize("misalign", [0, 3])
def test_compiled_matches_reference(gen, n, misalign):
    data = torch.randint(0, 256, (n + misalign,), dtype=torch.uint8, generator=gen)[misalign:]
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    assert crc32c(data, seed) == crc32c_reference(data.numpy().tobytes(), seed)


@pytest.mark.skipif(ext is None, reason="extension not built")
def test_threaded_split_and_chaining_agree(gen):
    data = torch.randint(0, 256, ((9 << 20) + 13,), dtype=torch.uint8, generator=gen).numpy()
    one = ext.crc32c(data.ctypes.data, data.nbytes, 0, 1)
    assert ext.crc32c(data.ctypes.data, data.nbytes, 0, 2) == one
    cut = 5_000_001
    assert crc32c(data[cut:], crc32c(data[:cut])) == one
    assert ext.crc32c_combine(crc32c(data[:cut]), crc32c(data[cut:]), data.nbytes - cut) == one


@pytest.mark.skipif(ext is None, reason="extension not built")
def test_shifts_past_512_mib_are_right():
    """Combining/chaining shifts a CRC past len_b zero bytes with x^(2^k) mod P; for CRC-32C
    x^(2^31) == x (period 31, not zlib's 32), so a table indexed with k & 31 went wrong from
    2^29 bytes on. Zero pages make the 1 GiB buffer cheap; the one-thread CRC uses no shifts
    that long, so it is the oracle."""
    big = (1 << 30) + 1000
    data = np.zeros(big, dtype=np.uint8)  # calloc'd: untouched pages stay shared zero pages
    data[:1000] = np.arange(1000) % 251
    data[-7:] = [1, 2, 3, 4, 5, 6, 7]
    one = crc32c(data, threads=1)
    cut = 1000 - 3  # len_b = 2^30 + 3 bytes = 2^33 + 24 bits: x^(2^3), x^(2^4), x^(2^33)
    assert ext.crc32c_combine(crc32c(data[:cut], threads=1), crc32c(data[cut:], threads=1),
                              big - cut) == one
    tail = (1 << 29) + 3  # 2^32 + 24 bits: x^(2^32), the first power k & 31 got wrong
    assert ext.crc32c_combine(crc32c(data[:big - tail], threads=1),
                              crc32c(data[big - tail:], threads=1), tail) == one
    assert crc32c(data, threads=2) == one  # halves of 512 MiB + 500 bytes
    block = big // 2
    assert crc32c_running(data, block, 2, threads=2) == [crc32c(data[:block], threads=1), one]


def test_inputs_of_every_kind_agree():
    payload = bytes(range(256)) * 5
    want = crc32c_reference(payload)
    assert crc32c(payload) == want
    assert crc32c(np.frombuffer(payload, dtype=np.uint8)) == want
    assert crc32c(torch.frombuffer(bytearray(payload), dtype=torch.uint8)) == want
    with pytest.raises(ValueError, match="contiguous"):
        crc32c(torch.zeros(64, dtype=torch.uint8)[::2])


_EVERY_PATH = """
import sys, numpy as np
from thunderkv._extension import load_extension
ext = load_extension()
rng = np.random.default_rng(int(sys.argv[1]))
data = rng.integers(0, 256, 1 << 18, dtype=np.uint8)
out = [ext.crc32c_implementation()]
for n in [512, 513, 700, 1000, 4096 + 255, 99999, 1 << 17]:
    off = int(rng.integers(0, 64))
    out.append(ext.crc32c(data.ctypes.data + off, n, int(rng.integers(0, 2**32)), 1))
print(*out)
"""


@pytest.mark.skipif(ext is None, reason="extension not built")
def test_folding_and_crc_instruction_paths_agree():
    """The VPCLMULQDQ path (where this CPU has it) and the 3-way crc32 path give the same CRCs;
    THUNDERKV_CRC_NO_FOLD=1 forces the latter in a fresh process."""
    seed = str(np.random.SeedSequence().entropy % 2**32)
    runs = {}
    for no_fold in ("", "1"):
        env = {**os.environ, "THUNDERKV_CRC_NO_FOLD": no_fold} if no_fold else {
            k: v for k, v in os.environ.items() if k != "THUNDERKV_CRC_NO_FOLD"}
        out = subprocess.run([sys.executable, "-c", _EVERY_PATH, seed], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        runs[no_fold] = out
    assert runs["1"][0] != "vpclmulqdq"
    assert runs[""][1:] == runs["1"][1:], f"seed {seed}"
    if ext.crc32c_implementation() == "vpclmulqdq":
        assert runs[""][0] == "vpclmulqdq"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or ext is None
                    or not getattr(ext, "has_cuda", False),
                    reason="needs a CUDA device and the extension's CUDA kernels")
@pytest.mark.parametrize("n", [0, 1, 7, 4095, 4096, 4097, (1 << 20) - 3, 1 << 20, (3 << 20) + 11])
@pytest.mark.parametrize("misalign", [0, 5])
def test_gpu_crc_matches_host(gen, n, misalign):
    """CRC-32C of a CUDA tensor on its GPU (block tree + host join) equals the host one,
    misaligned starts, partial chunks/blocks and seeds included."""
    full = torch.randint(0, 256, (n + misalign,), dtype=torch.uint8, generator=gen)
    data = full[misalign:]
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    want = crc32c(data, seed)
    on_gpu = full.cuda()[misalign:]  # misaligned on the device too (data.cuda() would realign)
    assert on_gpu.data_ptr() % 8 == misalign % 8
    assert crc32c(on_gpu, seed) == want
    assert crc32c(on_gpu[: n // 2], seed) == crc32c(data[: n // 2], seed)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block,count", [(0, 3), (1, 5), (4096 + 3, 7), (70001, 4), (1 << 18, 3)])
def test_running_crcs_of_blocks_match_chained_crcs(gen, block, count, threads):
    data = torch.randint(0, 256, (block * count + 5,), dtype=torch.uint8, generator=gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    want, crc = [], seed
    for i in range(count):
        crc = crc32c_reference(data[i * block:(i + 1) * block].numpy().tobytes(), crc)
        want.append(crc)
    assert crc32c_running(data, block, count, seed, threads=threads) == want
    with pytest.raises(ValueError, match="fewer than"):
        crc32c_running(data[:block * count - 1] if block else data[:0], max(block, 1),
                       count + 1, seed)
