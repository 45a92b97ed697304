"""Request and connection lifecycle of thunderkv.transfer: hand-out once, discard, no write
into memory a failed request gave back, broken senders, close() under load, bad arguments."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
import transfer_peers as peers

from thunderkv.transfer import (
    KVReceiver,
    KVSender,
    RequestRejected,
    TransferError,
    TransferTimeout,
    unavailable_reason,
)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"UCX transfer unavailable: {unavailable_reason()}")


@pytest.fixture
def receiver():
    rx = KVReceiver(1 << 26, token=peers.TOKEN, timeout=5.0)
    yield rx
    rx.close()


def _send(rx: KVReceiver, request_id: int, tokens: int = 64) -> None:
    header = peers.raw_header(request_id, tokens)
    with KVSender(rx.host, rx.port, token=peers.TOKEN) as tx:
        tx.send(header, peers.payload_for(request_id, header.payload_length))


def _send_on(tx: KVSender, request_id: int, tokens: int = 64) -> None:
    header = peers.raw_header(request_id, tokens)
    tx.send(header, peers.payload_for(request_id, header.payload_length))


def test_a_request_is_handed_out_once_and_released_once(receiver):
    _send(receiver, 1)
    _send(receiver, 2)
    first = receiver.wait(1, timeout=5)
    with pytest.raises(TransferError, match="already handed out"):
        receiver.wait(1, timeout=5)
    second = receiver.recv(timeout=5)  # request 1 was taken by wait(): recv() skips it
    assert second.request_id == 2
    with pytest.raises(TransferTimeout):
        receiver.recv(timeout=0.2)
    first.release()
    first.release()  # a second release is a no-op, not a double free
    _send(receiver, 3)  # may land where request 1 was
    third = receiver.wait(3, timeout=5)
    assert torch.equal(second.buffer, peers.payload_for(2, second.header.payload_length))
    assert torch.equal(third.buffer, peers.payload_for(3, third.header.payload_length))
    second.release()
    third.release()
    assert receiver.pool.free_bytes() == receiver.pool.nbytes


@pytest.mark.parametrize("end", ["recv", "wait", "discard"])
def test_waiting_for_a_request_that_is_over_raises_at_once(receiver, end):
    """A request handed out (or discarded) and released is not waited for until the timeout
    (without one: for ever) as if it had not started: wait() and incoming() say it is over."""
    _send(receiver, 1)
    if end == "discard":
        receiver.discard(1)  # complete, not handed out: released now
    else:
        (receiver.recv(timeout=5) if end == "recv" else receiver.wait(1, timeout=5)).release()
    for call in (receiver.wait, receiver.incoming):
        with pytest.raises(TransferError, match="already handed out") as caught:
            call(1, timeout=5)
        assert not isinstance(caught.value, TransferTimeout)
    _send(receiver, 1)  # the id may be used again
    receiver.wait(1, timeout=5).release()


def test_waiting_for_a_request_discarded_before_it_started_raises_at_once(receiver):
    receiver.discard(5)
    for call in (receiver.wait, receiver.incoming):
        with pytest.raises(RequestRejected, match="request 5 was discarded"):
            call(5, timeout=5)
    with pytest.raises(RequestRejected, match="discarded"):
        _send(receiver, 5)  # its BEGIN is refused ...
    with pytest.raises(RequestRejected, match="discarded"):
        receiver.wait(5, timeout=5)  # ... and wait() still says why


def test_a_layer_is_not_readable_before_it_arrived_and_verified(receiver):
    """IncomingKV.layer() must not hand out views of bytes not yet checked (not yet PUT)."""
    header = peers.raw_header(1, 64)
    payload = peers.payload_for(1, header.payload_length)
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        with tx.stream(header, payload) as stream:
            stream.send_layer(0)
            incoming = receiver.incoming(1, timeout=5)
            incoming.wait_layer(0, timeout=5)
            with pytest.raises(TransferError, match="layer 1 has not arrived"):
                incoming.layer(1)
            assert incoming.layer(0).keys() == {"key_residual", "value_residual"}
            stream.send_layer(1)
            views = incoming.wait_layer(1, timeout=5)
            assert views["key_residual"].data_ptr() == incoming.layer(1)["key_residual"].data_ptr()
            assert torch.equal(incoming.buffer, payload)
            stream.finish()
    receiver.wait(1, timeout=5).release()


def test_discard_in_every_state(receiver):
    # complete, not handed out: released now, never delivered
    _send(receiver, 10)
    receiver.discard(10)
    assert receiver.pool.free_bytes() == receiver.pool.nbytes
    with pytest.raises(TransferTimeout):
        receiver.recv(timeout=0.2)
    # not started yet: its BEGIN is refused (a clean refusal: the connection stays usable)
    receiver.discard(11)
    header = peers.raw_header(11, 64)
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        with pytest.raises(RequestRejected, match="discarded"):
            tx.send(header, peers.payload_for(11, header.payload_length))
        assert not tx.broken
        tx.send(header, peers.payload_for(11, header.payload_length))  # the id is free again
        receiver.wait(11, timeout=5).release()
        # still arriving: never delivered; the sender is told at its next notice and stops,
        # then the slice is released (a clean refusal: the connection stays usable)
        header = peers.raw_header(12, 64)
        stream = tx.stream(header, peers.payload_for(12, header.payload_length))
        stream.send_layer(0)
        receiver.incoming(12, timeout=5)
        receiver.discard(12)
        with pytest.raises(TransferError, match="discarded"):
            receiver.wait(12, timeout=5)
        stream.send_layer(1)
        with pytest.raises(RequestRejected, match="discarded"):
            stream.finish()
        assert not tx.broken
    deadline = time.monotonic() + 5
    while receiver.pool.free_bytes() != receiver.pool.nbytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver.pool.free_bytes() == receiver.pool.nbytes
    receiver.discard(12)  # idempotent


def test_a_stalled_sender_never_writes_into_memory_given_to_another_request():
    """The receiver gives up on a stalled request after its timeout but keeps the slice until
    the sender stops: the stalled sender, waking up, is told before its next PUT; another
    request meanwhile gets other memory, and its bytes never change."""
    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=0.5)
    try:
        slow_header = peers.raw_header(1, 512)  # 2 layers of 256 KiB
        slow = KVSender(rx.host, rx.port, token=peers.TOKEN)
        stream = slow.stream(slow_header, peers.payload_for(1, slow_header.payload_length))
        stream.send_layer(0)
        with pytest.raises(TransferTimeout):
            rx.wait(1, timeout=5)  # the receiver gave up on it
        held = rx.pool.nbytes - rx.pool.free_bytes()
        assert held >= slow_header.payload_length  # ... but still holds its slice
        _send(rx, 2, 512)
        other = rx.wait(2, timeout=5)
        before = other.buffer.clone()
        with pytest.raises(TransferError, match="no progress|timeout|within"):
            stream.send_layer(1)  # woken up: refused before it PUTs anything
        assert slow.broken
        with pytest.raises(TransferError, match="open a new KVSender"):
            slow.send(slow_header, peers.payload_for(1, slow_header.payload_length))
        assert torch.equal(other.buffer, before)
        slow.close()
        other.release()
        deadline = time.monotonic() + 5
        while rx.pool.free_bytes() != rx.pool.nbytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx.pool.free_bytes() == rx.pool.nbytes  # the slice came back once it stopped
    finally:
        rx.close()


def test_misuse_of_a_sender_fails_clearly(receiver):
    header = peers.raw_header(20, 64)
    payload = peers.payload_for(20, header.payload_length)
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        with pytest.raises(TransferError, match="without finish"):
            with tx.stream(header, payload) as stream:
                stream.send_layer(0)
        with pytest.raises(TransferError, match="without finish"):
            with tx.stream(header, payload):
                with pytest.raises(TransferError, match="already open"):
                    tx.stream(peers.raw_header(21, 64), payload)  # same thread: no deadlock
        # after both, the connection still carries a request
        tx.send(header, payload)
    receiver.wait(20, timeout=5).release()


def test_close_while_another_thread_sends_fails_that_send_cleanly(receiver):
    header = peers.raw_header(30, 32768)  # 32 MiB
    for _ in range(3):
        tx = KVSender(receiver.host, receiver.port, token=peers.TOKEN, chunk_bytes=1 << 20)
        worker, errors = _send_in_thread(tx, header)
        time.sleep(0.005)
        tx.close()
        worker.join(30)
        assert not worker.is_alive()
        assert tx.broken
        try:
            receiver.wait(30, timeout=5).release()  # it may have finished before the close
        except TransferError:
            assert errors


def test_closing_a_receiver_stops_its_listener():
    rx = KVReceiver(1 << 20, token=peers.TOKEN)
    host, port = rx.host, rx.port
    t0 = time.monotonic()
    rx.close()
    assert time.monotonic() - t0 < 1.5
    assert not rx._acceptor.is_alive()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()
    with pytest.raises(TransferError, match="closed"):
        rx.recv(timeout=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout": 0}, "timeout"), ({"timeout": -1}, "timeout"),
    ({"chunk_bytes": 0}, "chunk_bytes"), ({"chunk_bytes": -1}, "chunk_bytes")])
def test_bad_sender_arguments_are_refused(receiver, kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVSender(receiver.host, receiver.port, token=peers.TOKEN, **kwargs)


def test_the_longest_accepted_timeout_still_carries_requests():
    """Timeouts up to 1e9 s are accepted; one past what poll() takes (~24.8 days) must not
    kill the connection thread with an OverflowError and fail every request."""
    with KVReceiver(1 << 20, token=peers.TOKEN, timeout=1e9) as rx:
        with KVSender(rx.host, rx.port, token=peers.TOKEN, timeout=1e9) as tx:
            _send_on(tx, 1)
            rx.wait(1, timeout=10).release()
            header = peers.raw_header(2, 64)
            with tx.stream(header, peers.payload_for(2, header.payload_length)) as stream:
                stream.send_layer(0)
                stream.send_layer(1)
                stream.finish()
        rx.wait(2, timeout=10).release()


@pytest.mark.parametrize("timeout", [0, -1])
def test_bad_receiver_timeout_is_refused(timeout):
    with pytest.raises(ValueError, match="timeout"):
        KVReceiver(1 << 20, token=peers.TOKEN, timeout=timeout)


def test_a_flood_of_silent_connections_is_capped_and_then_recovers():
    """Peers that connect and never authenticate hold at most MAX_UNAUTHENTICATED handshake
    threads; the rest are turned away at once, and once the silent ones time out a real
    sender gets through."""
    from thunderkv.transfer.receiver import MAX_UNAUTHENTICATED

    rx = KVReceiver(1 << 20, token=peers.TOKEN, timeout=1.0)
    socks = []
    try:
        for _ in range(MAX_UNAUTHENTICATED + 8):
            socks.append(socket.create_connection((rx.host, rx.port), timeout=5))
        turned_away = 0
        for s in socks:
            s.settimeout(5)
            turned_away += s.recv(1) == b""  # closed before any HELLO
        assert turned_away >= 8
        assert rx._handshaking <= MAX_UNAUTHENTICATED
        time.sleep(1.5)  # the silent handshakes time out
        _send(rx, 1, 8)
        rx.wait(1, timeout=5).release()
    finally:
        for s in socks:
            s.close()
        rx.close()


def test_an_unreadable_token_file_is_a_clear_error(monkeypatch, tmp_path):
    from thunderkv.transfer import auth

    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    monkeypatch.setenv(auth.TOKEN_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot be read"):
        auth.load_token()


def test_a_bad_commit_notice_frees_the_slice_at_once(receiver):
    """A malformed committing notice fails the request; the sender has stopped writing (it
    committed), so the slice comes back without waiting for the sender to close."""
    from thunderkv.transfer import channel
    from thunderkv.transfer.channel import Kind

    header = peers.raw_header(40, 64)
    tx = KVSender(receiver.host, receiver.port, token=peers.TOKEN)
    try:
        stream = tx.stream(header, peers.payload_for(40, header.payload_length))
        for i in range(header.layers - 1):
            stream.send_layer(i)
        channel.send(tx._sock, Kind.LAYER, {"index": header.layers - 1, "crcs": "x",
                                            "commit": True}, timeout=2)
        stream._commit_sent, stream._next_layer = True, header.layers
        with pytest.raises(TransferError, match="bad LAYER notice"):
            stream.finish()
        deadline = time.monotonic() + 2
        while receiver.pool.free_bytes() != receiver.pool.nbytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert receiver.pool.free_bytes() == receiver.pool.nbytes  # the sender is still open
    finally:
        tx.close()


def test_an_idle_connection_is_kept_however_long_it_idles(monkeypatch):
    """Between requests a connection may idle for ever (here many times IDLE_POLL_S, the
    period at which an idle connection re-checks for close, and the timeout): only a request
    in progress has to keep up with the timeout."""
    import thunderkv.transfer.receiver as receiver_module

    monkeypatch.setattr(receiver_module, "IDLE_POLL_S", 0.1)
    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=0.3)
    try:
        with KVSender(rx.host, rx.port, token=peers.TOKEN, timeout=0.3) as tx:
            for request_id in (1, 2):
                _send_on(tx, request_id)
                rx.wait(request_id, timeout=5).release()
                time.sleep(1.0)  # idle: nothing in flight
            assert not tx.broken
            assert len(rx._connections) == 1
    finally:
        rx.close()


def test_an_incoming_request_is_unreadable_once_released(receiver):
    """A kept IncomingKV must not show whatever the pool holds after its release (another
    request's bytes): it raises, as ReceivedKV does."""
    _send(receiver, 1)
    incoming = receiver.incoming(1, timeout=5)
    got = receiver.wait(1, timeout=5)
    assert torch.equal(incoming.buffer, got.buffer)
    assert incoming.wait_layer(0, timeout=1).keys() == got.layer(0).keys()
    got.release()
    _send(receiver, 2)  # may land where request 1 was
    for read in (lambda: incoming.buffer, lambda: incoming.layer(0),
                 lambda: incoming.wait_layer(0, timeout=1)):
        with pytest.raises(TransferError, match="request 1 was released"):
            read()
    second = receiver.wait(2, timeout=5)
    assert torch.equal(second.buffer, peers.payload_for(2, second.header.payload_length))
    second.release()


def test_a_thread_with_a_request_open_gets_an_error_not_a_deadlock(receiver):
    """unregister() and a second KVStream on the thread that holds the sender's (non-reentrant)
    lock raise TransferError; the open request still completes afterwards."""
    from thunderkv.transfer import KVStream

    header = peers.raw_header(50, 64)
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        pool, other = tx.register(header.payload_length), tx.register(4096)
        payload = pool.allocate(header.payload_length).view
        payload.copy_(peers.payload_for(50, header.payload_length))
        outcome: list = []

        def run():
            try:
                stream = tx.stream(header, payload)
                stream.send_layer(0)
                for attempt in (lambda: tx.unregister(other),
                                lambda: KVStream(tx, peers.raw_header(51, 64), payload)):
                    try:
                        attempt()
                        outcome.append("returned")
                    except TransferError as exc:
                        outcome.append(str(exc))
                stream.send_layer(1)
                stream.finish()
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "deadlocked on the sender's lock"
        assert len(outcome) == 2, outcome
        assert all(isinstance(o, str) and "already open on this sender in this thread" in o
                   for o in outcome), outcome
        tx.unregister(other)  # the request is finished: now it works
    got = receiver.wait(50, timeout=5)
    assert torch.equal(got.buffer, peers.payload_for(50, header.payload_length))
    got.release()


def test_closing_the_receiver_right_after_wait_still_acknowledges(monkeypatch):
    """wait() returned, so the request arrived: its sender must hear so even when the receiver
    closes at once (the ACK is held back 0.3 s here to widen that window)."""
    from thunderkv.transfer import channel
    from thunderkv.transfer.channel import Kind

    real_send = channel.send

    def slow_ack(sock, kind, *args, **kwargs):
        if kind == Kind.ACK and threading.current_thread().name.startswith("tkv-peer"):
            time.sleep(0.3)
        return real_send(sock, kind, *args, **kwargs)

    monkeypatch.setattr(channel, "send", slow_ack)
    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=2.0)
    tx = KVSender(rx.host, rx.port, token=peers.TOKEN, timeout=2.0)
    outcome: list = []

    def send():
        try:
            _send_on(tx, 1)
            outcome.append("ok")
        except TransferError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=send)
    try:
        worker.start()
        rx.wait(1, timeout=5).release()
    finally:
        rx.close()
        worker.join(10)
        tx.close()
    assert outcome == ["ok"]


