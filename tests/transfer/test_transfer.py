"""thunderkv.transfer between real processes over loopback (UCX PUT + the side channel)."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time

import pytest
import torch
import transfer_peers as peers

from thunderkv.transfer import (
    AuthenticationError,
    ConnectionClosed,
    KVReceiver,
    KVSender,
    PoolFull,
    RequestRejected,
    TransferError,
    TransferTimeout,
    auth,
    channel,
    unavailable_reason,
)
from thunderkv.transfer.channel import Kind

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"UCX transfer unavailable: {unavailable_reason()}")
CTX = mp.get_context("spawn")


def start(target, *args, **kwargs):
    p = CTX.Process(target=target, args=args, kwargs=kwargs, daemon=True)
    p.start()
    return p


def collect(results, n, timeout=120.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
    errors = [r["error"] for r in out if "error" in r]
    assert not errors, errors
    return out


@pytest.fixture
def receiver():
    rx = KVReceiver(1 << 29, token=peers.TOKEN, timeout=5.0)
    yield rx
    rx.close()


def check_arrival(received, seed):
    expected = peers.payload_for(seed, received.header.payload_length)
    assert torch.equal(received.buffer, expected)


def test_listener_binds_loopback_by_default(receiver):
    assert receiver.host == "127.0.0.1"


# tokens -> payload = 2 layers * 2 (K, V) * tokens * 2 heads * 64 * 2 bytes = 1024 * tokens
@pytest.mark.parametrize("tokens", [0, 1, 3, 1023, 262_145])
def test_bit_exact_arrival_across_sizes(receiver, tokens):
    results = CTX.Queue()
    p = start(peers.sender, receiver.host, receiver.port, [(5, tokens, tokens)], results)
    (r,) = collect(results, 1)
    got = receiver.wait(5, timeout=60)
    assert got.header.payload_length == r["bytes"] == 1024 * tokens
    check_arrival(got, tokens)
    assert r["transports"], "every result names the transports used"
    got.release()
    assert receiver.pool.free_bytes() == receiver.pool.nbytes
    p.join(10)


def test_payload_must_match_the_header(receiver):
    header = peers.raw_header(10, 1)
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        with pytest.raises(ValueError, match="payload has 0 bytes"):
            tx.send(header, torch.empty(0, dtype=torch.uint8))
        with pytest.raises(ValueError, match="contiguous 1-D uint8"):
            tx.send(header, torch.zeros(header.payload_length // 2, dtype=torch.float16))
        tx.send(header, peers.payload_for(0, header.payload_length))
    check_arrival(receiver.wait(10, timeout=5), 0)


def test_unregistered_pool_is_forgotten_and_its_memory_still_sendable(receiver):
    header = peers.raw_header(11, 3)
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        pool = tx.register(header.payload_length)
        payload = pool.allocate(header.payload_length).view
        payload.copy_(peers.payload_for(5, header.payload_length))
        other = tx.register(64)
        tx.unregister(pool)
        with pytest.raises(ValueError, match="not registered with this sender"):
            tx.unregister(pool)
        tx.send(header, payload)  # registered for this request only
        tx.unregister(other)
    check_arrival(receiver.wait(11, timeout=5), 5)


def test_256_mib_message(receiver):
    tokens = 256 * 1024 + 7  # just over 256 MiB
    results = CTX.Queue()
    p = start(peers.sender, receiver.host, receiver.port, [(1, tokens, 42)], results,
              timeout=30.0)
    collect(results, 1, timeout=180)
    got = receiver.wait(1, timeout=60)
    assert got.header.payload_length == 1024 * tokens > 256 << 20
    check_arrival(got, 42)
    got.release()
    p.join(10)


def test_concurrent_senders(receiver):
    results = CTX.Queue()
    jobs = {k: [(100 * k + j, 1000 + 37 * j + k, 100 * k + j) for j in range(3)]
            for k in range(4)}
    procs = [start(peers.sender, receiver.host, receiver.port, job, results)
             for job in jobs.values()]
    collect(results, 12)
    for job in jobs.values():
        for request_id, _, seed in job:
            got = receiver.wait(request_id, timeout=30)
            check_arrival(got, seed)
            got.release()
    assert receiver.pool.free_bytes() == receiver.pool.nbytes
    for p in procs:
        p.join(10)


def test_layers_become_readable_while_later_layers_are_in_flight(receiver):
    results = CTX.Queue()
    p = start(peers.sender, receiver.host, receiver.port, [(3, 4096, 3)], results,
              layer_delay=1.0)
    incoming = receiver.incoming(3, timeout=30)
    layer0 = incoming.wait_layer(0, timeout=10)
    assert not incoming.done and incoming.layers_ready == 1
    expected = peers.payload_for(3, incoming.header.payload_length)
    n = incoming.header.layer_nbytes()
    assert torch.equal(layer0["key_residual"].reshape(-1).view(torch.uint8),
                       expected[: n // 2])
    collect(results, 1)
    check_arrival(receiver.wait(3, timeout=10), 3)
    p.join(10)


def test_sender_killed_mid_transfer_fails_the_request_and_receiver_keeps_serving():
    rx = KVReceiver(1 << 26, token=peers.TOKEN, timeout=2.0)
    try:
        results = CTX.Queue()  # keep a reference: the child unpickles it after start()
        p = start(peers.sender, rx.host, rx.port, [(1, 8192, 1)], results,
                  die_after_layers=1)
        incoming = rx.incoming(1, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            rx.wait(1, timeout=10)
        assert time.monotonic() - t0 < 3.0
        assert incoming.layers_ready == 1
        p.join(10)
        start(peers.sender, rx.host, rx.port, [(2, 100, 2)], results)
        collect(results, 1)
        check_arrival(rx.wait(2, timeout=10), 2)
    finally:
        rx.close()


def test_stalled_sender_times_out():
    rx = KVReceiver(1 << 26, token=peers.TOKEN, timeout=1.0)
    try:
        results = CTX.Queue()
        p = start(peers.sender, rx.host, rx.port, [(1, 8192, 1)], results,
                  stall_after_layers=1)
        rx.incoming(1, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            rx.wait(1, timeout=10)
        assert time.monotonic() - t0 < 2.0
        p.kill()
    finally:
        rx.close()


def test_receiver_killed_mid_transfer_raises_on_sender():
    ready = CTX.Queue()
    p = start(peers.receiver_that_dies, ready, 1 << 28)
    host, port = ready.get(timeout=60)
    header = peers.raw_header(1, 32768)
    t0 = time.monotonic()
    with KVSender(host, port, token=peers.TOKEN, timeout=2.0) as tx:
        payload = peers.payload_for(1, header.payload_length)
        with pytest.raises(ConnectionClosed):
            with tx.stream(header, payload) as stream:
                for i in range(header.layers):
                    stream.send_layer(i)
                    time.sleep(0.5)
                stream.finish()
    assert time.monotonic() - t0 < 5.0
    p.join(10)


def test_receiver_killed_during_a_put_is_connection_closed_without_ucx_noise(capfd):
    """The receiver dies while the sender PUTs (1 MiB chunks of 256 MiB): the sender gets
    ConnectionClosed naming the receiver as gone, and UCX prints nothing of its own."""
    ready = CTX.Queue()
    p = start(peers.receiver_that_dies_once_a_request_starts, ready, 1 << 29)
    host, port = ready.get(timeout=60)
    header = peers.raw_header(1, 1 << 18)  # 256 MiB
    payload = torch.ones(header.payload_length, dtype=torch.uint8)
    with KVSender(host, port, token=peers.TOKEN, timeout=2.0, chunk_bytes=1 << 20) as tx:
        with pytest.raises(ConnectionClosed, match="gone|closed|lost"):
            tx.send(header, payload)
        assert tx.broken
    p.join(10)
    assert "UCX  ERROR" not in capfd.readouterr().err


def test_wrong_token_is_refused_and_receiver_keeps_serving(receiver):
    with pytest.raises(AuthenticationError, match="refused"):
        KVSender(receiver.host, receiver.port, token="not-the-token-" + "x" * 16)
    with pytest.raises(ValueError, match="at least 16"):
        KVSender(receiver.host, receiver.port, token="short")
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        header = peers.raw_header(4, 10)
        tx.send(header, peers.payload_for(4, header.payload_length))
    check_arrival(receiver.wait(4, timeout=5), 4)


def authenticated_socket(rx: KVReceiver) -> socket.socket:
    """A raw side-channel connection that passed the handshake (to send crafted messages)."""
    sock = socket.create_connection((rx.host, rx.port), timeout=5)
    hello = channel.receive(sock, timeout=5)
    server_nonce, client_nonce = bytes.fromhex(hello.meta["nonce"]), auth.new_nonce()
    token = auth.load_token(peers.TOKEN)
    channel.send(sock, Kind.AUTH, {"nonce": client_nonce.hex(), "proof": auth.proof(
        token, "client", server_nonce, client_nonce).hex()})
    assert channel.receive(sock, timeout=5).kind == Kind.WELCOME
    return sock


@pytest.mark.parametrize("mutate, why", [
    (lambda h: b"XXXX" + h[4:], "magic"),
    (lambda h: h[:40], "truncated"),
    (lambda h: h[:20] + bytes([h[20] ^ 1]) + h[21:], "header_crc"),
])
def test_malformed_headers_are_refused_before_allocation(receiver, mutate, why):
    good = peers.raw_header(7, 10).pack()
    with authenticated_socket(receiver) as sock:
        channel.send(sock, Kind.BEGIN, {}, mutate(good))
        grant = channel.receive(sock, timeout=5)
        assert grant.kind == Kind.GRANT and not grant.meta["ok"]
        assert why in grant.meta["reason"]
    assert receiver.pool.free_bytes() == receiver.pool.nbytes


def test_a_refused_grant_carries_a_reason_code(receiver):
    """PoolFull (retry later) is told apart from other refusals by a code, not the text."""
    held = receiver.pool.allocate(receiver.pool.nbytes)
    try:
        with authenticated_socket(receiver) as sock:
            channel.send(sock, Kind.BEGIN, {}, peers.raw_header(1, 64).pack())
            grant = channel.receive(sock, timeout=5)
            assert not grant.meta["ok"] and grant.meta["code"] == "pool_full"
            channel.send(sock, Kind.BEGIN, {}, b"XXXX" + peers.raw_header(2, 64).pack()[4:])
            grant = channel.receive(sock, timeout=5)
            assert not grant.meta["ok"] and grant.meta["code"] == "rejected"
        with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
            header = peers.raw_header(3, 64)
            with pytest.raises(PoolFull):
                tx.send(header, peers.payload_for(3, header.payload_length))
            assert not tx.broken
    finally:
        receiver.pool.release(held)


def test_a_begin_cut_short_times_out_but_an_idle_connection_does_not():
    """Once a request's first bytes arrived the peer must keep up (timeout); a connection with
    nothing in progress is never timed out."""
    rx = KVReceiver(1 << 20, token=peers.TOKEN, timeout=0.5)
    try:
        with authenticated_socket(rx) as idle, authenticated_socket(rx) as stalled:
            stalled.sendall(channel.FRAME.pack(200, int(Kind.BEGIN), 0)[:5])  # then nothing
            time.sleep(1.5)
            stalled.settimeout(5)
            assert stalled.recv(1) == b""  # the receiver hung up on the stalled request
            channel.send(idle, Kind.BEGIN, {}, peers.raw_header(1, 1).pack())
            grant = channel.receive(idle, timeout=5)  # the idle one is still served
            assert grant.kind == Kind.GRANT and grant.meta["ok"]
    finally:
        rx.close()


def test_oversized_message_is_refused(receiver):
    big = peers.raw_header(8, 1 << 18, layers=16)  # 2 GiB > the 512 MiB pool
    with authenticated_socket(receiver) as sock:
        channel.send(sock, Kind.BEGIN, {}, big.pack())
        grant = channel.receive(sock, timeout=5)
        assert not grant.meta["ok"] and "over the limit" in grant.meta["reason"]
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        with pytest.raises(ValueError, match="over the receiver's limit"):
            tx.send(big, torch.empty(0, dtype=torch.uint8))


def test_oversized_control_frame_closes_only_that_connection(receiver):
    with authenticated_socket(receiver) as sock:
        sock.sendall(channel.FRAME.pack(1 << 30, int(Kind.BEGIN), 0))
        assert sock.recv(1) == b""  # the receiver hung up
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        header = peers.raw_header(11, 3)
        tx.send(header, peers.payload_for(11, header.payload_length))


def test_deeply_nested_control_json_is_a_malformed_frame(receiver, monkeypatch):
    """A peer (here one that never authenticated) sending JSON nested thousands deep gets its
    connection closed like any malformed frame, not an exception escaping the thread."""
    escaped = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_type))
    meta = b"[" * (channel.PRE_AUTH_MAX_FRAME - 16)
    with socket.create_connection((receiver.host, receiver.port), timeout=5) as sock:
        channel.expect(channel.receive(sock, timeout=5), Kind.HELLO)
        name = "tkv-peer-{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(channel.FRAME.pack(channel.FRAME.size - 4 + len(meta), int(Kind.AUTH),
                                        len(meta)) + meta)
        assert sock.recv(1) == b""  # the receiver hung up
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join(5)
    assert escaped == []
    a, b = socket.socketpair()
    with a, b:
        a.sendall(channel.FRAME.pack(channel.FRAME.size - 4 + len(meta), int(Kind.AUTH),
                                     len(meta)) + meta)
        with pytest.raises(TransferError, match="malformed control message AUTH"):
            channel.receive(b, timeout=5)


def send_layer_by_layer(tx, header, payload):
    with tx.stream(header, payload) as stream:
        for i in range(header.layers):
            stream.send_layer(i)
        return stream.finish()


@pytest.mark.parametrize("how", ["one-shot", "layer-by-layer"])
def test_checksum_mismatch_is_rejected_and_never_delivered(receiver, monkeypatch, how):
    import thunderkv.transfer.sender as sender_module

    header = peers.raw_header(12, 64)
    send = (lambda tx, h, p: tx.send(h, p)) if how == "one-shot" else send_layer_by_layer
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        monkeypatch.setattr(sender_module, "crc32c_running",
                            lambda data, block, count, seed=0, threads=0: [12345] * count)
        with pytest.raises(TransferError, match="checksum mismatch"):
            send(tx, header, peers.payload_for(12, header.payload_length))
        with pytest.raises(RequestRejected, match="checksum mismatch"):
            receiver.wait(12, timeout=5)  # a TransferError, like every receiver error
        monkeypatch.undo()
        # the connection and the request id are usable again
        send(tx, header, peers.payload_for(12, header.payload_length))
    check_arrival(receiver.wait(12, timeout=5), 12)
    assert receiver.pool.free_bytes() < receiver.pool.nbytes


def test_duplicate_request_id_is_refused(receiver):
    header = peers.raw_header(13, 8)
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        tx.send(header, peers.payload_for(13, header.payload_length))
        with pytest.raises(TransferError, match="already in use"):
            tx.send(header, peers.payload_for(13, header.payload_length))


def test_dequantize_reads_straight_from_the_receive_pool(receiver):
    """4-bit KV quantized into the sender's registered buffer, dequantized from views into the
    receiver's pool: equal to quantizing the same KV here, and no copy on the way."""
    from thunderkv import FormatSpec, QuantizedTensor, dequantize, quantize
    from thunderkv.bench.transfer import fill_payload, geometry, make_header
    from thunderkv.transfer import layer_views

    results = CTX.Queue()
    p = start(peers.quantized_sender, receiver.host, receiver.port, 21, 192, 7, results)
    collect(results, 1)
    got = receiver.wait(21, timeout=30)
    header = make_header(geometry("smollm2"), 192, 4, 64, 21)
    assert got.header == header
    local = torch.empty(header.payload_length, dtype=torch.uint8)
    fill_payload(header, local, torch.Generator().manual_seed(7))
    kv = torch.randn(header.shape(192), generator=torch.Generator().manual_seed(7),
                     dtype=torch.float32).to(torch.float16)  # the key fill_payload drew
    pool_lo = receiver.pool.address
    for layer in (0, header.layers - 1):
        parts = got.layer(layer)
        assert pool_lo <= parts["key_packed"].data_ptr() < pool_lo + receiver.pool.nbytes
        mine = layer_views(header, local[layer * header.layer_nbytes():
                                         (layer + 1) * header.layer_nbytes()])
        for name in parts:
            assert torch.equal(parts[name], mine[name]), name
        q = quantize(kv, bits=4, group_size=64)
        assert torch.equal(parts["key_packed"], q.packed)
        k_hat = dequantize(QuantizedTensor(parts["key_packed"], parts["key_scale"],
                                           parts["key_min"], FormatSpec(4, 64, -1),
                                           kv.shape, kv.dtype))
        assert torch.equal(k_hat, q.dequantize())
    got.release()
    p.join(10)


