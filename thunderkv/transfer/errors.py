"""Exceptions of thunderkv.transfer: every failure of a transfer is one of these (a wrong
argument raises TypeError / ValueError instead, before anything changes)."""

from __future__ import annotations


class TransferError(RuntimeError):
    """A transfer failed: the peer closed, UCX reported an error, or the peer refused it."""


class ConnectionClosed(TransferError):
    """The peer closed the side channel, or the connection was reset (the peer is gone)."""


class RequestRejected(TransferError):
    """The receiver refused or rejected one request (no space, bad checksum, discarded); the
    connection stays usable for the next one."""


class TransferTimeout(TransferError, TimeoutError):
    """The peer did not make progress within the configured timeout (dead or stalled)."""


class AuthenticationError(TransferError):
    """The peer did not present the shared token (or we could not prove ours)."""


class TransferUnavailable(TransferError):
    """UCX transfer cannot run here (the message says why)."""


class ListenError(TransferError, OSError):
    """A receiver cannot listen on the address it was given (the port is in use, the host is
    not an address of this machine). Also an OSError whose ``errno`` is the failure's."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # (strerror stays None, so str() is the message)