def _slow_puts(monkeypatch, seconds: float, check) -> list:
    """Make every PUT take ``seconds`` longer (the sender is inside the PUT meanwhile) and call
    ``check()`` at the end of that wait, just before the bytes move: it returns a complaint
    (str) when the receiver has already let go of the memory being written, else None."""
    import thunderkv.transfer.sender as sender_module

    real_call, complaints = sender_module._ucx_call, []

    def slow_call(fn, *args):
        if getattr(fn, "__name__", "") == "put":  # the endpoint's PUT (+ flush)
            time.sleep(seconds)
            complaint = check()
            if complaint:
                complaints.append(complaint)
        return real_call(fn, *args)

    monkeypatch.setattr(sender_module, "_ucx_call", slow_call)
    return complaints


def _send_in_thread(tx: KVSender, header) -> tuple[threading.Thread, list]:
    """``tx.send(header, payload_for(its request id))`` on a started thread; the
    TransferError it raises, if any, lands in the returned list."""
    errors: list = []

    def send():
        try:
            tx.send(header, peers.payload_for(header.request_id, header.payload_length))
        except TransferError as exc:
            errors.append(exc)

    worker = threading.Thread(target=send)
    worker.start()
    return worker, errors


def test_closing_the_sender_mid_put_keeps_the_receivers_slice_until_the_put_ends(monkeypatch):
    """KVSender.close() from another thread while a PUT is in flight: the receiver must not
    see the connection end (and give the slice back for another request) before that PUT
    has finished writing."""
    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=5.0)
    complaints = _slow_puts(monkeypatch, 0.3, lambda: (
        "slice given back during a PUT" if rx.pool.free_bytes() == rx.pool.nbytes else None))
    tx = KVSender(rx.host, rx.port, token=peers.TOKEN)
    try:
        worker, errors = _send_in_thread(tx, peers.raw_header(1, 512))
        rx.incoming(1, timeout=5)  # granted: the first PUT is under way
        time.sleep(0.05)
        tx.close()
        worker.join(10)
        assert errors, "the send should have failed: its sender was closed"
        assert complaints == []
        with pytest.raises(TransferError):  # ... and not been delivered
            rx.wait(1, timeout=2)
    finally:
        tx.close()
        rx.close()


