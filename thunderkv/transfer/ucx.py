"""Loading of the compiled UCX data path ``thunderkv._ucx``, remembering why it failed if it did."""

from __future__ import annotations

import functools
from types import ModuleType

from .errors import TransferError, TransferTimeout

_error: str | None = None


@functools.cache
def load_ucx() -> ModuleType | None:
    """The ``_ucx`` module, or ``None`` (then :func:`ucx_unavailable_reason` says why)."""
    global _error
    from .._extension import load_extension

    ext = load_extension()
    built_without = ext.build_info().get("ucx_why_not") if ext is not None else None
    try:
        import libucx

        libucx.load_library()  # libucp & co. with RTLD_GLOBAL, whatever the RPATH says
    except ImportError:
        pass  # a system UCX may still satisfy the module's RPATH/ld.so lookup
    except OSError as exc:
        _error = f"the libucx package is installed but its libraries failed to load: {exc}"
        return None
    try:
        from .. import _ucx
    except ImportError as exc:
        _error = built_without or f"{type(exc).__name__}: {exc}"
        return None
    return _ucx


def ucx_call(fn, *args):
    """Run a ``_ucx`` call, mapping its exceptions onto :mod:`.errors`' (``_ucx`` has its own
    TransferError / TransferTimeout classes, which callers of this package never see)."""
    ucx = load_ucx()
    try:
        return fn(*args)
    except ucx.TransferTimeout as exc:
        raise TransferTimeout(str(exc)) from None
    except ucx.TransferError as exc:
        raise TransferError(str(exc)) from None


def ucx_unavailable_reason() -> str | None:
    """None when UCX transfer works here, else a one-line reason."""
    load_ucx()
    return _error
