"""thunderkv.transfer: zero-copy movement of (compressed) KV between processes over UCX.

Verbs (see docs/transfer.md):

- register a buffer pool: :meth:`KVSender.register` (send side; quantize kernels write into
  its slices) and the :class:`KVReceiver`'s own pool (PUT target; dequantize reads from it);
- send one request's KV: :meth:`KVSender.send`, or layer by layer with :meth:`KVSender.stream`
  and :meth:`KVStream.send_layer` so sending overlaps the prefill computing later layers;
- receive / poll / await: :meth:`KVReceiver.recv` (next complete), :meth:`KVReceiver.wait`
  (a given request), :meth:`KVReceiver.incoming` + :meth:`IncomingKV.wait_layer` (per layer).

Data moves by one-sided UCX PUT in the compiled module ``thunderkv._ucx``; a small TCP side
channel carries the authenticated handshake, KV headers (:mod:`.wire`), per-layer checksums
and acknowledgements. :func:`unavailable_reason` says why transfer cannot run here, if it can't.
"""

from .errors import (
    AuthenticationError,
    ConnectionClosed,
    ListenError,
    RequestRejected,
    TransferError,
    TransferTimeout,
    TransferUnavailable,
)
from .pool import PoolFull
from .receiver import IncomingKV, KVReceiver, ReceivedKV
from .sender import KVSender, KVStream, SendPool, TransferResult
from .ucx import ucx_unavailable_reason as unavailable_reason
from .wire import KVHeader, KVMessageError, Limits, build_header, decode_header, layer_views

__all__ = [
    "AuthenticationError", "ConnectionClosed", "IncomingKV", "KVHeader", "KVMessageError", "KVReceiver", "KVSender",
    "KVStream", "Limits", "ListenError", "PoolFull", "ReceivedKV", "RequestRejected", "SendPool", "TransferError",
    "TransferResult", "TransferTimeout", "TransferUnavailable", "build_header", "decode_header",
    "layer_views", "unavailable_reason",
]