def test_closing_the_receiver_mid_request_stops_the_sender_before_the_pool_goes(monkeypatch):
    """KVReceiver.close() while a request arrives: the sender is told the receiver is closing,
    stops before its next PUT, and only then is the pool unregistered and freed; the sender
    sees why."""
    from thunderkv.transfer.pool import BufferPool

    closed_pools: list = []
    real_close = BufferPool.close
    monkeypatch.setattr(BufferPool, "close",
                        lambda self: (closed_pools.append(self), real_close(self))[1])
    rx = KVReceiver(1 << 24, token=peers.TOKEN, timeout=5.0)
    complaints = _slow_puts(monkeypatch, 0.1, lambda: (
        "PUT into a closed pool" if rx.pool in closed_pools else None))
    with KVSender(rx.host, rx.port, token=peers.TOKEN, chunk_bytes=1 << 20) as tx:
        # 2 layers of 2 MiB in 1 MiB chunks: 4 PUTs
        worker, errors = _send_in_thread(tx, peers.raw_header(1, 4096))
        rx.incoming(1, timeout=5)
        time.sleep(0.05)  # inside the first PUT
        t0 = time.monotonic()
        rx.close()
        took = time.monotonic() - t0
        worker.join(10)
    assert complaints == []
    assert rx.pool in closed_pools
    assert took < 2.0  # the sender stopped after its current PUT, not at the timeout
    assert len(errors) == 1 and "closing" in str(errors[0]), errors


