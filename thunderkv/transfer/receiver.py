"""The receiving side: a listener whose registered pool peers PUT KV messages into.

Per connection a thread runs the handshake, then, per request: validate the header (every
field, sizes capped) *before* allocating, grant a slice of the pool, verify each layer's
CRC-32C as its completion notice arrives (so a consumer may start on layer 0 while later
layers are in flight), and deliver the request only when the commit's payload checksum matches.
A failed request (bad checksum, sender died or stalled past the timeout, abort) raises from
:meth:`IncomingKV.wait_layer` / :meth:`KVReceiver.wait`; it is never delivered half-written.
Its slice goes back to the pool only once the sender can no longer write into it: after the
sender's COMMIT or ABORT, or once its connection is closed (a stalled sender that wakes up is
told the request failed before its next PUT). Other connections are unaffected. A completed
request is handed out once (by :meth:`KVReceiver.recv` or :meth:`KVReceiver.wait`, whichever
asks first) and released once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from . import auth, channel
from ._args import int_arg, request_id_arg, timeout_arg, wait_arg
from .channel import Kind
from .checksum import crc32c_running
from .errors import (
    AuthenticationError,
    ConnectionClosed,
    ListenError,
    RequestRejected,
    TransferError,
    TransferTimeout,
    TransferUnavailable,
)
from .pool import BufferPool, PoolFull, Slice, pool_size_arg
from .ucx import load_ucx, ucx_call, ucx_unavailable_reason
from .wire import DEFAULT_LIMITS, KVHeader, KVMessageError, Limits, decode_header, layer_views

log = logging.getLogger("thunderkv.transfer")
PROTOCOL_VERSION = 1
IDLE_POLL_S = 3600.0  # an idle connection (no request in progress) re-checks for close this
#                      often; it never times out (only a request in progress does)
DISCARD_MEMORY = 4096  # ids discarded before their BEGIN arrived, remembered (oldest dropped)
MAX_UNAUTHENTICATED = 32  # connections still in the handshake at once; more are turned away
MAX_POLL_MS = (1 << 31) - 1  # the longest wait select.poll() takes (a C int of milliseconds)

# Pools of closed receivers whose memory a sender might still have PUT into (it never confirmed
# it stopped): kept allocated for the life of the process rather than handed back to the
# allocator, where a late PUT would land in whatever is given that memory next.
_QUARANTINED: list[torch.Tensor] = []
_QUARANTINE_LOCK = threading.Lock()


def _may_still_write(msg: channel.Message) -> bool:
    """An ABORT after a PUT that timed out: UCX does not cancel a PUT, so it may still land."""
    return msg.kind == Kind.ABORT and bool(msg.meta.get("may_still_write"))


def quarantined_pools() -> list[torch.Tensor]:
    """The pool tensors (uint8) closed receivers had to keep allocated (see KVReceiver.close)."""
    with _QUARANTINE_LOCK:
        return list(_QUARANTINED)


@dataclass
class IncomingKV:
    """A request being received. Layers become readable one by one once their checksum passed."""

    header: KVHeader
    slice: Slice
    peer: str
    started: float = field(default_factory=time.perf_counter)
    layers_ready: int = 0
    error: BaseException | None = None
    done: bool = False
    seconds: float = 0.0
    claimed: bool = False  # handed out by recv() or wait()
    released: bool = False  # its slice went back to the pool
    discard: bool = False  # KVReceiver.discard() while it was still arriving
    writing: bool = False  # the sender knows where its slice is and has not confirmed it
    #                        stopped writing there (COMMIT, ABORT, or the connection's end)
    orphaned: bool = False  # ... and never will: the request ended first (slice kept out)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def request_id(self) -> int:
        return self.header.request_id

    @property
    def buffer(self) -> torch.Tensor:
        """The payload bytes (uint8, in the receive pool; valid until released: then
        TransferError, as the pool may hold another request's bytes there)."""
        self._check_not_released()
        return self.slice.view

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """Zero-copy typed views of layer ``index`` (see :func:`thunderkv.transfer.wire.layer_views`)
        once it arrived and verified; TransferError before that (:meth:`wait_layer` waits for
        it) and once the request was released, IndexError for a layer outside the message."""
        index = self._layer_index(index)
        self._check_not_released()
        if index >= self.layers_ready:
            raise TransferError(f"request {self.request_id}: layer {index} has not arrived and "
                                "verified yet (wait_layer() waits for it)")
        n = self.header.layer_nbytes()
        return layer_views(self.header, self.slice.view[index * n:(index + 1) * n])

    def wait_layer(self, index: int, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """Block until layer ``index`` arrived and verified; raise the request's error if it
        failed, TransferError once the request was released."""
        index = self._layer_index(index)
        timeout = wait_arg(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self.error or self.layers_ready > index, timeout):
                raise TransferTimeout(f"request {self.request_id}: layer {index} not received "
                                      f"within {timeout:g} s")
            if self.error:
                raise self.error
        return self.layer(index)

    def _layer_index(self, index: int) -> int:
        index = int_arg(index, "layer index", -(1 << 63))
        if not 0 <= index < self.header.layers:
            raise IndexError(f"layer {index} outside 0..{self.header.layers - 1}")
        return index

    def _check_not_released(self) -> None:
        if self.released:
            raise TransferError(f"request {self.request_id} was released: its slice of the "
                                "receive pool may hold another request now")

    def _update(self, **changes) -> None:
        with self._cond:
            for key, value in changes.items():
                setattr(self, key, value)
            self._cond.notify_all()


class ReceivedKV:
    """A complete, verified KV message in the receive pool. Call :meth:`release` when consumed."""

    def __init__(self, incoming: IncomingKV, receiver: KVReceiver) -> None:
        self._incoming, self._receiver = incoming, receiver
        self.header = incoming.header
        self.peer = incoming.peer
        self.seconds = incoming.seconds
        self._released = False

    @property
    def request_id(self) -> int:
        return self.header.request_id

    @property
    def buffer(self) -> torch.Tensor:
        """The whole payload, uint8 ``[payload_length]`` (a view into the receive pool)."""
        if self._released:
            raise TransferError(f"request {self.request_id} was released")
        return self._incoming.buffer

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """Typed zero-copy views of one layer block (names as in ``KVHeader.parts()``)."""
        if self._released:
            raise TransferError(f"request {self.request_id} was released")
        return self._incoming.layer(index)

    def release(self) -> None:
        """Give the pool slice back (the views become invalid)."""
        if not self._released:
            self._released = True
            self._receiver._forget(self._incoming)

    def __enter__(self) -> ReceivedKV:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class KVReceiver:
    """Listen for KV messages on ``host:port`` (127.0.0.1 and a free port by default).

    Parameters
    ----------
    pool_bytes : size of the registered receive pool; no message larger than it is accepted.
    token : the shared secret (default: ``$THUNDERKV_TRANSFER_TOKEN`` / ``..._FILE``).
    timeout : seconds a sender may go without progress mid-transfer before the request fails.
    limits : caps on header fields (the payload cap is also clipped to ``pool_bytes``).
    device : where the pool lives ("cpu", or "cuda" where UCX was built with CUDA support).
    error_handling : UCX peer error handling on endpoints (restricts UCX to tcp here: slower).
    """

    def __init__(self, pool_bytes: int = 1 << 30, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | bytes | None = None, timeout: float = 5.0,
                 limits: Limits = DEFAULT_LIMITS, device: torch.device | str = "cpu",
                 error_handling: bool = False) -> None:
        ucx = load_ucx()
        if ucx is None:
            raise TransferUnavailable(f"UCX transfer unavailable: {ucx_unavailable_reason()}")
        pool_bytes = pool_size_arg(pool_bytes, "pool_bytes")
        port = int_arg(port, "port", 0, 65535)
        self.timeout = timeout_arg(timeout)
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a thunderkv.transfer.Limits, got "
                            f"{type(limits).__name__}")
        self._token = auth.load_token(token)
        self.limits = dataclasses.replace(
            limits, max_payload_bytes=min(limits.max_payload_bytes, pool_bytes))
        try:  # first: a port in use fails before any memory is registered
            self._sock = socket.create_server((host, port))
        except (OSError, UnicodeError) as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc}; pick another port "
                              "(or port=0 for a free one) or host",
                              getattr(exc, "errno", None)) from exc
        try:
            self.worker = ucx_call(ucx.Worker, error_handling)
            self.worker.start_progress_thread()
            try:
                self.pool = BufferPool(self.worker, pool_bytes, device)
            except BaseException:
                self.worker.stop_progress_thread()
                raise
        except BaseException:
            self._sock.close()
            raise
        self._rkey = self.pool.region.packed_rkey()
        self._requests: dict[int, IncomingKV] = {}
        self._failed: collections.OrderedDict[int, BaseException] = collections.OrderedDict()
        self._discarded: collections.OrderedDict[int, None] = collections.OrderedDict()
        # ids whose request was handed out (or discarded when complete) and released: wait()
        # and incoming() say so at once instead of waiting for a request that is over
        self._ended: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        # complete, not yet handed out, in completion order (wait() and discard() take theirs
        # out, so nothing piles up when only wait() is used)
        self._completed: collections.deque[IncomingKV] = collections.deque()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._connections: set[socket.socket] = set()
        self._handshaking = 0
        self._acks_pending = 0  # requests delivered whose ACK is not sent yet (close() waits)
        self._writers = 0  # requests whose sender may still PUT into the pool (close() waits)
        self._orphaned = 0  # slices kept out of the pool for good: their request ended without
        #                     the sender confirming it stopped writing (close() quarantines)
        self._threads: set[threading.Thread] = set()  # connection threads still running
        self._wakeup_r, self._wakeup_w = os.pipe()  # close() makes it readable
        self._wakeup_to_last_thread = False  # close() left the pipe to the last thread to end
        self.host, self.port = self._sock.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept_loop, name="tkv-accept", daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------------ consumer API
    def recv(self, timeout: float | None = None) -> ReceivedKV:
        """The next completed request not yet handed out (in completion order);
        TransferTimeout if none in time, TransferError once the receiver is closed."""
        timeout = wait_arg(timeout)
        with self._changed:
            if not self._changed.wait_for(lambda: self._completed or self._closed, timeout):
                raise TransferTimeout(f"no KV message completed within {timeout:g} s")
            if not self._completed:
                raise TransferError("receiver closed")
            incoming = self._completed.popleft()
            incoming.claimed = True
        return ReceivedKV(incoming, self)

    def incoming(self, request_id: int, timeout: float | None = None) -> IncomingKV:
        """The request ``request_id`` once its header was accepted (layers may still arrive).
        Raises the request's error if it failed, TransferError at once if it was already
        handed out and released, RequestRejected if it was discarded before it started.
        TypeError / ValueError at once for an id that is not an int in [0, 2**64)."""
        request_id = request_id_arg(request_id)
        timeout = wait_arg(timeout)
        with self._changed:
            if not self._changed.wait_for(
                    lambda: self._closed or self._known(request_id), timeout):
                raise TransferTimeout(f"request {request_id} did not start within {timeout:g} s")
            if request_id in self._requests:
                return self._requests[request_id]
            if request_id in self._failed:
                raise self._failed[request_id]
            if request_id in self._ended:
                raise TransferError(f"request {request_id} was already handed out (by recv() "
                                    "or wait()) or discarded, and released")
            if request_id in self._discarded:
                raise RequestRejected(f"request {request_id} was discarded")
            raise TransferError("receiver closed")

    def _known(self, request_id: int) -> bool:
        """Whether the receiver knows something of ``request_id`` (under the lock)."""
        return any(request_id in table for table in (
            self._requests, self._failed, self._ended, self._discarded))

    def wait(self, request_id: int, timeout: float | None = None) -> ReceivedKV:
        """Block until request ``request_id`` is complete and verified; raise its error if not
        (a TransferError: RequestRejected for a bad checksum or a discarded request,
        ConnectionClosed / TransferTimeout for a sender that died or stalled)."""
        request_id = request_id_arg(request_id)
        timeout = wait_arg(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        incoming = self.incoming(request_id, timeout)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        with incoming._cond:
            if not incoming._cond.wait_for(lambda: incoming.done or incoming.error, left):
                raise TransferTimeout(f"request {request_id} not complete within {timeout:g} s")
            if incoming.error:
                raise incoming.error
        with self._lock:
            if incoming.claimed or incoming.released:
                raise TransferError(f"request {request_id} was already handed out (by recv() "
                                    "or wait()) or discarded")
            incoming.claimed = True
            self._take(incoming)
        return ReceivedKV(incoming, self)

    def _take(self, incoming: IncomingKV) -> None:
        """Remove ``incoming`` from the not-yet-handed-out list (under the lock)."""
        try:
            self._completed.remove(incoming)
        except ValueError:
            pass

    def discard(self, request_id: int) -> None:
        """Drop request ``request_id``'s KV, whatever its state: complete and not yet handed
        out -> its slice is released now; still arriving -> the sender is told to stop at its
        next notice (``RequestRejected`` there) and the slice released once it has, never
        delivered (:meth:`wait` raises); not started (or already released) -> a later BEGIN
        with this id is refused (``RequestRejected``). Idempotent; a request already handed
        out is left to its holder's :meth:`ReceivedKV.release`, a failed one needs nothing."""
        request_id = request_id_arg(request_id)
        release = None
        with self._lock:
            incoming = self._requests.get(request_id)
            if incoming is None:
                if request_id in self._failed:
                    return  # failed already: nothing held, and its id stays reusable
                self._discarded[request_id] = None
                while len(self._discarded) > DISCARD_MEMORY:
                    self._discarded.popitem(last=False)
                self._changed.notify_all()  # a wait() for it raises now
                return
            if incoming.claimed:
                return
            if incoming.done:
                incoming.claimed = True
                self._take(incoming)
                release = incoming
            else:
                incoming.discard = True
        if release is not None:
            self._forget(release)
        else:
            incoming._update(error=RequestRejected(f"request {request_id} was discarded"))

    def close(self) -> None:
        """Stop listening, drop connections, unregister and free the pool.

        The ACK of a request already delivered (``wait()`` / ``recv()`` returned it) is sent
        first, so its sender learns it arrived. A sender with a request still arriving is told
        the receiver is closing and stops before its next PUT; the pool is freed once every
        such sender confirmed it stopped (an ABORT, or its connection ending), waiting at most
        about ``timeout`` for them (all in all close() takes at most about 2 x ``timeout`` + 4
        s). A sender that does not answer in time (a stream paused between layers, a stalled
        peer), or one whose PUT timed out (UCX does not cancel it), might still write into the
        pool, so its memory is then kept allocated for the life of the process
        (:func:`quarantined_pools`, with a warning) rather than freed: finish or abort streams
        before closing their receiver. Otherwise the pool's memory goes once no request
        delivered before the close still holds a view of it, even while this object lives on."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        os.write(self._wakeup_w, b"x")  # wakes every connection's poll (it stays readable)
        with self._lock:
            self._changed.wait_for(lambda: self._acks_pending == 0, self.timeout)
            # each sender's connection thread gives up on it ``timeout`` after the wake-up
            self._changed.wait_for(lambda: self._writers == 0, self.timeout + 0.5)
            writers = self._writers + self._orphaned
            conns = list(self._connections)
            threads = list(self._threads)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self._sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(timeout=2)
        self.worker.stop_progress_thread()
        self.pool.close()
        if writers:
            with _QUARANTINE_LOCK:
                _QUARANTINED.append(self.pool.tensor)
            log.warning("receiver %s:%d closed while %d sender(s) had not confirmed they stopped "
                        "writing: its %d-byte pool is kept allocated for the life of the "
                        "process", self.host, self.port, writers, self.pool.nbytes)
        # The pool's memory goes with the last view of it (requests delivered before the
        # close keep theirs), not with this object: a closed receiver kept alive by a
        # reference would otherwise hold the whole pool.
        self.pool.tensor = self.pool.tensor.new_empty(0)
        deadline = time.monotonic() + 2.0
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:  # a thread still running may still poll the pipe: the last one closes it
            self._wakeup_to_last_thread = bool(self._threads)
            if self._wakeup_to_last_thread:
                return
        self._close_wakeup()

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _close_wakeup(self) -> None:
        """Close the wake-up pipe: once no connection thread can poll it any more."""
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)

    def _forget(self, incoming: IncomingKV) -> None:
        """Forget ``incoming`` and give its slice back, once (later calls do nothing). A slice
        its sender may still write into (``incoming.writing``) stays out of the pool."""
        with self._lock:
            if incoming.released:
                return
            incoming.released = True
            if self._requests.get(incoming.request_id) is incoming:
                del self._requests[incoming.request_id]
                if incoming.claimed:  # handed out (or discarded complete): wait() says so
                    self._ended[incoming.request_id] = None
                    while len(self._ended) > DISCARD_MEMORY:
                        self._ended.popitem(last=False)
            if incoming.writing:
                log.warning("request %d: its %d-byte slice stays out of the pool (the sender "
                            "did not confirm it stopped writing there)", incoming.request_id,
                            incoming.slice.nbytes)
                return
        self.pool.release(incoming.slice)

    def _sender_stopped(self, incoming: IncomingKV) -> None:
        """The sender of ``incoming`` writes no more into its slice (it committed or aborted,
        or its connection ended: a sender shuts it only between PUTs, or died)."""
        with self._lock:
            if incoming.writing:
                incoming.writing = False
                self._writers -= 1
                self._changed.notify_all()

    def _orphan_if_writing(self, incoming: IncomingKV) -> None:
        """``incoming``'s request is over on this side but its sender never confirmed it stopped
        writing: its slice stays out of the pool for good (``_forget``), and close() keeps the
        pool allocated instead of waiting for a confirmation that cannot come any more."""
        with self._lock:
            if incoming.writing and not incoming.orphaned:
                incoming.orphaned = True
                self._writers -= 1
                self._orphaned += 1
                self._changed.notify_all()

    def _readable(self, conn: socket.socket, timeout: float, wake: bool = True) -> bool:
        """Wait up to ``timeout`` s for ``conn`` to have data (or hang up): True; False on
        timeout, or (``wake``) at once once the receiver is closing (callers check
        ``_closed``; a caller that loops after that passes ``wake=False``: the wake-up pipe
        stays readable, polling it would spin)."""
        poller = select.poll()  # not select(): it fails on descriptors >= 1024
        poller.register(conn, select.POLLIN | select.POLLPRI)
        if wake:
            poller.register(self._wakeup_r, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:  # poll() takes at most MAX_POLL_MS (~24.8 days); timeouts go to 1e9 s
            ms = min(MAX_POLL_MS, max(0, int((deadline - time.monotonic()) * 1000)))
            events = poller.poll(ms)
            if events or ms < MAX_POLL_MS:
                return any(fd == conn.fileno() for fd, _ in events)

    def _fail(self, incoming: IncomingKV, error: BaseException,
              level: int = logging.WARNING) -> None:
        """Mark ``incoming`` failed (waiters get ``error``; its id becomes reusable). Its slice
        stays allocated: the caller releases it (:meth:`_forget`) once the sender can no longer
        write into it."""
        log.log(level, "request %d from %s failed: %s", incoming.request_id, incoming.peer,
                error)
        incoming._update(error=error)
        with self._lock:
            if self._requests.get(incoming.request_id) is incoming:
                del self._requests[incoming.request_id]
            self._record_failure(incoming.request_id, error)

    def _record_failure(self, request_id: int, error: BaseException) -> None:
        """Remember ``error`` for wait() / incoming() of ``request_id`` (the latest 1024;
        under the lock)."""
        self._failed[request_id] = error
        while len(self._failed) > 1024:
            self._failed.popitem(last=False)
        self._changed.notify_all()

    def _hold_until_sender_stops(self, conn: socket.socket, incoming: IncomingKV,
                                 kind: Kind, reason: str) -> bool:
        """After a failure the sender may not know about yet: tell it (``kind``: ACK ok=false
        for a rejection, the connection stays usable; ERROR when giving up on it), then keep
        the request's slice until it stops writing -- its COMMIT or ABORT, or the connection
        closing -- so a late PUT never lands in memory another request has been given. Once
        the receiver is closing, wait at most ``timeout`` more (then the slice, and the pool,
        stay allocated: see :meth:`close`). True when the sender stopped cleanly (the
        connection may carry the next request)."""
        meta = {"ok": False} if kind == Kind.ACK else {"request_id": incoming.request_id}
        try:
            channel.send(conn, kind, {**meta, "reason": reason}, timeout=min(self.timeout, 1.0))
            give_up = None
            while True:
                if self._closed and give_up is None:
                    give_up = time.monotonic() + self.timeout
                wait = IDLE_POLL_S if give_up is None else give_up - time.monotonic()
                if wait <= 0:
                    return False  # closing, and the sender never answered
                if not self._readable(conn, wait, wake=give_up is None):
                    continue
                try:
                    msg = channel.receive(conn, timeout=self.timeout,
                                          what=f"the end of failed request {incoming.request_id}")
                except TransferTimeout:
                    continue  # still stalled: keep holding
                if msg.kind in (Kind.COMMIT, Kind.ABORT) or msg.meta.get("commit"):
                    if _may_still_write(msg):
                        return False
                    self._sender_stopped(incoming)
                    return True
        except ConnectionClosed:
            self._sender_stopped(incoming)  # connection gone: nothing can write any more
            return False
        except TransferError:
            return False
        finally:
            self._forget(incoming)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}"
            thread = threading.Thread(target=self._serve, args=(conn, peer),
                                      name=f"tkv-peer-{peer}", daemon=True)
            with self._lock:  # registered with the check: close() then sees every thread
                if self._closed:
                    conn.close()
                    return
                if self._handshaking >= MAX_UNAUTHENTICATED:  # a flood of silent peers
                    log.warning("turned away %s:%s: %d connections already in the handshake",
                                addr[0], addr[1], self._handshaking)
                    conn.close()
                    continue
                self._handshaking += 1
                self._connections.add(conn)
                self._threads.add(thread)
            thread.start()

    def _handshake(self, conn: socket.socket) -> None:
        server_nonce = auth.new_nonce()
        channel.send(conn, Kind.HELLO, {"version": PROTOCOL_VERSION, "nonce": server_nonce.hex()},
                     timeout=self.timeout)
        msg = channel.expect(channel.receive(conn, timeout=self.timeout, what="authentication",
                                             max_frame=channel.PRE_AUTH_MAX_FRAME), Kind.AUTH)
        try:
            client_nonce = bytes.fromhex(str(msg.meta.get("nonce", "")))
            presented = bytes.fromhex(str(msg.meta.get("proof", "")))
        except ValueError:
            client_nonce = presented = b""
        if len(client_nonce) != auth.NONCE_BYTES or not auth.verify(
                self._token, "client", server_nonce, client_nonce, presented):
            channel.send(conn, Kind.ERROR, {"reason": "authentication failed"},
                         timeout=self.timeout)
            raise AuthenticationError("peer failed authentication")
        address = self.worker.address()
        channel.send(conn, Kind.WELCOME, {
            "proof": auth.proof(self._token, "server", server_nonce, client_nonce).hex(),
            "pool_address": self.pool.address, "pool_nbytes": self.pool.nbytes,
            "address_bytes": len(address), "memory_type": self.pool.memory_type,
            "max_payload_bytes": self.limits.max_payload_bytes,
        }, address + self._rkey, timeout=self.timeout)

    def _wait_while_idle(self, conn: socket.socket) -> bool:
        """Block until the peer sends something (or hangs up): an idle connection never times
        out. False once the receiver is closed."""
        while not self._closed:
            if self._readable(conn, IDLE_POLL_S):
                return True  # data, or a hang-up / error that the next read reports
        return False

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            try:
                self._handshake(conn)
            finally:
                with self._lock:
                    self._handshaking -= 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished host
            while self._wait_while_idle(conn):
                # a request has started: from here on the peer must keep up (timeout)
                msg = channel.receive(conn, timeout=self.timeout, what="BEGIN")
                if msg.kind != Kind.BEGIN:
                    raise TransferError(f"protocol error: expected BEGIN, got {msg.kind.name}")
                self._receive_request(conn, peer, msg)
        except AuthenticationError as exc:
            log.warning("refused %s: %s", peer, exc)
        except (TransferError, OSError) as exc:
            if not self._closed:
                log.info("connection %s closed: %s", peer, exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
                last = self._wakeup_to_last_thread and not self._threads
            conn.close()
            if last:  # close() returned before this thread ended
                self._close_wakeup()

    def _begin(self, conn: socket.socket, peer: str, msg: channel.Message) -> IncomingKV | None:
        """Validate the header and grant a slice; None (after telling the sender) if refused."""
        try:
            header = decode_header(msg.blob, limits=self.limits)
            with self._lock:
                if self._closed:
                    raise RequestRejected("the receiver is closing")
                if header.request_id in self._requests:
                    raise RequestRejected(f"request id {header.request_id} is already in use")
                if header.request_id in self._discarded:
                    del self._discarded[header.request_id]
                    self._record_failure(header.request_id, RequestRejected(
                        f"request {header.request_id} was discarded by the receiver"))
                    raise self._failed[header.request_id]
                piece = self.pool.allocate(header.payload_length)
                incoming = IncomingKV(header, piece, peer, writing=True)  # once it has the
                self._writers += 1  # GRANT (below), the sender may write
                self._failed.pop(header.request_id, None)
                self._ended.pop(header.request_id, None)
                self._requests[header.request_id] = incoming
                self._changed.notify_all()
        except (KVMessageError, RequestRejected) as exc:
            # code "pool_full": no room now, retrying later may work (PoolFull on the sender)
            code = "pool_full" if isinstance(exc, PoolFull) else "rejected"
            channel.send(conn, Kind.GRANT, {"ok": False, "code": code, "reason": str(exc)},
                         timeout=self.timeout)
            return None
        try:
            channel.send(conn, Kind.GRANT, {"ok": True, "offset": piece.offset},
                         timeout=self.timeout)
        except TransferError as exc:  # the sender never learnt the offset: nothing was written
            self._sender_stopped(incoming)
            self._fail(incoming, exc)
            self._forget(incoming)
            raise
        return incoming

    def _receive_request(self, conn: socket.socket, peer: str, begin: channel.Message) -> None:
        incoming = self._begin(conn, peer, begin)
        if incoming is None:
            return
        try:
            self._receive_granted(conn, incoming)
        finally:
            self._orphan_if_writing(incoming)

    def _receive_granted(self, conn: socket.socket, incoming: IncomingKV) -> None:
        """The rest of a request after its GRANT: notices, checks, delivery or failure."""
        header = incoming.header
        running, committing = 0, False
        try:
            while True:
                if self._closed:  # tell the sender to stop before its next PUT
                    raise TransferError(f"the receiver is closing: request "
                                        f"{header.request_id} was not complete")
                if not self._readable(conn, self.timeout):
                    if self._closed:
                        continue
                    raise TransferTimeout(f"no progress on request {header.request_id} from "
                                          "the peer within the timeout")
                msg = channel.receive(conn, timeout=self.timeout,
                                      what=f"progress on request {header.request_id}")
                committing = msg.kind == Kind.COMMIT or bool(msg.meta.get("commit"))
                if committing or (msg.kind == Kind.ABORT and not _may_still_write(msg)):
                    self._sender_stopped(incoming)  # it wrote its last byte before this
                if incoming.discard and msg.kind != Kind.ABORT:  # stop its PUTs early
                    raise RequestRejected(f"request {header.request_id} was discarded by the "
                                          "receiver")
                if msg.kind == Kind.PROGRESS:
                    continue
                if msg.kind == Kind.ABORT:
                    self._fail(incoming, TransferError(
                        f"sender aborted request {header.request_id}: "
                        f"{msg.meta.get('reason', '')}"), logging.INFO)  # its own choice
                    self._forget(incoming)  # the sender stopped writing before its ABORT
                    return
                if msg.kind == Kind.LAYER:
                    running = self._verify_layers(incoming, msg, running)
                    if not msg.meta.get("commit"):
                        continue
                    claimed = running
                else:
                    channel.expect(msg, Kind.COMMIT)
                    claimed = channel.meta_int(msg, "payload_crc", 0, 0xFFFFFFFF)
                if incoming.layers_ready != header.layers:
                    raise RequestRejected(f"request {header.request_id} committed with "
                                          f"{incoming.layers_ready}/{header.layers} layers")
                if claimed != running or (not header.streamed and header.payload_crc != running):
                    raise RequestRejected(f"request {header.request_id}: payload checksum "
                                          "mismatch")
                incoming.seconds = time.perf_counter() - incoming.started
                with self._lock:
                    discard = incoming.discard
                    if not discard:
                        incoming.done = True
                        self._completed.append(incoming)
                        self._acks_pending += 1  # close() lets this ACK go out first
                        self._changed.notify_all()
                if discard:  # nobody wants it: the sender still hears it arrived intact
                    self._forget(incoming)
                    channel.send(conn, Kind.ACK, {"ok": True}, timeout=self.timeout)
                    return
                try:
                    incoming._update()  # wake wait() and wait_layer()
                    channel.send(conn, Kind.ACK, {"ok": True}, timeout=self.timeout)
                finally:
                    with self._lock:
                        self._acks_pending -= 1
                        self._changed.notify_all()
                return
        except RequestRejected as exc:
            self._fail(incoming, exc)
            if committing:  # the sender is done writing
                self._forget(incoming)
                channel.send(conn, Kind.ACK, {"ok": False, "reason": str(exc)},
                             timeout=self.timeout)
            elif not self._hold_until_sender_stops(conn, incoming, Kind.ACK, str(exc)):
                raise TransferError(f"request {header.request_id} rejected mid-transfer; the "
                                    "sender did not stop cleanly") from None
        except ConnectionClosed as exc:
            if incoming.done:  # delivered (maybe handed out already); only the ACK was lost
                raise
            self._sender_stopped(incoming)  # the sender is gone: nothing writes any more
            self._fail(incoming, exc)
            self._forget(incoming)
            raise
        except (TransferError, OSError) as exc:  # stalled past the timeout, protocol error
            if incoming.done:
                raise
            err = exc if isinstance(exc, TransferError) else TransferError(str(exc))
            self._fail(incoming, err)
            if committing:  # the sender is done writing and waits for its ACK
                self._forget(incoming)
                try:
                    channel.send(conn, Kind.ERROR, {"reason": str(err)},
                                 timeout=min(self.timeout, 1.0))
                except TransferError:
                    pass
            else:
                self._hold_until_sender_stops(conn, incoming, Kind.ERROR, str(err))
            raise err from None

    @staticmethod
    def _verify_layers(incoming: IncomingKV, msg: channel.Message, running: int) -> int:
        """Check a LAYER notice (layers ``index..`` with their running CRCs) against the bytes
        in the pool; mark them readable. Returns the running CRC after the last of them."""
        header, layer_n = incoming.header, incoming.header.layer_nbytes()
        first = channel.meta_int(msg, "index", 0, header.layers - 1)
        crcs = msg.meta.get("crcs")
        if (first != incoming.layers_ready or not isinstance(crcs, list) or not crcs
                or first + len(crcs) > header.layers):
            raise TransferError(f"request {header.request_id}: bad LAYER notice (index {first}, "
                                f"expected {incoming.layers_ready})")
        # A group of layers is checksummed at once, its layers in parallel when this notice
        # commits (the sender is idle then; before, it is PUTting on the other core). On the
        # GPU for a CUDA pool (thunderkv.transfer.checksum).
        view = incoming.slice.view[first * layer_n:(first + len(crcs)) * layer_n]
        threads = 0 if msg.meta.get("commit") else 1
        got = crc32c_running(view, layer_n, len(crcs), running, threads=threads)
        for i, (claimed, crc) in enumerate(zip(crcs, got), start=first):
            if crc != claimed:
                raise RequestRejected(f"request {header.request_id}: checksum mismatch in "
                                      f"layer {i}")
            incoming._update(layers_ready=i + 1)
        return got[-1]
