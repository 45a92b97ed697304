"""The sending side: connect to a KVReceiver and PUT KV messages into its registered pool.

One :class:`KVSender` is one authenticated connection (side channel + UCX endpoint); requests
on it run one at a time (open several senders for concurrency). Once a request fails mid-way
(the receiver refused it, the connection dropped, a timeout) the sender is :attr:`KVSender.broken`
and refuses new requests: close it and open a new one. A request's payload must be a
contiguous uint8 tensor: ideally a slice of a :class:`SendPool` the quantize kernels wrote
straight into (registered once), otherwise it is registered for the duration of the call.
Either way the bytes go from that memory into the receiver's pool with one-sided UCX PUTs, in
chunks, with a PROGRESS notice after each so the receiver can tell slow from dead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from . import auth, channel
from ._args import int_arg, timeout_arg
from .channel import Kind
from .checksum import crc32c_running
from .errors import (
    AuthenticationError,
    ConnectionClosed,
    RequestRejected,
    TransferError,
    TransferTimeout,
    TransferUnavailable,
)
from .pool import BufferPool, PoolFull
from .ucx import load_ucx, ucx_unavailable_reason
from .ucx import ucx_call as _ucx_call
from .wire import WIRE_LIMITS, KVHeader, KVMessageError

DEFAULT_CHUNK_BYTES = 16 << 20
_LANE = re.compile(r"lane\[\d+\]:\s+\d+:(\S+?)\.\d+\s")
# UCX statuses (ucs_status_string) a PUT or flush fails with when the target process is gone.
# "Operation canceled" is absent on purpose: closing our own endpoint cancels a PUT too.
_PEER_GONE = ("Input/output error", "Connection reset", "Endpoint timeout",
              "Destination is unreachable", "peer failure reported by UCX")


@functools.cache
def _crc_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tkv-crc")


def rma_transports(description: str) -> list[str]:
    """The ``transport/device`` of the lanes UCX uses for RMA (PUT), from ``ucp_ep_print_info``."""
    out = []
    for line in description.splitlines():
        m = _LANE.search(line)
        if m and any(word.startswith("rma") for word in line.split()):
            out.append(m.group(1))
    return out


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What one request cost: bytes, seconds and the transports that carried it."""

    request_id: int
    bits: int
    layers: int
    payload_bytes: int  # bytes on the wire (excluding the small header/notices)
    kv_bytes: int  # the same KV uncompressed (16-bit, or the model dtype for raw messages)
    seconds: float  # BEGIN sent -> ACK received
    put_seconds: float  # time inside UCX PUT + flush
    transports: tuple[str, ...]  # RMA lanes, e.g. ("cma/memory",) or ("tcp/lo",)
    lanes: tuple[str, ...] = field(default=())  # every lane of the endpoint

    @property
    def bytes_per_s(self) -> float:
        return self.payload_bytes / self.seconds if self.seconds > 0 else float("inf")

    @property
    def effective_kv_bytes_per_s(self) -> float:
        """Uncompressed-equivalent KV bytes delivered per second."""
        return self.kv_bytes / self.seconds if self.seconds > 0 else float("inf")


def uncompressed_bytes(header: KVHeader) -> int:
    """Bytes of the message's K and V at 16 bits (the model dtype's width for raw float32)."""
    width = header.dtype.itemsize if header.raw else 2
    return 2 * header.layers * header.batch * header.heads * header.head_dim * header.tokens * width