def _paused_after_layer_0(tx: KVSender, rx: KVReceiver):
    """A 2-layer request (id 1) streamed from ``tx`` up to its layer 0, which ``rx`` has
    accepted; the stream, left open (its producer 'paused')."""
    header = peers.raw_header(1, 512)
    stream = tx.stream(header, peers.payload_for(1, header.payload_length))
    stream.send_layer(0)
    rx.incoming(1, timeout=5)
    return stream


def test_a_sender_that_does_not_answer_keeps_the_closed_receivers_pool_allocated(caplog):
    """A stream paused mid-request cannot confirm it stopped writing: close() waits the timeout,
    then keeps the pool's memory allocated for the life of the process (with a warning) rather
    than free memory a late PUT could land in. The paused stream, resumed, PUTs nothing."""
    import thunderkv.transfer.receiver as receiver_module

    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=0.5)
    with KVSender(rx.host, rx.port, token=peers.TOKEN) as tx:
        stream = _paused_after_layer_0(tx, rx)
        pool_memory = rx.pool.tensor
        with caplog.at_level("WARNING", logger="thunderkv.transfer"):
            t0, cpu0 = time.monotonic(), time.process_time()
            rx.close()
            took, cpu = time.monotonic() - t0, time.process_time() - cpu0
        assert 0.4 < took < 3.0
        assert cpu < 0.5 * took, "close() spun while it waited for the sender"
        assert any(t is pool_memory for t in receiver_module.quarantined_pools())
        assert "kept allocated" in caplog.text
        with pytest.raises(TransferError):
            stream.send_layer(1)


