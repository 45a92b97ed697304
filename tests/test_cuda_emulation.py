"""The CUDA kernels' thread bodies, run on the CPU and compared with the reference bit for bit.

``csrc/cuda/quant_threads.cuh`` holds what one thread does in every format v1 CUDA kernel:
per-token (vectorized, lanes sharing a group; scalar) with and without paged slots, and
per-channel (vectorized two-pass; register-resident; scalar). ``tests/cuda_emulation/emulate.cu`` (built by nvcc as host
code) runs every thread of a launch in turn, choosing the kernel the way ``quant_cuda.cu``
does, so the kernels' index math, loads, code words and rounding are checked on every CI run,
not only when a GPU is lent. What it cannot see: the memory model, races, the xor shuffles
themselves (the lanes' partial min/max merge in lane order here) and device-side float
intrinsics (PTX checked in ``test_cuda_ptx.py``: ``div.rn``, ``rcp.rn``, no FMA in quantize);
``test_cuda_backend.py`` covers those on a GPU. The transfer layer's device CRC-32C
(``crc32c_threads.cuh``) runs here the same way: every thread's chunk, the in-block tree join
stride by stride, the host's join.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import DTYPES, bits_equal, random_kv, same_values

from thunderkv import reference
from thunderkv.backends import ZERO_ROW
from thunderkv.format import DTYPE_CODES, FormatSpec

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cuda_emulation" / "emulate.cu"
INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


SANITIZE = ["-Xcompiler=-fsanitize=address", "-Xcompiler=-fsanitize=undefined",
            "-Xcompiler=-fno-sanitize-recover=undefined", "-Xcompiler=-fno-omit-frame-pointer",
            "-lasan", "-lubsan"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """The emulator, built with AddressSanitizer + UBSan where the host compiler has them (an
    out-of-bounds access in a thread body then fails the test, as compute-sanitizer would on
    a GPU); a plain build otherwise."""
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the emulated CUDA threads need it to build")
    work = tmp_path_factory.mktemp("emulate")
    exe = work / "emulate"
    base = ["nvcc", "-std=c++17", "-O1", "-Xcompiler", "-ffp-contract=off",
            "-I", str(ROOT / "csrc" / "cuda"), str(SOURCE), "-o", str(exe)]
    one_byte = work / "one"
    one_byte.write_bytes(b"\x00")

    def runs() -> bool:  # a sanitizer runtime can build yet refuse to start (LD_PRELOAD, ...)
        done = subprocess.run([str(exe), "crc", str(one_byte), "1", "0"], capture_output=True,
                              text=True)
        return done.returncode == 0 and done.stdout.strip() == "1383945041"  # crc32c(b"\0")

    if subprocess.run(base + SANITIZE, capture_output=True, text=True).returncode != 0 \
            or not runs():
        subprocess.run(base, check=True, capture_output=True, text=True)
    return exe


def _save(t: torch.Tensor, path: Path) -> str:
    t = t.contiguous()
    (t.view(INT_OF[t.dtype]) if t.dtype in INT_OF else t).numpy().tofile(path)
    return str(path)


def _load(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).view(dtype).reshape(shape)


def _run(emulator: Path, args: list, offsets: tuple[int, int] = (0, 0)) -> str:
    env = dict(os.environ, VALUES_OFFSET=str(offsets[0]), PACKED_OFFSET=str(offsets[1]))
    done = subprocess.run([str(emulator), *map(str, args)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _per_channel_input(R: int, T: int, D: int, dtype, gen) -> torch.Tensor:
    """x [R, T, D] whose per-channel groups (runs along T) carry random_kv's awkward rows."""
    return random_kv((R, D, T), dtype, gen).transpose(-1, -2).contiguous()


