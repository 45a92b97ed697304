"""Loading of the compiled extension thunderkv._C, remembering why it failed if it did."""

from __future__ import annotations

import functools
from types import ModuleType

_error: str | None = None


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled module, or ``None`` (see :func:`extension_error`)."""
    global _error
    try:
        from . import _C
    except ImportError as exc:  # not built, or built for another Python/ABI
        _error = f"{type(exc).__name__}: {exc}"
        return None
    return _C


def extension_error() -> str | None:
    load_extension()
    return _error