def _orphaned_slice(rx: KVReceiver) -> None:
    """Wait until ``rx`` counts one slice whose sender never confirmed it stopped writing."""
    deadline = time.monotonic() + 5
    while (rx._writers, rx._orphaned) != (0, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (rx._writers, rx._orphaned) == (0, 1)


def test_a_put_that_timed_out_keeps_its_slice_out_of_the_pool(monkeypatch):
    """UCX does not cancel a PUT that timed out (over tcp it may still land): the sender's
    ABORT says so, and the receiver keeps that slice out of the pool for good instead of
    giving it to the next request; close() then keeps the pool allocated."""
    import thunderkv.transfer.receiver as receiver_module

    peers.fail_puts(monkeypatch, TransferTimeout("put: no completion within the timeout"))
    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=5.0)
    header = peers.raw_header(1, 512)
    with KVSender(rx.host, rx.port, token=peers.TOKEN) as tx:
        with pytest.raises(TransferTimeout):
            tx.send(header, peers.payload_for(1, header.payload_length))
        with pytest.raises(TransferError):
            rx.wait(1, timeout=5)
        _orphaned_slice(rx)
        assert rx.pool.free_bytes() <= rx.pool.nbytes - header.payload_length
    pool_memory = rx.pool.tensor
    t0 = time.monotonic()
    rx.close()
    assert time.monotonic() - t0 < 2.5  # nothing left to wait for
    assert any(t is pool_memory for t in receiver_module.quarantined_pools())