# (bits, G, D, expected kernel per dtype): the vectorized kernel needs D % (16 / itemsize) == 0
# and a group's code bytes G*b/8 a multiple of 16 (vec4) or 4 (vec1).
CASES = [
    (4, 64, 24, "cols-vec4"),   # 32 code bytes per group
    (4, 32, 16, "cols-vec4"),   # 16
    (2, 64, 8, "cols-vec4"),    # 16
    (8, 128, 40, "cols-vec4"),  # 128
    (2, 32, 16, "cols-vec1"),   # 8
    (4, 8, 32, "cols-vec1"),    # 4
    (8, 4, 8, "cols-vec1"),     # 4
    (2, 8, 16, "cols-scalar"),  # 2 code bytes: no whole word
    (4, 64, 12, None),          # D = 12: vec only for float32 (4 values per vector)
    (4, 32, 9, "cols-scalar"),  # D = 9: no vector kernel; the register kernel for float32
]


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _regs_kernel(dtype, bits: int, G: int, D: int) -> str | None:
    """THUNDERKV_CUDA_COLS=regs: the register-resident quantize when G is 32 or 64, D whole
    4-byte words and a group's code bytes whole 4- or 16-byte words; else None."""
    code_bytes = G * bits // 8
    words = 4 if code_bytes % 16 == 0 else 1 if code_bytes % 4 == 0 else 0
    if G in (32, 64) and D % (4 // _itemsize(dtype)) == 0 and words:
        return f"cols-regs{words}"
    return None


def _expected_kernel(kind: str | None, dtype, D: int) -> str:
    if kind is None:
        return "cols-vec4" if D % (16 // _itemsize(dtype)) == 0 else "cols-scalar"
    return kind


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,G,D,kind", CASES)
@pytest.mark.parametrize("variant", ["cols", "cols-scalar", "cols-regs"])
def test_per_channel_quantize_threads_match_reference(emulator, tmp_path, dtype, bits, G, D, kind,
                                                      variant, gen):
    R, T = 3, 2 * G
    x = _per_channel_input(R, T, D, dtype, gen)
    spec = FormatSpec(bits, G, axis=-2)
    want = reference.quantize(x, spec)
    files = [tmp_path / n for n in ("packed", "scale", "min")]
    ran = _run(emulator, ["quantize", DTYPE_CODES[dtype], bits, G, R, T, D, variant,
                          _save(x, tmp_path / "x"), *files])
    expect = {"cols": _expected_kernel(kind, dtype, D), "cols-scalar": "cols-scalar",
              "cols-regs": _regs_kernel(dtype, bits, G, D) or _expected_kernel(kind, dtype, D)}
    assert ran == expect[variant]
    got = (_load(files[0], torch.uint8, want[0].shape), _load(files[1], dtype, want[1].shape),
           _load(files[2], dtype, want[2].shape))
    for name, g, w in zip(("packed", "scale", "minimum"), got, want):
        assert bits_equal(g, w), f"{name} differs ({ran})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,G,D,kind", CASES)
@pytest.mark.parametrize("variant", ["cols", "cols-scalar"])
def test_per_channel_dequantize_threads_match_reference(emulator, tmp_path, dtype, bits, G, D,
                                                        kind, variant, gen):
    R, T = 2, 3 * G
    spec = FormatSpec(bits, G, axis=-2)
    _, scale, minimum = reference.quantize(_per_channel_input(R, T, D, dtype, gen), spec)
    # every code pattern, not only those a quantize produces
    packed = torch.randint(0, 256, (R, D, T * bits // 8), generator=gen, dtype=torch.uint8)
    want = reference.dequantize(packed, scale, minimum, spec)
    y = tmp_path / "y"
    ran = _run(emulator, ["dequantize", DTYPE_CODES[dtype], bits, G, R, T, D, variant,
                          _save(packed, tmp_path / "p"), _save(scale, tmp_path / "s"),
                          _save(minimum, tmp_path / "m"), y])
    assert ran == (_expected_kernel(kind, dtype, D) if variant == "cols" else "cols-scalar")
    assert same_values(_load(y, dtype, want.shape), want), ran


@pytest.mark.parametrize("offsets,kind", [((8, 0), "cols-scalar"), ((0, 4), "cols-vec1"),
                                          ((0, 2), "cols-scalar"), ((16, 16), "cols-vec4")])
def test_misaligned_buffers_take_a_kernel_that_fits(emulator, tmp_path, offsets, kind, gen):
    """Values not 16-byte aligned -> scalar; packed only 4-byte aligned -> 4-byte code stores."""
    dtype, bits, G, D, R = torch.float16, 4, 64, 16, 2
    x = _per_channel_input(R, G, D, dtype, gen)
    spec = FormatSpec(bits, G, axis=-2)
    want = reference.quantize(x, spec)
    files = [tmp_path / n for n in ("packed", "scale", "min")]
    ran = _run(emulator, ["quantize", 0, bits, G, R, G, D, "cols", _save(x, tmp_path / "x"),
                          *files], offsets)
    assert ran == kind
    assert bits_equal(_load(files[0], torch.uint8, want[0].shape), want[0])
    assert bits_equal(_load(files[1], dtype, want[1].shape), want[1])


def _rows_kernel(variant: str, dtype, G: int) -> str:
    """What the per-token launch picks: the lane-sharing vector kernels when a group is whole
    16-byte vectors (aligned buffers), else one thread per group."""
    whole = G % (16 // torch.empty((), dtype=dtype).element_size()) == 0
    return "rows-vec" if variant == "rows" and whole else "rows-scalar"


ROW_CASES = [(4, 32), (2, 64), (8, 8), (4, 512), (4, 6), (2, 4), (8, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,G", ROW_CASES)
@pytest.mark.parametrize("variant", ["rows", "rows-scalar"])
def test_per_token_threads_match_reference(emulator, tmp_path, dtype, bits, G, variant, gen):
    """Dense per-token quantize/dequantize. The vector kernels' lanes exchange min/max by xor
    shuffles on the GPU; here the lanes' partial results merge in lane order (min, max and or
    are order-free, so the bits are the same) -- what it checks is each lane's share of the
    loads, the group finish and the code words."""
    N, D = 11, 3 * G
    x = random_kv((N, D), dtype, gen)
    spec = FormatSpec(bits, G)
    want = reference.quantize(x, spec)
    files = [tmp_path / n for n in ("packed", "scale", "min")]
    ran = _run(emulator, ["quantize", DTYPE_CODES[dtype], bits, G, 1, N, D, variant,
                          _save(x, tmp_path / "x"), *files])
    assert ran == _rows_kernel(variant, dtype, G)
    for f, w, dt in zip(files, want, (torch.uint8, dtype, dtype)):
        assert bits_equal(_load(f, dt, w.shape), w), f"{f.name} differs ({ran})"
    packed = torch.randint(0, 256, want[0].shape, generator=gen, dtype=torch.uint8)
    y = tmp_path / "y"
    ran = _run(emulator, ["dequantize", DTYPE_CODES[dtype], bits, G, 1, N, D, variant,
                          _save(packed, tmp_path / "p"), _save(want[1], tmp_path / "s"),
                          _save(want[2], tmp_path / "m"), y])
    assert ran == _rows_kernel(variant, dtype, G)
    assert same_values(_load(y, dtype, x.shape),
                       reference.dequantize(packed, want[1], want[2], spec)), ran


@pytest.mark.parametrize("offsets,kind", [((0, 0), "rows-vec"), ((8, 0), "rows-scalar"),
                                          ((0, 2), "rows-scalar"), ((0, 4), "rows-vec")])
def test_per_token_misaligned_buffers_take_the_scalar_kernels(emulator, tmp_path, offsets, kind,
                                                               gen):
    """fp16 at 4 bits: a vector's codes are one 4-byte word, so packed needs 4-byte alignment
    and the values 16-byte alignment for the vector kernels."""
    dtype, bits, G, N, D = torch.float16, 4, 64, 5, 128
    x = random_kv((N, D), dtype, gen)
    spec = FormatSpec(bits, G)
    want = reference.quantize(x, spec)
    files = [tmp_path / n for n in ("packed", "scale", "min")]
    ran = _run(emulator, ["quantize", 0, bits, G, 1, N, D, "rows", _save(x, tmp_path / "x"),
                          *files], offsets)
    assert ran == kind
    assert bits_equal(_load(files[0], torch.uint8, want[0].shape), want[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,G", [(4, 32), (2, 64), (8, 8), (4, 6)])
@pytest.mark.parametrize("variant", ["rows", "rows-scalar"])
def test_per_token_threads_write_and_read_paged_slots(emulator, tmp_path, dtype, bits, G,
                                                      variant, gen):
    """The per-token kernels with paged slots: row t's groups go to (quantize) or come from
    (dequantize) row slots[t]; -1 skips, and so does a slot past the cache (only CUDA-graph
    capture lets one through unchecked); ZERO_ROW skips a quantized row and zeroes a
    dequantized one (a gather past a sequence's end)."""
    N, D, capacity = 9, 2 * G, 13
    x = random_kv((N, D), dtype, gen)
    slots = torch.randperm(capacity, generator=gen)[:N].to(torch.int64)
    slots[[2, 5]] = -1
    slots[4] = ZERO_ROW
    slots[7], slots[8] = capacity, capacity + 1000
    spec = FormatSpec(bits, G)
    # quantize into slots of a cache that starts with other rows' data
    old_packed, old_scale, old_min = reference.quantize(random_kv((capacity, D), dtype, gen), spec)
    files = [tmp_path / n for n in ("packed", "scale", "min")]
    for f, t in zip(files, (old_packed, old_scale, old_min)):
        _save(t, f)
    ran = _run(emulator, ["quantize", DTYPE_CODES[dtype], bits, G, 1, N, D, variant,
                          _save(x, tmp_path / "x"), *files, _save(slots, tmp_path / "slots"),
                          capacity])
    assert ran == _rows_kernel(variant, dtype, G)
    new = reference.quantize(x, spec)
    keep = (slots >= 0) & (slots < capacity)
    for f, old, fresh, dt in zip(files, (old_packed, old_scale, old_min), new,
                                 (torch.uint8, dtype, dtype)):
        want = old.clone()
        want[slots[keep]] = fresh[keep]
        assert bits_equal(_load(f, dt, want.shape), want), f.name
    # dequantize rows back out of the slots; skipped rows keep what y held
    y0 = random_kv((N, D), dtype, gen, specials=False)
    y = tmp_path / "y"
    _save(y0, y)
    cache = [_load(f, dt, t.shape) for f, dt, t in zip(files, (torch.uint8, dtype, dtype),
                                                          (old_packed, old_scale, old_min))]
    ran = _run(emulator, ["dequantize", DTYPE_CODES[dtype], bits, G, 1, N, D, variant,
                          *[_save(t, tmp_path / f"c{i}") for i, t in enumerate(cache)], y,
                          _save(slots, tmp_path / "slots"), capacity])
    assert ran == _rows_kernel(variant, dtype, G)
    want = y0.clone()
    want[keep] = reference.dequantize(*(t[slots[keep]] for t in cache), spec)
    want[slots == ZERO_ROW] = 0
    got = _load(y, dtype, want.shape)
    assert same_values(got, want)
    assert bits_equal(got[slots == ZERO_ROW], torch.zeros_like(got[slots == ZERO_ROW]))  # +0.0


@pytest.mark.parametrize("nbytes", [1, 7, 8, 511, 512, 513, 4096 + 3, 128 * 1024,
                                    128 * 1024 + 1, 3 * 1024 * 1024 + 11])
@pytest.mark.parametrize("offset", [0, 3])
def test_device_crc_threads_and_joins_match_crc32c(emulator, tmp_path, nbytes, offset, gen):
    """The transfer layer's device CRC-32C (crc32c_cuda.cu): 512-byte chunks per thread, the
    in-block tree join, the host's join of the blocks, from a seed; sizes around the chunk and
    the 128 KiB block, buffers off 8-byte alignment (the byte-wise head)."""
    from thunderkv.transfer.checksum import crc32c

    data = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
    path = _save(data, tmp_path / "data")
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    for s in (0, seed):
        got = _run(emulator, ["crc", path, nbytes, s], (offset, 0))
        assert int(got) == crc32c(data.numpy(), s), (nbytes, offset, s)