def layer_groups(layers: int, per_group: int) -> list[int]:
    """Layers per notice for a one-shot send: groups of ``per_group`` (about ``chunk_bytes``)
    that halve over the last ones down to a quarter of ``per_group``. The receiver checks a
    group while the next one is PUT; only the last group's check is not hidden, and checking
    runs about 3x faster than the PUT copies, so each group can be half the one before it and
    the exposed check shrinks 4x for two more notices. Measured A/B against equal groups on
    this 2-core VM (one process pair, alternating blocks, 100 sends each, p50): 47 MB raw
    8.04 -> 7.54 ms, 13 MB 4-bit 4.44 -> 4.13 ms, 134 MB raw unchanged (34.4 / 34.6 ms);
    halving down to 1/8 or 1/2 of a group gained less (8.00 -> 7.74, 8.04 -> 8.00 ms)."""
    if layers < 0 or per_group < 1:
        raise ValueError("layers >= 0 and per_group >= 1 required")
    sizes, size, left = [], max(1, per_group // 4), layers
    while left > 0:  # from the last group backwards
        sizes.append(min(size, left))
        left -= sizes[-1]
        size = min(per_group, 2 * size)
    return sizes[::-1]


def _check_header(header: KVHeader) -> None:
    """TypeError unless ``header`` is a :class:`KVHeader`; ValueError unless the wire can
    carry it (a header built by hand or changed with ``dataclasses.replace`` may be
    inconsistent). Checked before a request starts, so a bad header leaves the sender usable."""
    if not isinstance(header, KVHeader):
        raise TypeError("header must be a KVHeader (from build_header() or decode_header()),"
                        f" got {type(header).__name__}")
    try:
        header.validate(WIRE_LIMITS)
    except KVMessageError as exc:
        raise ValueError(f"header cannot be sent: {exc}") from None


class SendPool(BufferPool):
    """A registered send buffer; carve request payloads out of it with :meth:`allocate`."""


class KVSender:
    """An authenticated connection to a :class:`~thunderkv.transfer.KVReceiver`.

    Parameters
    ----------
    host, port : the receiver's side-channel address.
    token : the shared secret (default: ``$THUNDERKV_TRANSFER_TOKEN`` / ``..._FILE``).
    timeout : seconds without progress (connect, grant, a PUT chunk, the ACK) before
        TransferTimeout.
    chunk_bytes : PUT granularity; a PROGRESS notice follows each chunk.
    error_handling : UCX peer error handling (must match what suits the receiver's transports).
    """

    def __init__(self, host: str, port: int, *, token: str | bytes | None = None,
                 timeout: float = 5.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 error_handling: bool = False) -> None:
        ucx = load_ucx()
        if ucx is None:
            raise TransferUnavailable(f"UCX transfer unavailable: {ucx_unavailable_reason()}")
        port = int_arg(port, "port", 1, 65535)
        timeout = timeout_arg(timeout)
        chunk_bytes = int_arg(chunk_bytes, "chunk_bytes", 1)
        self._token = auth.load_token(token)
        self.timeout, self.chunk_bytes = timeout, chunk_bytes
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread holding the open request
        self._broken: str | None = None  # why the connection can no longer be used
        self._closed = False
        # close() waits for a PUT in flight before it shuts the connection: the receiver takes
        # the connection's end as "this sender writes no more" and reuses the memory
        self._put_state = threading.Condition()
        self._putting = False
        self._put_may_land = False  # a PUT timed out: UCX does not cancel it, so it may land
        #                             later (every ABORT says so from then on)
        try:
            self._sock = socket.create_connection((host, port), timeout=self.timeout)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a host name IDNA cannot encode
            raise TransferError(f"cannot connect to {host}:{port}: {exc}") from exc
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = f"{host}:{port}"
        try:
            address, rkey, info = self._handshake()
            self.worker = _ucx_call(ucx.Worker, error_handling)
            self._endpoint = _ucx_call(self.worker.connect, address)
            self._remote = _ucx_call(self._endpoint.unpack_rkey, rkey, info["pool_address"],
                                     info["pool_nbytes"])
        except BaseException:
            self._sock.close()
            raise
        self.remote_memory_type = str(info.get("memory_type", "host"))
        self.max_payload_bytes = int(info.get("max_payload_bytes", info["pool_nbytes"]))
        self.lanes = tuple(f"{t}/{d}" for t, d in self._endpoint.transports())
        self.transports = tuple(rma_transports(self._endpoint.describe())) or self.lanes
        self._pools: list[BufferPool] = []
        self._pools_lock = threading.Lock()  # register() vs close(): no pool may slip past
        self._stream: KVStream | None = None

    def _handshake(self) -> tuple[bytes, bytes, dict]:
        hello = channel.expect(channel.receive(self._sock, timeout=self.timeout, what="HELLO",
                                               max_frame=channel.PRE_AUTH_MAX_FRAME), Kind.HELLO)
        if hello.meta.get("version") != 1:
            raise TransferError(f"receiver speaks protocol version {hello.meta.get('version')}, "
                                "this sender 1")
        try:
            server_nonce = bytes.fromhex(str(hello.meta.get("nonce", "")))
        except ValueError:
            server_nonce = b""
        client_nonce = auth.new_nonce()
        channel.send(self._sock, Kind.AUTH, {
            "nonce": client_nonce.hex(),
            "proof": auth.proof(self._token, "client", server_nonce, client_nonce).hex()},
            timeout=self.timeout)
        msg = channel.receive(self._sock, timeout=self.timeout, what="WELCOME")
        if msg.kind == Kind.ERROR:
            raise AuthenticationError(f"receiver {self.peer} refused: {msg.meta.get('reason')}")
        channel.expect(msg, Kind.WELCOME)
        try:
            server_proof = bytes.fromhex(str(msg.meta.get("proof", "")))
        except ValueError:
            server_proof = b""
        if not auth.verify(self._token, "server", server_nonce, client_nonce, server_proof):
            raise AuthenticationError(f"receiver {self.peer} could not prove it holds the token")
        n_addr = channel.meta_int(msg, "address_bytes", 1, len(msg.blob))
        nbytes = channel.meta_int(msg, "pool_nbytes", 1)
        channel.meta_int(msg, "pool_address", 0)
        if "max_payload_bytes" in msg.meta:
            channel.meta_int(msg, "max_payload_bytes", 0, nbytes)
        return msg.blob[:n_addr], msg.blob[n_addr:], msg.meta

    # ------------------------------------------------------------------ buffers
    def register(self, nbytes: int, device: torch.device | str = "cpu") -> SendPool:
        """A registered send pool of ``nbytes`` on ``device`` (quantize straight into slices).
        TypeError / ValueError for a bad size or device; TransferError if the memory cannot be
        allocated or registered, or the sender is closed."""
        with self._pools_lock:  # close() sets _closed before it takes the pools
            if self._closed:
                raise TransferError(f"sender to {self.peer} is closed: open a new KVSender to "
                                    "register memory")
            pool = SendPool(self.worker, nbytes, device)
            self._pools.append(pool)
        return pool

    def unregister(self, pool: SendPool) -> None:
        """Release ``pool``'s UCX registration and forget it (waits for a request in flight on
        another thread; raises TransferError if this thread has one open, or once the sender
        is closed: close() unregistered every pool). Slices of it sent later are registered
        per request, like any tensor."""
        self._refuse_reentry("unregister() a pool")
        if self._closed:
            raise TransferError(f"sender to {self.peer} is closed: close() already unregistered "
                                "its pools")
        with self._lock:
            with self._pools_lock:
                if not any(p is pool for p in self._pools):
                    raise ValueError("pool is not registered with this sender")
                self._pools = [p for p in self._pools if p is not pool]
            pool.close()

    def _refuse_reentry(self, what: str) -> None:
        """The sender's lock is held by an open request; taking it again on the same thread
        would deadlock, so refuse instead."""
        if self._owner == threading.get_ident():
            raise TransferError(f"cannot {what}: a request is already open on this sender in "
                                "this thread; finish() or abort() it first, or open another "
                                "KVSender")

    def _region_of(self, payload: torch.Tensor):
        """(region, offset) of ``payload`` (validated by :meth:`stream`) in a registered pool,
        registering it if needed."""
        start = payload.data_ptr()
        for pool in self._pools:
            if pool.address <= start and start + payload.numel() <= pool.address + pool.nbytes:
                return pool.region, start - pool.address, None
        region = _ucx_call(self.worker.register_memory, start, payload.numel())
        return region, 0, region

    # ------------------------------------------------------------------ sending
    def send(self, header: KVHeader, payload: torch.Tensor) -> TransferResult:
        """Send a whole message (all layers ready) and wait for the receiver's verification.

        Layers go in groups (:func:`layer_groups`) with one notice per group, so the receiver
        verifies group g while group g+1 is being PUT; the last notice commits."""
        with self.stream(header, payload) as stream:
            stream.commit_with_last_layer = True
            per_group = max(1, self.chunk_bytes // max(1, header.layer_nbytes()))
            first = 0
            for n in layer_groups(header.layers, per_group):
                stream.send_layers(first, first + n)
                first += n
            return stream.finish()

    def stream(self, header: KVHeader, payload: torch.Tensor) -> KVStream:
        """Start a request whose layers are sent one by one as they are produced
        (:meth:`KVStream.send_layer`), so sending overlaps the prefill that computes them.

        TypeError for a header that is not a :class:`KVHeader` or a payload that is not a
        torch tensor; ValueError for a header the wire cannot carry (e.g. made inconsistent
        by ``dataclasses.replace``), a payload that does not match the header, is not a
        contiguous 1-D uint8 tensor in CPU or CUDA memory, or is over the receiver's limit.
        None of these touches the connection."""
        _check_header(header)
        if not isinstance(payload, torch.Tensor):
            raise TypeError(f"payload must be a torch.Tensor (contiguous 1-D uint8), got "
                            f"{type(payload).__name__}")
        if header.payload_length > self.max_payload_bytes:
            raise ValueError(f"payload of {header.payload_length} bytes is over the receiver's "
                             f"limit of {self.max_payload_bytes}")
        if payload.dtype != torch.uint8 or payload.dim() != 1 or not payload.is_contiguous():
            raise ValueError("payload must be a contiguous 1-D uint8 tensor, got "
                             f"{payload.dtype} {tuple(payload.shape)}")
        if payload.device.type not in ("cpu", "cuda"):
            raise ValueError(f"payload must be in CPU or CUDA memory, got a tensor on "
                             f"{payload.device}")
        if payload.numel() != header.payload_length:
            raise ValueError(f"payload has {payload.numel()} bytes, header says "
                             f"{header.payload_length}")
        if not header.streamed and header.payload_crc == 0:
            # No checksum up front: the per-layer notices carry it (as for a streamed message).
            header = dataclasses.replace(header, streamed=True)
        self._check_usable()
        self._refuse_reentry("open another request")
        return KVStream(self, header, payload)

    @property
    def broken(self) -> bool:
        """True once a request failed mid-way or the connection dropped: the sender refuses
        new requests; close it and open a new :class:`KVSender`."""
        return self._broken is not None or self._closed

    def _check_usable(self) -> None:
        if self._closed:
            raise TransferError(f"sender to {self.peer} is closed")
        if self._broken is not None:
            raise TransferError(f"connection to {self.peer} failed earlier ({self._broken}): "
                                "open a new KVSender")

    def close(self) -> None:
        """Close the connection. A request in flight on another thread fails (its next step
        finds the sender closed) and is waited for before UCX resources are freed; a PUT it
        has under way ends before the connection is shut, since the receiver reuses the
        request's memory once the connection ends. One left open on this thread is aborted."""
        with self._put_state:
            if self._closed:
                return
            self._closed = True  # no PUT starts from here on (KVStream._put checks)
            # The receiver takes the connection's end as "it writes no more" and reuses the
            # slice: a PUT still writing must end first (its call returns within its timeout;
            # one that timed out may still land later, which its ABORT told the receiver).
            self._put_state.wait_for(lambda: not self._putting, self.timeout + 5.0)
        if self._owner == threading.get_ident() and self._stream is not None:
            self._stream.abort("sender closed")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # a request in flight fails at its next step
        except OSError:
            pass
        # A PUT in flight ends within its timeout; only then may the endpoint and the
        # registered memory go (freeing them under a PUT crashes the process).
        if not self._lock.acquire(timeout=self.timeout + 5.0):
            self._sock.close()
            return  # still busy: leave the UCX resources to the process exit rather than crash
        try:
            self._sock.close()
            self._remote = None  # UCX wants remote keys destroyed before their endpoint
            if getattr(self, "_endpoint", None) is not None:
                self._endpoint.close(force=False, timeout_s=min(self.timeout, 1.0))
                self._endpoint = None
            with self._pools_lock:  # a register() racing with us saw _closed, or is in here
                pools, self._pools = self._pools, []
            for pool in pools:
                pool.close()
        finally:
            self._lock.release()

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KVStream:
    """One request in flight on a :class:`KVSender` (see :meth:`KVSender.stream`)."""

    def __init__(self, sender: KVSender, header: KVHeader, payload: torch.Tensor) -> None:
        self.sender, self.header, self.payload = sender, header, payload
        self._open = False
        sender._refuse_reentry("open another request")  # the lock is not reentrant
        sender._lock.acquire()  # one request at a time (other threads wait their turn)
        try:
            sender._check_usable()  # it may have failed or closed while this thread waited
            self._region, self._base, self._temporary = sender._region_of(payload)
        except BaseException:
            sender._lock.release()
            raise
        sender._owner, sender._stream = threading.get_ident(), self
        self._open = True
        self._next_layer, self._crc, self.put_seconds = 0, 0, 0.0
        self._commit_sent = False
        self.commit_with_last_layer = False  # KVSender.send sets it: saves one message
        self.started = time.perf_counter()
        sock, timeout = sender._sock, sender.timeout
        try:
            channel.send(sock, Kind.BEGIN, {}, header.pack(), timeout=timeout)
            grant = channel.expect(channel.receive(sock, timeout=timeout, what="GRANT"),
                                   Kind.GRANT)
            if not grant.meta.get("ok"):
                reason = str(grant.meta.get("reason", "no reason given"))
                code = grant.meta.get("code")
                if code is None:  # a receiver from before refusal codes: its reason text
                    code = "pool_full" if "pool" in reason and "free" in reason else "rejected"
                cls = PoolFull if code == "pool_full" else RequestRejected
                raise cls(f"receiver refused request {header.request_id}: {reason}")
            self.offset = channel.meta_int(grant, "offset", 0,
                                           sender._remote.nbytes - header.payload_length)
        except RequestRejected:
            self._close()  # a clean refusal: the connection is fine
            raise
        except TransferError as exc:
            sender._broken = str(exc)
            self._close()
            raise
        except BaseException as exc:
            sender._broken = f"{type(exc).__name__} while starting a request"
            self._close()
            raise

    def _close(self) -> None:
        if self._open:
            self._open = False
            try:
                if self._temporary is not None:
                    self._temporary.release()
            finally:  # the sender's lock goes back whatever happened
                self.sender._owner, self.sender._stream = None, None
                self.sender._lock.release()

    def _receiver_said_stop(self) -> None:
        """Before each PUT: the receiver speaks mid-request only to fail it (an ERROR after
        it timed out or rejected a layer); then write nothing more into its pool."""
        s = self.sender
        if s._closed:
            raise TransferError("sender closed")
        poller = select.poll()  # not select(): it fails on descriptors >= 1024
        poller.register(s._sock, select.POLLIN)
        if poller.poll(0):
            msg = channel.receive(s._sock, timeout=s.timeout, what="the receiver's message")
            channel.expect(msg, Kind.ACK)  # an ERROR (the receiver gave up) raises its reason
            if not msg.meta.get("ok"):
                raise RequestRejected(f"receiver rejected request {self.header.request_id}: "
                                      f"{msg.meta.get('reason')}")
            raise TransferError(f"protocol error: ACK for request {self.header.request_id} "
                                "before its commit")

    def _check_sender_open(self) -> None:
        """TransferError once the sender was closed (from another thread): a request in
        flight fails at its next step instead of committing."""
        if self.sender._closed:
            raise TransferError(f"sender closed during request {self.header.request_id}")

    def keep_alive(self) -> None:
        """Tell the receiver this request is still alive while the next layer is being
        produced (a PROGRESS notice; the receiver fails a request that sends nothing for its
        ``timeout``). Call it from the thread that sends the layers, more often than the
        receiver's timeout. Raises the receiver's refusal if it gave up on the request."""
        if not self._open:
            raise TransferError("stream is closed")
        s = self.sender
        with self._failing("keeping the request alive"):
            self._receiver_said_stop()
            channel.send(s._sock, Kind.PROGRESS, {"bytes": self._next_layer
                                                  * self.header.layer_nbytes()},
                         timeout=s.timeout)

    @contextlib.contextmanager
    def _failing(self, doing: str):
        """Around a step of the request: a refusal aborts it (the ABORT tells the receiver
        this sender stopped writing; the connection stays usable); any other failure also
        marks the sender broken."""
        try:
            yield
        except RequestRejected:
            self.abort("rejected by the receiver")
            raise
        except BaseException as exc:
            s = self.sender
            s._broken = s._broken or f"{type(exc).__name__}: {exc}"
            self.abort(f"sender failed while {doing}")
            raise

    def send_layer(self, index: int) -> None:
        """PUT layer ``index`` (layers go in order) and tell the receiver it is in place.
        TypeError for an index that is not an int, IndexError for one outside the message,
        ValueError for one out of order (none of them touches the request)."""
        index = int_arg(index, "layer index", -(1 << 63))
        self.send_layers(index, index + 1)

    def send_layers(self, first: int, stop: int) -> None:
        """PUT layers ``first..stop-1`` (contiguous in the payload) and send one notice with
        their running CRC-32Cs; the notice commits when ``stop`` is the last layer and the
        stream came from :meth:`KVSender.send`. A GPU payload is read once the work queued
        on torch's current stream of its device is done (sync other streams yourself).
        Bad arguments raise as for :meth:`send_layer`, and so does an empty range."""
        if not self._open:
            raise TransferError("stream is closed")
        first, stop = self._layer_range(first, stop)
        s = self.sender
        n = self.header.layer_nbytes()
        start, end = first * n, stop * n
        with self._failing("sending layers"):
            if self.payload.is_cuda:
                # UCX copies GPU memory on its own streams: the kernels that wrote these layers
                # (queued on torch's current stream) must be done before the PUT reads them.
                torch.cuda.current_stream(self.payload.device).synchronize()
            # The CRC (GIL released in C++) runs on a helper thread while this one PUTs; one
            # OpenMP thread, so that it does not also take the core the PUT copies on.
            crc_future = _crc_pool().submit(self._layer_crcs, first, stop)
            done = start
            while done < end:
                self._receiver_said_stop()
                size = min(s.chunk_bytes, end - done)
                self.put_seconds += self._put(self._base + done, size, self.offset + done)
                done += size
                if done < end:
                    channel.send(s._sock, Kind.PROGRESS, {"bytes": done}, timeout=s.timeout)
            crcs = crc_future.result()
            self._check_sender_open()  # closed during the last PUT: no notice, no delivery
            self._crc = crcs[-1]
            self._commit_sent = stop == self.header.layers and self.commit_with_last_layer
            channel.send(s._sock, Kind.LAYER, {"index": first, "crcs": crcs,
                                               "commit": self._commit_sent}, timeout=s.timeout)
        self._next_layer = stop

    def _layer_range(self, first: int, stop: int) -> tuple[int, int]:
        """``first, stop`` checked: ints (TypeError), inside the message (IndexError), a
        non-empty range starting at the next layer to send (ValueError)."""
        first = int_arg(first, "first layer", -(1 << 63))
        stop = int_arg(stop, "stop layer", -(1 << 63))
        layers = self.header.layers
        if not 0 <= first < layers or not 0 <= stop <= layers:
            raise IndexError(f"layers {first}..{stop - 1} outside 0..{layers - 1}")
        if first != self._next_layer or stop <= first:
            raise ValueError(f"layers must be sent in order: expected {self._next_layer}, "
                             f"got {first}..{stop - 1}")
        return first, stop

    def _put(self, offset: int, size: int, remote_offset: int) -> float:
        """One PUT (+ flush); a UCX failure that means the receiver is gone (its process died,
        the connection was reset) becomes ConnectionClosed."""
        s = self.sender
        with s._put_state:
            if s._closed:
                raise TransferError(f"sender closed before a PUT of request "
                                    f"{self.header.request_id}")
            s._putting = True
        try:
            return _ucx_call(s._endpoint.put, self._region, offset, size, s._remote,
                             remote_offset, s.timeout)
        except TransferTimeout:
            s._put_may_land = True  # the receiver must keep this request's slice out for good
            raise
        except TransferError as exc:
            if s._closed:  # our own close() cancelled it
                raise TransferError(f"sender closed during the PUT of request "
                                    f"{self.header.request_id}") from None
            if any(text in str(exc) for text in _PEER_GONE):
                raise ConnectionClosed(f"receiver {s.peer} is gone: the PUT of request "
                                       f"{self.header.request_id} failed ({exc})") from None
            raise
        finally:
            with s._put_state:
                s._putting = False
                s._put_state.notify_all()

    def _layer_crcs(self, first: int, stop: int) -> list[int]:
        """Running CRC-32C through the end of each layer ``first..stop-1`` (on the GPU for a
        CUDA payload)."""
        n = self.header.layer_nbytes()
        return crc32c_running(self.payload[first * n:stop * n], n, stop - first, self._crc,
                              threads=1)

    def finish(self) -> TransferResult:
        """Commit and wait for the receiver to verify the whole payload."""
        s = self.sender
        if self._open and self._next_layer != self.header.layers:
            self.abort("finish() before every layer was sent")
            raise ValueError(f"finish() after {self._next_layer}/{self.header.layers} layers: "
                             "request aborted")
        if not self._open:
            raise TransferError(f"request {self.header.request_id}: stream is closed")
        try:
            if not self._commit_sent:
                self._check_sender_open()
                channel.send(s._sock, Kind.COMMIT, {"payload_crc": self._crc},
                             timeout=s.timeout)
            ack = channel.expect(channel.receive(s._sock, timeout=s.timeout, what="ACK"), Kind.ACK)
            if not ack.meta.get("ok"):  # a clean rejection: the connection stays usable
                raise RequestRejected(f"receiver rejected request {self.header.request_id}: "
                                      f"{ack.meta.get('reason')}")
            seconds = time.perf_counter() - self.started
        except RequestRejected:
            raise
        except TransferError as exc:
            s._broken = s._broken or str(exc)
            raise
        except BaseException as exc:
            s._broken = s._broken or f"{type(exc).__name__} while finishing a request"
            raise
        finally:
            self._close()
        h = self.header
        return TransferResult(h.request_id, h.bits, h.layers, h.payload_length,
                              uncompressed_bytes(h), seconds, self.put_seconds,
                              s.transports, s.lanes)

    def abort(self, reason: str = "") -> None:
        """Give up the request; the receiver frees its slice and reports the reason."""
        if not self._open:
            return
        meta = {"reason": reason}
        if self.sender._put_may_land:
            meta["may_still_write"] = True
        try:
            channel.send(self.sender._sock, Kind.ABORT, meta,
                         timeout=min(self.sender.timeout, 1.0))
        except TransferError:
            pass
        finally:
            self._close()

    def __enter__(self) -> KVStream:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort(f"{exc_type.__name__} on the sender")
        elif self._open:  # left without finish(): the receiver would wait for a COMMIT
            self.abort("stream closed without finish()")
            raise TransferError(f"request {self.header.request_id}: stream left without "
                                "finish(); aborted")
        self._close()