def test_a_sender_that_loses_its_framing_does_not_hold_up_close():
    """A peer that sends garbage mid-request is dropped before it confirmed it stopped
    writing: its slice stays out, but close() does not wait for an answer that cannot come."""
    import struct

    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=1.0)
    with KVSender(rx.host, rx.port, token=peers.TOKEN) as tx:
        _paused_after_layer_0(tx, rx)
        unknown_kind = struct.pack("<IBI", 5, 99, 0)
        tx._sock.sendall(unknown_kind)  # the request fails; the receiver waits for the stop
        time.sleep(0.2)
        tx._sock.sendall(unknown_kind)  # ... and gives up on the connection
        _orphaned_slice(rx)
        t0 = time.monotonic()
        rx.close()
        assert time.monotonic() - t0 < 1.0


def test_keep_alive_carries_a_stream_past_the_receivers_timeout():
    """A producer slower than the receiver's timeout between two layers keeps the request
    alive with keep_alive(); without it the receiver gives up, and a later keep_alive() (or
    layer) hears so."""
    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=0.5)
    try:
        header = peers.raw_header(1, 512)
        payload = peers.payload_for(1, header.payload_length)
        with KVSender(rx.host, rx.port, token=peers.TOKEN) as tx:
            with tx.stream(header, payload) as stream:
                stream.send_layer(0)
                for _ in range(8):  # 1.2 s in all: well past the 0.5 s timeout
                    time.sleep(0.15)
                    stream.keep_alive()
                stream.send_layer(1)
                stream.finish()
            got = rx.wait(1, timeout=5)
            assert torch.equal(got.buffer, payload)
            got.release()
            header = peers.raw_header(2, 512)
            stream = tx.stream(header, peers.payload_for(2, header.payload_length))
            stream.send_layer(0)
            time.sleep(1.0)  # silent past the timeout
            with pytest.raises(TransferError):
                stream.keep_alive()
            with pytest.raises(TransferError, match="closed"):
                stream.keep_alive()  # the failed request's stream is closed
    finally:
        rx.close()


