"""ThunderKV: 4-bit KV-cache compression, KV transfer and phase-split planning for LLM serving.

The kernel API (``quantize``, ``quantize_into``, ``dequantize``, ``QuantizedTensor``,
``FormatSpec``) is imported lazily so that ``thunderkv.scheduler`` (the planner) runs without
torch or the compiled extension.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
FORMAT_VERSION = 1

_LAZY = {
    "quantize": "api",
    "quantize_into": "api",
    "dequantize": "api",
    "QuantizedTensor": "api",
    "FormatSpec": "format",
    "reference": None,
}

__all__ = ["__version__", "FORMAT_VERSION", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'thunderkv' has no attribute {name!r}")
    module = _LAZY[name]
    if module is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
