"""The compiled extension: what got built, and that it loads without a GPU or CUDA libraries."""

from __future__ import annotations

import os
import shutil

import pytest

from thunderkv._extension import extension_error, load_extension


def test_extension_loads():
    assert load_extension() is not None, extension_error()


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("THUNDERKV_CUDA") == "OFF",
                    reason="no nvcc on PATH (or THUNDERKV_CUDA=OFF): CUDA kernels not expected")
def test_cuda_kernels_were_compiled_where_nvcc_exists():
    # With THUNDERKV_CUDA=AUTO a broken CUDA toolchain would silently drop the kernels; CI has
    # nvcc, so this is where a CUDA compile problem must show up.
    info = load_extension().build_info()
    assert info["cuda"] is True, info.get("cuda_why_not")
    assert set(info["cuda_architectures"].split(",")) >= {"80", "90"}


def test_cpu_variants_usable_here_include_the_compiled_best():
    ext = load_extension()
    usable = ext.cpu_variants()
    assert usable[0] == "generic"
    assert ext.cpu_variant() == (os.environ.get("THUNDERKV_CPU_ISA") or usable[-1])
    with pytest.raises(ValueError, match="not usable here"):
        ext.set_cpu_variant("sse1")


def test_cuda_calls_without_a_driver_report_instead_of_crashing():
    ext = load_extension()
    if not ext.has_cuda:
        pytest.skip("built without CUDA")
    count, why = ext.cuda_device_count()
    assert (count > 0) or (count == -1 and why)


def test_cuda_row_launch_arguments_are_checked_before_any_cuda_call():
    """The slot bound the paged row kernels use comes from the caller: with row indices, a
    missing (0) slot_rows would make them drop every row silently, so the binding refuses it,
    like the other layout errors, before touching CUDA (this runs without a GPU)."""
    ext = load_extension()
    if not ext.has_cuda:
        pytest.skip("built without CUDA")
    fake = 0x1000  # never dereferenced: the checks run first
    with pytest.raises(ValueError, match="slot_rows"):
        ext.cuda_quantize(fake, fake, fake, fake, 8, 32, 4, 0, 0, 0, 0, 0, fake, 2)
    with pytest.raises(ValueError, match="slot_rows"):
        ext.cuda_dequantize(fake, fake, fake, fake, 8, 32, 4, 0, 0, 0, 0, 0, fake, 2, 0)
    with pytest.raises(ValueError, match="per-token layout"):
        ext.cuda_quantize(fake, fake, fake, fake, 8, 32, 4, 0, 0, 0, 64, 4, fake, 2, 16)