def _is_pipe(fd: int, inode: int) -> bool:
    """Whether ``fd`` is still open on the pipe whose inode is ``inode``."""
    import os
    import stat

    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISFIFO(st.st_mode) and st.st_ino == inode


def test_a_connection_thread_that_outlives_close_closes_the_wakeup_pipe(monkeypatch):
    """close() joins connection threads for 2 s; the wake-up pipe of a receiver whose thread
    took longer used to stay open for the life of the process (two fds per such receiver)."""
    import os

    original = KVReceiver._handshake
    entered = threading.Event()

    def slow_handshake(self, conn):  # a thread busy past close()'s 2 s join
        entered.set()
        time.sleep(3.0)
        return original(self, conn)

    monkeypatch.setattr(KVReceiver, "_handshake", slow_handshake)
    rx = KVReceiver(1 << 20, token=peers.TOKEN, timeout=5.0)
    inode = os.fstat(rx._wakeup_r).st_ino
    with socket.create_connection((rx.host, rx.port)):
        assert entered.wait(5)
        rx.close()
        assert _is_pipe(rx._wakeup_r, inode)  # the thread may still poll it: kept open
    deadline = time.monotonic() + 10
    while _is_pipe(rx._wakeup_r, inode) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _is_pipe(rx._wakeup_r, inode)


def test_a_closed_receiver_does_not_hold_its_pool():
    """A closed KVReceiver that something still referenced kept its whole pool (1 GiB by
    default) allocated; requests delivered before the close keep their own bytes."""
    import gc
    import weakref

    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=5.0)
    _send(rx, 1)
    delivered = rx.wait(1, timeout=5)
    want = peers.payload_for(1, delivered.header.payload_length)
    pool_memory = weakref.ref(rx.pool.tensor)
    rx.close()
    assert torch.equal(delivered.buffer, want)  # still readable after the close
    delivered.release()
    del delivered
    gc.collect()
    assert pool_memory() is None  # rx itself is still referenced here
    assert rx.pool.nbytes == 1 << 22
