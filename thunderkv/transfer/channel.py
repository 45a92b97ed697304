"""The side channel: small framed control messages over one TCP connection per peer.

The data never travels here (it moves by UCX PUT between registered buffers); this carries the
handshake, the KV header, grants, per-layer completion notices with checksums, and the final
acknowledgement. A frame is ``<u32 body length><u8 kind><u32 meta length>`` + JSON meta + an
opaque blob. Frames are capped (``max_frame``) before anything is allocated; reads have
deadlines, so a dead or stalled peer shows up as TransferError / TransferTimeout.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ConnectionClosed, TransferError, TransferTimeout

FRAME = struct.Struct("<IBI")
PRE_AUTH_MAX_FRAME = 4096
MAX_FRAME = 1 << 20


class Kind(enum.IntEnum):
    HELLO = 1  # server -> client: protocol version, server nonce
    AUTH = 2  # client -> server: client nonce, proof
    WELCOME = 3  # server -> client: proof, worker address + rkey of the receive pool
    ERROR = 4  # either way: a refusal with a reason, then close
    BEGIN = 5  # client -> server: KV header (blob); asks for space
    GRANT = 6  # server -> client: offset in the pool for that request
    PROGRESS = 7  # client -> server: bytes PUT so far (keeps a long transfer alive)
    LAYER = 8  # client -> server: layers i.. are in place, running CRC-32C through each
    #            (meta: index, crcs, commit: true on the last notice of a one-shot send)
    COMMIT = 9  # client -> server: all layers sent, payload CRC-32C
    ACK = 10  # server -> client: verified and delivered (or not: ok=false + reason)
    ABORT = 11  # client -> server: give up this request


@dataclass
class Message:
    kind: Kind
    meta: dict[str, Any] = field(default_factory=dict)
    blob: bytes = b""


def send(sock: socket.socket, kind: Kind, meta: dict[str, Any] | None = None,
         blob: bytes = b"", *, timeout: float = 5.0) -> None:
    """Send one frame; raise TransferError if the peer is gone, TransferTimeout if it stalls."""
    body = json.dumps(meta or {}, separators=(",", ":")).encode()
    frame = FRAME.pack(FRAME.size - 4 + len(body) + len(blob), int(kind), len(body))
    sock.settimeout(timeout)
    try:
        sock.sendall(frame + body + blob)
    except TimeoutError as exc:
        raise TransferTimeout(f"peer did not accept a {kind.name} message within {timeout:g} s"
                              ) from exc
    except OSError as exc:
        raise ConnectionClosed(f"connection lost while sending {kind.name}: {exc}") from exc


def _read_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeout(f"no {what} from the peer within the timeout")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - got, 1 << 16))
        except TimeoutError as exc:
            raise TransferTimeout(f"no {what} from the peer within the timeout") from exc
        except OSError as exc:
            raise ConnectionClosed(f"connection lost while waiting for {what}: {exc}") from exc
        if not chunk:
            raise ConnectionClosed(f"peer closed the connection (while waiting for {what})")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket, *, timeout: float, max_frame: int = MAX_FRAME,
            what: str = "a message") -> Message:
    """Read one frame within ``timeout`` seconds; reject malformed or oversized frames."""
    deadline = time.monotonic() + timeout
    length, kind, meta_len = FRAME.unpack(_read_exact(sock, FRAME.size, deadline, what))
    if length > max_frame:
        raise TransferError(f"control frame of {length} bytes over the limit of {max_frame}")
    if length < FRAME.size - 4 or meta_len > length - (FRAME.size - 4):
        raise TransferError("malformed control frame (inconsistent lengths)")
    try:
        kind = Kind(kind)
    except ValueError:
        raise TransferError(f"unknown control message kind {kind}") from None
    rest = _read_exact(sock, length - (FRAME.size - 4), deadline, what)
    try:
        meta = json.loads(rest[:meta_len]) if meta_len else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: JSON nested too deep (e.g. "[[[[..."), from any peer, even one
        # that has not authenticated yet
        raise TransferError(f"malformed control message {kind.name}: {exc}") from None
    if not isinstance(meta, dict):
        raise TransferError(f"malformed control message {kind.name}: meta is not an object")
    return Message(kind, meta, rest[meta_len:])


def expect(msg: Message, *kinds: Kind) -> Message:
    """``msg`` if its kind is one of ``kinds``; an ERROR becomes TransferError with its reason."""
    if msg.kind in kinds:
        return msg
    if msg.kind == Kind.ERROR:
        raise TransferError(f"peer refused: {msg.meta.get('reason', 'no reason given')}")
    raise TransferError(f"protocol error: expected {'/'.join(k.name for k in kinds)}, "
                        f"got {msg.kind.name}")


def meta_int(msg: Message, key: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    """An integer field of ``msg.meta`` in [lo, hi], else TransferError."""
    value = msg.meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise TransferError(f"{msg.kind.name}: field {key!r} must be an integer in [{lo}, {hi}],"
                            f" got {value!r}")
    return value
