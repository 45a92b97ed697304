"""Which errors thunderkv.transfer raises: every failure of a transfer is a TransferError;
a wrong argument is a TypeError / ValueError raised before anything changes."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import time

import pytest
import torch
import transfer_peers as peers

from thunderkv.transfer import (
    ConnectionClosed,
    KVReceiver,
    KVSender,
    ListenError,
    PoolFull,
    RequestRejected,
    TransferError,
    unavailable_reason,
)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"UCX transfer unavailable: {unavailable_reason()}")


@pytest.fixture
def receiver():
    rx = KVReceiver(1 << 22, token=peers.TOKEN, timeout=5.0)
    yield rx
    rx.close()


@pytest.fixture
def sender(receiver):
    tx = KVSender(receiver.host, receiver.port, token=peers.TOKEN)
    yield tx
    tx.close()


def _send(tx: KVSender, request_id: int, tokens: int = 64) -> None:
    header = peers.raw_header(request_id, tokens)
    tx.send(header, peers.payload_for(request_id, header.payload_length))


def test_a_discarded_request_fails_on_the_receiver_with_a_transfer_error(receiver, sender):
    header = peers.raw_header(1, 64)
    stream = sender.stream(header, peers.payload_for(1, header.payload_length))
    stream.send_layer(0)
    incoming = receiver.incoming(1, timeout=5)
    receiver.discard(1)
    stream.send_layer(1)
    with pytest.raises(RequestRejected, match="discarded"):
        stream.finish()
    # the receiver's record of the failure, after the sender was told, is a TransferError too
    with pytest.raises(RequestRejected, match="request 1 was discarded"):
        receiver.wait(1, timeout=5)
    with pytest.raises(RequestRejected, match="request 1 was discarded"):
        incoming.wait_layer(0, timeout=5)


def test_allocate_refuses_a_bad_size_and_leaves_the_pool_as_it_was(receiver):
    pool = receiver.pool
    before = list(pool._free)
    for bad, error in ((1.5, TypeError), ("x", TypeError), (True, TypeError), (None, TypeError),
                       (-1, ValueError)):
        with pytest.raises(error, match="nbytes"):
            pool.allocate(bad)
        assert pool._free == before and not pool._used
    piece = pool.allocate(100)
    assert piece.nbytes == 100
    pool.release(piece)
    assert pool.free_bytes() == pool.nbytes


@pytest.mark.parametrize("timeout, error", [
    (float("inf"), ValueError), (float("nan"), ValueError), (1e300, ValueError),
    ("5", TypeError), (True, TypeError)])
def test_timeouts_must_be_finite_numbers_in_both_constructors(receiver, timeout, error):
    with pytest.raises(error, match="timeout"):
        KVReceiver(1 << 20, token=peers.TOKEN, timeout=timeout).close()
    with pytest.raises(error, match="timeout"):
        KVSender(receiver.host, receiver.port, token=peers.TOKEN, timeout=timeout).close()


def test_a_port_in_use_is_a_transfer_error_that_keeps_the_errno(receiver):
    """ListenError: a TransferError, and an OSError with the errno (callers that caught the
    plain OSError before keep working)."""
    with pytest.raises(ListenError, match=rf"cannot listen on 127.0.0.1:{receiver.port}: "
                                          r"\[Errno \d+\] Address already in use") as info:
        KVReceiver(1 << 20, token=peers.TOKEN, port=receiver.port)
    assert isinstance(info.value, TransferError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.EADDRINUSE


def test_receiver_arguments_are_named_as_passed():
    with pytest.raises(ValueError, match="pool_bytes must be a positive number of bytes, got 0"):
        KVReceiver(0, token=peers.TOKEN)
    with pytest.raises(TypeError, match="pool_bytes must be an int"):
        KVReceiver(1.5, token=peers.TOKEN)
    with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device"):
        KVReceiver(1 << 20, token=peers.TOKEN, device="tpu")
    with pytest.raises(ValueError, match="port must be in"):
        KVReceiver(1 << 20, token=peers.TOKEN, port=70000)


def test_a_pool_that_cannot_be_allocated_is_a_transfer_error_naming_its_size(sender):
    with pytest.raises(TransferError, match=f"cannot allocate a {1 << 62}-byte pool on cpu"):
        sender.register(1 << 62)
    assert sender._pools == []
    with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device"):
        sender.register(4096, "meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_cuda_pool_without_a_gpu_says_why_without_suggesting_a_smaller_pool(sender):
    for make in (lambda: sender.register(4096, "cuda"),
                 lambda: KVReceiver(4096, token=peers.TOKEN, device="cuda")):
        with pytest.raises(TransferError, match="cannot allocate a 4096-byte pool on cuda") as e:
            make()
        assert "smaller" not in str(e.value)
    with pytest.raises(TransferError, match="use a smaller pool"):  # out of memory: it may help
        sender.register(1 << 62)


def test_bad_send_arguments_are_type_or_value_errors_and_leave_the_sender_usable(receiver,
                                                                                 sender):
    header = peers.raw_header(1, 64)
    payload = peers.payload_for(1, header.payload_length)
    with pytest.raises(TypeError, match="header must be a KVHeader"):
        sender.send(header.pack(), payload)
    with pytest.raises(TypeError, match="header must be a KVHeader"):
        sender.stream(None, payload)
    with pytest.raises(TypeError, match="payload must be a torch.Tensor"):
        sender.send(header, payload.numpy())
    with pytest.raises(ValueError, match="payload must be in CPU or CUDA memory"):
        sender.send(header, torch.empty(header.payload_length, dtype=torch.uint8, device="meta"))
    assert not sender.broken
    sender.send(header, payload)
    receiver.wait(1, timeout=5).release()


@pytest.mark.parametrize("change", [
    {"bits": 3}, {"seq_len": 10**6}, {"request_id": -1}, {"layers": 0, "payload_length": 0},
    {"streamed": False, "payload_crc": 1 << 40}])
def test_a_header_the_wire_cannot_carry_is_a_value_error_that_leaves_the_sender_usable(
        receiver, sender, change):
    """A KVHeader changed with dataclasses.replace (e.g. to reuse it) may be inconsistent:
    refused at once as a bad argument, not as a failed request that breaks the sender."""
    header = peers.raw_header(1, 64)
    payload = peers.payload_for(1, header.payload_length)
    bad = dataclasses.replace(header, **change)
    with pytest.raises(ValueError, match="header cannot be sent"):
        sender.send(bad, payload[:bad.payload_length])
    assert not sender.broken
    sender.send(header, payload)
    receiver.wait(1, timeout=5).release()


@pytest.mark.parametrize("token", [32, [0] * 16, 1 << 70])
def test_a_token_that_is_not_str_or_bytes_is_a_type_error(receiver, token):
    """bytes(32) would be 32 NUL bytes: a token anyone can guess, never a token to accept."""
    with pytest.raises(TypeError, match="token must be str or bytes"):
        KVReceiver(1 << 20, token=token)
    with pytest.raises(TypeError, match="token must be str or bytes"):
        KVSender(receiver.host, receiver.port, token=token)


def test_bad_layer_indices_are_refused_and_leave_the_stream_usable(receiver, sender):
    header = peers.raw_header(1, 64)  # 2 layers
    payload = peers.payload_for(1, header.payload_length)
    with sender.stream(header, payload) as stream:
        for index, error in ((1.0, TypeError), ("0", TypeError), (None, TypeError),
                             (2, IndexError), (-1, IndexError), (1, ValueError)):
            with pytest.raises(error, match="layer"):
                stream.send_layer(index)
        with pytest.raises(IndexError, match="outside 0..1"):
            stream.send_layers(0, 3)
        with pytest.raises(ValueError, match="in order"):
            stream.send_layers(0, 0)
        stream.send_layer(0)
        stream.send_layer(1)
        stream.finish()
    assert not sender.broken
    got = receiver.wait(1, timeout=5)
    assert torch.equal(got.buffer, payload)
    got.release()


@pytest.mark.parametrize("request_id, error", [
    ("abc", TypeError), (1.0, TypeError), (None, TypeError), (True, TypeError),
    (-1, ValueError), (1 << 64, ValueError)])
def test_bad_request_ids_are_refused_at_once(receiver, request_id, error):
    for call in (receiver.wait, receiver.incoming):
        t0 = time.monotonic()
        with pytest.raises(error, match="request_id"):
            call(request_id, timeout=5)
        assert time.monotonic() - t0 < 1.0  # not after the timeout
    with pytest.raises(error, match="request_id"):
        receiver.discard(request_id)
    assert not receiver._discarded


def test_register_after_close_says_the_sender_is_closed(sender):
    sender.close()
    with pytest.raises(TransferError, match="is closed"):
        sender.register(4096)
    assert sender._pools == []


def test_unregister_after_close_says_the_sender_is_closed(sender):
    """Not a ValueError claiming the pool was never registered with this sender."""
    pool = sender.register(4096)
    sender.close()
    with pytest.raises(TransferError, match="is closed"):
        sender.unregister(pool)


def test_a_pool_not_a_multiple_of_256_bytes_accepts_what_it_advertises():
    """max_payload_bytes is the pool's size; a slice ending at the pool's end is not rounded
    up, so a 900-byte payload fits a 1000-byte pool."""
    rx = KVReceiver(1000, token=peers.TOKEN)
    try:
        with KVSender(rx.host, rx.port, token=peers.TOKEN) as tx:
            assert tx.max_payload_bytes == 1000
            for request_id, tokens in ((1, 225), (2, 250)):  # 900 and 1000 bytes
                header = peers.raw_header(request_id, tokens, layers=1, heads=1, head_dim=1)
                payload = peers.payload_for(request_id, header.payload_length)
                tx.send(header, payload)
                got = rx.wait(request_id, timeout=5)
                assert torch.equal(got.buffer, payload)
                got.release()
            assert rx.pool.free_bytes() == rx.pool.nbytes
        piece = rx.pool.allocate(700)  # rounds up to 768, leaving 232 bytes at the end
        with pytest.raises(PoolFull, match="no free 300-byte slice"):
            rx.pool.allocate(300)
        tail = rx.pool.allocate(232)
        assert (tail.offset, tail.nbytes) == (768, 232)
        rx.pool.release(piece)
        rx.pool.release(tail)
        assert rx.pool._free == [(0, 1000)]
    finally:
        rx.close()


def test_a_put_failing_because_the_receiver_is_gone_is_connection_closed(receiver, sender,
                                                                        monkeypatch):
    """What UCX reports when the target process died mid-PUT ("put: Input/output error")."""
    peers.fail_puts(monkeypatch, TransferError("put: Input/output error"))
    with pytest.raises(ConnectionClosed, match=f"receiver {sender.peer} is gone: the PUT of "
                                               "request 1 failed"):
        _send(sender, 1)
    assert sender.broken


def _ucx_stderr(**env) -> str:
    """stderr of a process that loads UCX and asks it for a transport that does not exist
    (UCX logs a warning and an error of its own for that)."""
    code = ("import os\n"
            "from thunderkv.transfer.ucx import load_ucx\n"
            "ucx = load_ucx()\n"
            "print(os.environ.get('UCX_LOG_LEVEL'))\n"
            "try:\n"
            "    ucx.Worker(False)\n"
            "except ucx.TransferError:\n"
            "    pass\n")
    base = {k: v for k, v in os.environ.items() if k != "UCX_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], env={**base, "UCX_TLS": "no_such_tl", **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() + "\n" + out.stderr


def test_ucx_logging_is_quiet_unless_asked_for():
    quiet = _ucx_stderr()
    assert quiet.startswith("None\n")  # not left in the environment for subprocesses
    assert "UCX  ERROR" not in quiet and "UCX  WARN" not in quiet
    loud = _ucx_stderr(UCX_LOG_LEVEL="warn")  # the user's setting wins
    assert "UCX  ERROR" in loud or "UCX  WARN" in loud


def test_env_says_ucxx_is_optional_and_notes_a_missing_token(capsys, monkeypatch):
    import thunderkv.envinfo as envinfo
    from thunderkv.cli import main
    from thunderkv.transfer import auth

    info = envinfo.collect()
    info["ucxx"] = None
    info["transfer"] = {**info["transfer"], "available": True, "ucx_version": "1.22.0"}
    monkeypatch.setattr(envinfo, "collect", lambda: info)
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    monkeypatch.delenv(auth.TOKEN_FILE_ENV, raising=False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "not installed (optional: the transfer data path does not use it)" in out
    assert "but no usable token" in out and auth.TOKEN_ENV in out
    monkeypatch.setenv(auth.TOKEN_ENV, peers.TOKEN)
    assert main(["env"]) == 0
    assert "no usable token" not in capsys.readouterr().out
