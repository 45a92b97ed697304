"""What the CUDA kernels compile to, checked without a GPU (nvcc -ptx for sm_90).

Bit-exactness needs round-to-nearest division and reciprocal and no FMA in quantize (an FMA
contraction of (x - min) * r changes codes); speed needs the 16-byte vector loads and stores
and the warp-fraction shuffles. A GPU run checks the values; this checks the instructions on
every CI run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "quant_cuda.cu"


@pytest.fixture(scope="module")
def entries(tmp_path_factory) -> dict[str, str]:
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    out = tmp_path_factory.mktemp("ptx") / "quant.ptx"
    subprocess.run(["nvcc", "-std=c++17", "-O3", "--fmad=false", "-arch=sm_90", "-ptx",
                    str(SOURCE), "-o", str(out)], check=True, capture_output=True, text=True)
    bodies = re.split(r"\.entry ", out.read_text())[1:]
    return {body.split("(", 1)[0]: body for body in bodies}


def _kernels(entries: dict[str, str], kind: str, variant: str) -> dict[str, str]:
    """Entries of ``kind`` (quantize/dequantize) and ``variant`` ("vec", "cols", "cols_vec" or
    "" = scalar)."""
    tag = f"{kind}_{variant}_kernel" if variant else f"{kind}_kernel"
    return {name: body for name, body in entries.items()
            if tag in name and not (kind == "quantize" and "dequantize" in name)}


def test_every_dtype_and_width_has_its_kernels(entries):
    for kind in ("quantize", "dequantize"):
        assert len(_kernels(entries, kind, "vec")) == 9  # 3 dtypes x bits 2/4/8
        assert len(_kernels(entries, kind, "")) == 3  # scalar fallback, per dtype
        assert len(_kernels(entries, kind, "cols")) == 3  # per-channel, strided, per dtype
        # vectorized per-channel: 3 dtypes x bits 2/4/8 x 16- or 4-byte code words
        assert len(_kernels(entries, kind, "cols_vec")) == 18
    # register-resident per-channel quantize: 3 dtypes x the 11 (bits, G in {32, 64}, words)
    # combinations whose groups are whole store words
    assert len(_kernels(entries, "quantize", "cols_reg")) == 33


def test_quantize_rounds_exactly_and_never_fuses(entries):
    for variant in ("vec", "", "cols", "cols_vec", "cols_reg"):
        for name, body in _kernels(entries, "quantize", variant).items():
            assert "div.rn.f32" in body and "rcp.rn.f32" in body, name
            assert not re.search(r"\bfma\.|approx", body), name
    for variant in ("vec", "", "cols", "cols_vec"):
        for name, body in _kernels(entries, "dequantize", variant).items():
            assert "fma.rn.f32" in body and "approx" not in body, name


def test_vectorized_kernels_move_16_bytes_per_access(entries):
    for name, body in _kernels(entries, "quantize", "vec").items():
        assert re.search(r"ld\.global(\.nc)?\.v4\.[bfu]32", body), name
        assert "shfl.sync.bfly" in body, name  # min/max meet across the group's lanes
    for name, body in _kernels(entries, "dequantize", "vec").items():
        assert re.search(r"st\.global\.v4\.[bfu]32", body), name


def test_vectorized_per_channel_kernels_move_16_byte_rows_and_whole_code_words(entries):
    """One 16-byte load (quantize) or store (dequantize) per token row and thread; codes in
    16-byte words (``Li4EE``: WORDS = 4) or 4-byte words, never byte by byte."""
    for kind, row_op, code_op in (("quantize", r"ld\.global(\.nc)?", r"st\.global"),
                                  ("dequantize", r"st\.global", r"ld\.global(\.nc)?")):
        for name, body in _kernels(entries, kind, "cols_vec").items():
            assert re.search(row_op + r"\.v4\.[bfu]32", body), name
            words4 = "ELi4EE" in name
            code = code_op + (r"\.v4\.[bu]32" if words4 else r"\.[bu]32")
            assert re.search(code, body), name
            assert not re.search(code_op + r"\.[bu]8", body), name


def test_register_per_channel_quantize_reads_words_once_and_stores_whole_code_words(entries):
    """THUNDERKV_CUDA_COLS=regs: every row is one 4-byte load, G of them per thread (read once),
    no local-memory spill of the held rows, codes never stored a byte at a time."""
    for name, body in _kernels(entries, "quantize", "cols_reg").items():
        G = int(re.search(r"Li(32|64)E", name).group(1))
        loads = re.findall(r"ld\.global(?:\.nc)?\.(v2\.[bu]16|[bfu]32)\b", body)  # 4 bytes each
        assert len(loads) == G, name
        assert not re.search(r"ld\.global(\.nc)?\.(v4|v2\.[bfu]32)", body), name
        assert "ld.local" not in body and "st.local" not in body, name
        assert not re.search(r"st\.global\.[bu]8", body), name
