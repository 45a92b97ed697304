"""What this installation can do, and why not where it cannot (``thunderkv env``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
from pathlib import Path

# Environment variables that change which kernels run (reported by ``thunderkv env`` and in
# every benchmark row's provenance, so an A/B of kernel variants is never ambiguous).
KERNEL_ENV = ("THUNDERKV_CPU_ISA", "THUNDERKV_CUDA_SCALAR", "THUNDERKV_CUDA_COLS",
              "TRITON_INTERPRET", "OMP_NUM_THREADS")


def kernel_env() -> dict[str, str]:
    """The :data:`KERNEL_ENV` variables set in this process."""
    return {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}


CPU_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512dq", "avx512_bf16", "avx512_fp16", "amx_tile")


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # a broken install is worth reporting, not crashing on
        return f"broken ({type(exc).__name__}: {exc})"


def collect() -> dict:
    """A JSON-able report: versions, CPU, compiled extension, and each backend's status."""
    import torch

    import thunderkv
    from thunderkv import backends
    from thunderkv._extension import extension_error, load_extension
    from thunderkv.bench.timing import cpu_model

    info: dict = {
        "thunderkv": thunderkv.__version__,
        "format_version": thunderkv.FORMAT_VERSION,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "ucxx": _version("ucxx"),
        "libucx": _version("libucx"),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "flags": _cpu_flags(),
                "torch_threads": torch.get_num_threads()},
        "kernel_env": kernel_env(),
    }
    ext = load_extension()
    if ext is None:
        info["extension"] = {"loaded": False, "why_not": extension_error()}
    else:
        try:
            active, active_error = ext.cpu_variant(), None
        except ValueError as exc:  # a THUNDERKV_CPU_ISA this CPU cannot run
            active, active_error = None, str(exc)
        info["extension"] = {"loaded": True, **ext.build_info(),
                             "cpu_variants_usable": list(ext.cpu_variants()),
                             "cpu_variant_active": active,
                             "cpu_variant_error": active_error,
                             "openmp_max_threads": ext.cpu_max_threads(),
                             "crc32c": ext.crc32c_implementation()}
    cuda = torch.device("cuda")
    info["torch_cuda"] = {"available": torch.cuda.is_available(),
                          "built_with": torch.version.cuda,
                          "devices": [torch.cuda.get_device_name(i)
                                      for i in range(torch.cuda.device_count())]}
    status = {}
    for name in backends.BACKENDS:
        device = torch.device("cpu") if name in ("reference", "cpu") else cuda
        if name == "triton" and not torch.cuda.is_available():
            device = torch.device("cpu")
        why = backends.unavailable_reason(name, device)
        status[name] = {"device": str(device), "available": why is None, "why_not": why}
    info["backends"] = status
    info["transfer"] = transfer_status()
    return info


def transfer_status() -> dict:
    """Whether UCX transfer works here (and why not), UCX's version and the transports it sees."""
    from thunderkv.transfer import ucxtools
    from thunderkv.transfer.ucx import load_ucx, ucx_unavailable_reason

    ucx = load_ucx()
    out: dict = {"available": ucx is not None, "why_not": ucx_unavailable_reason(),
                 "ucx_version": ucx.version() if ucx is not None else ucxtools.ucx_version(),
                 "ucx_home": str(ucxtools.ucx_home() or "")}
    try:
        devices = ucxtools.ucx_info_devices()
    except RuntimeError as exc:
        devices, out["devices_error"] = [], str(exc)
    out["transports"] = sorted({f"{d['transport']}/{d['device']}" for d in devices})
    return out
