"""Exceptions of thunderkv.transfer (every failure a caller can see is one of these)."""

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
