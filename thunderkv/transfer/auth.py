"""The shared-token handshake of the side channel.

Both sides hold the same secret token (``THUNDERKV_TRANSFER_TOKEN``, or a file named by
``THUNDERKV_TRANSFER_TOKEN_FILE``, or passed explicitly). The token never crosses the wire:
each side sends a fresh random nonce and proves knowledge of the token with
HMAC-SHA256(token, role || server nonce || client nonce), so a recorded handshake cannot be
replayed and a peer without the token learns nothing (in particular not the UCX worker address
and remote key that would let it write into our registered memory).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

TOKEN_ENV = "THUNDERKV_TRANSFER_TOKEN"
TOKEN_FILE_ENV = "THUNDERKV_TRANSFER_TOKEN_FILE"
NONCE_BYTES = 32
MIN_TOKEN_BYTES = 16


def load_token(token: str | bytes | None = None) -> bytes:
    """The shared token: ``token`` if given, else ``$THUNDERKV_TRANSFER_TOKEN``, else the
    contents of ``$THUNDERKV_TRANSFER_TOKEN_FILE``. Raises TypeError for a token that is not
    str or bytes (``bytes(32)`` would be 32 NUL bytes, a token anyone can guess), ValueError
    when there is none or it is shorter than 16 bytes (a guessable token is no
    authentication)."""
    if token is not None and not isinstance(token, (str, bytes, bytearray)):
        raise TypeError(f"token must be str or bytes, got {type(token).__name__}")
    source = "the token argument"
    if token is None and os.environ.get(TOKEN_ENV):
        token, source = os.environ[TOKEN_ENV], f"${TOKEN_ENV}"
    if token is None and os.environ.get(TOKEN_FILE_ENV):
        path = Path(os.environ[TOKEN_FILE_ENV])
        try:
            token = path.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"${TOKEN_FILE_ENV} names {path}, which cannot be read: "
                             f"{exc.strerror or exc}") from None
        source = f"the file {path} (${TOKEN_FILE_ENV})"
    if token is None:
        raise ValueError(
            f"no transfer token: set ${TOKEN_ENV} or ${TOKEN_FILE_ENV}, or pass token=... "
            f"(e.g. `export {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_hex())')`)")
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if len(raw) < MIN_TOKEN_BYTES:
        raise ValueError(f"the transfer token from {source} is {len(raw)} bytes; "
                         f"use at least {MIN_TOKEN_BYTES}")
    return raw


def new_token() -> str:
    """A fresh random token (hex), for single-machine runs that spawn both sides."""
    return secrets.token_hex(32)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(token: bytes, role: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256 proof that ``role`` ("client" or "server") holds ``token``."""
    return hmac.new(token, role.encode() + server_nonce + client_nonce, hashlib.sha256).digest()


def verify(token: bytes, role: str, server_nonce: bytes, client_nonce: bytes,
           presented: bytes) -> bool:
    return hmac.compare_digest(proof(token, role, server_nonce, client_nonce), presented)