def test_stalled_receiver_times_out_on_the_sender():
    import os
    import signal

    ready = CTX.Queue()
    p = start(peers.receiver_in_child, ready, 1 << 26)
    host, port, pid = ready.get(timeout=60)
    try:
        with KVSender(host, port, token=peers.TOKEN, timeout=1.0) as tx:
            header = peers.raw_header(1, 100)
            tx.send(header, peers.payload_for(1, header.payload_length))  # alive: works
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout):
                tx.send(peers.raw_header(2, 100), peers.payload_for(2, header.payload_length))
            assert time.monotonic() - t0 < 2.5
    finally:
        os.kill(pid, signal.SIGKILL)
        p.join(10)


def test_paged_blocks_travel_from_one_paged_cache_into_another(receiver, gen):
    """Prefill side: pack_for_transfer of each layer's blocks straight into the registered send
    buffer; decode side: unpack_from_transfer from the receive pool into other block ids."""
    from thunderkv.paged import (
        PagedKVCache,
        gather_dequantize,
        pack_for_transfer,
        quantize_to_paged,
        unpack_from_transfer,
    )
    from thunderkv.transfer import build_header

    layers, block, heads, dim, seq = 3, 16, 2, 64, 40
    src = [PagedKVCache.allocate(8, block, heads, dim) for _ in range(layers)]
    dst = [PagedKVCache.allocate(10, block, heads, dim) for _ in range(layers)]
    src_blocks, dst_blocks = torch.tensor([5, 1, 6]), torch.tensor([0, 9, 3])
    slots = (src_blocks[:, None] * block + torch.arange(block)).reshape(-1)[:seq]
    for cache in src:
        k, v = (torch.randn(seq, heads, dim, generator=gen).half() for _ in range(2))
        quantize_to_paged(k, v, cache, slots)
    header = build_header(dtype=torch.float16, bits=4, layers=layers, heads=heads, head_dim=dim,
                          quant_tokens=len(src_blocks) * block, seq_len=seq, request_id=31,
                          streamed=True)
    with KVSender(receiver.host, receiver.port, token=peers.TOKEN) as tx:
        payload = tx.register(header.payload_length).allocate(header.payload_length).view
        n = header.layer_nbytes()
        with tx.stream(header, payload) as stream:
            for i, cache in enumerate(src):
                pack_for_transfer(cache, src_blocks, out=payload[i * n:(i + 1) * n])
                stream.send_layer(i)
            stream.finish()
    got = receiver.wait(31, timeout=5)
    assert got.header.seq_len == seq
    for i, (a, b) in enumerate(zip(src, dst)):
        unpack_from_transfer(got.buffer[i * n:(i + 1) * n], b, dst_blocks)
        lens = torch.tensor([seq])
        for x, y in zip(gather_dequantize(a, src_blocks[None], lens),
                        gather_dequantize(b, dst_blocks[None], lens)):
            assert torch.equal(x, y)
    got.release()
