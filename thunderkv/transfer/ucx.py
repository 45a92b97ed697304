"""Loading of the compiled UCX data path ``thunderkv._ucx``, remembering why it failed if it did.

UCX logs its own errors (e.g. "error during flush: Connection reset by remote peer" when a peer
dies mid-PUT) straight to stderr, although every such failure also reaches the caller as a
TransferError. So unless ``$UCX_LOG_LEVEL`` is set, UCX is loaded with it set to ``fatal``
(UCX reads it once, when its libraries load); the variable is removed again afterwards, so
subprocesses (``ucx_perftest``, ``ucx_info``) keep UCX's defaults. Set ``UCX_LOG_LEVEL=warn``
(UCX's default) to see UCX's messages.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

from .errors import TransferError, TransferTimeout

_error: str | None = None
LOG_LEVEL_ENV = "UCX_LOG_LEVEL"
QUIET_LOG_LEVEL = "fatal"


@functools.cache
def load_ucx() -> ModuleType | None:
    """The ``_ucx`` module, or ``None`` (then :func:`ucx_unavailable_reason` says why)."""
    quiet = LOG_LEVEL_ENV not in os.environ
    if quiet:
        os.environ[LOG_LEVEL_ENV] = QUIET_LOG_LEVEL
    try:
        return _load_ucx()
    finally:
        if quiet:
            os.environ.pop(LOG_LEVEL_ENV, None)


def _load_ucx() -> ModuleType | None:
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
