"""Peer processes for the transfer tests (run in spawned children: real processes, real UCX)."""

from __future__ import annotations

import os
import signal
import time

import torch

TOKEN = "test-token-" + "0123456789abcdef" * 2


def payload_for(seed: int, nbytes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def fail_puts(monkeypatch, error: Exception) -> None:
    """Make every UCX PUT of this process's senders raise ``error`` (fault injection for the
    in-process tests; the other UCX calls run as usual)."""
    import thunderkv.transfer.sender as sender_module

    real = sender_module._ucx_call

    def put_fails(fn, *args):
        if getattr(fn, "__name__", "") == "put":
            raise error
        return real(fn, *args)

    monkeypatch.setattr(sender_module, "_ucx_call", put_fails)


def raw_header(request_id: int, tokens: int, *, layers: int = 2, heads: int = 2,
               head_dim: int = 64, streamed: bool = True, **kw):
    from thunderkv.transfer import build_header

    return build_header(dtype=torch.float16, bits=16, layers=layers, heads=heads,
                        head_dim=head_dim, residual_tokens=tokens, request_id=request_id,
                        streamed=streamed, **kw)


def sender(host: str, port: int, jobs: list[tuple[int, int, int]], results, *,
           layer_delay: float = 0.0, die_after_layers: int | None = None,
           stall_after_layers: int | None = None, token: str = TOKEN,
           timeout: float = 5.0, device: str = "cpu") -> None:
    """Send raw fp16 messages: jobs = [(request_id, tokens, seed)], results gets a dict each;
    the send pool lives on ``device``."""
    from thunderkv.transfer import KVSender

    try:
        with KVSender(host, port, token=token, timeout=timeout) as tx:
            for request_id, tokens, seed in jobs:
                header = raw_header(request_id, tokens)
                pool = tx.register(max(header.payload_length, 1), device)
                piece = pool.allocate(header.payload_length)
                piece.view.copy_(payload_for(seed, header.payload_length))
                with tx.stream(header, piece.view) as stream:
                    for i in range(header.layers):
                        if die_after_layers is not None and i == die_after_layers:
                            os.kill(os.getpid(), signal.SIGKILL)
                        if stall_after_layers is not None and i == stall_after_layers:
                            time.sleep(3600)
                        stream.send_layer(i)
                        time.sleep(layer_delay)
                    r = stream.finish()
                results.put({"request_id": request_id, "bytes": r.payload_bytes,
                             "transports": r.transports, "seconds": r.seconds})
    except Exception as exc:  # reported to the test, which decides
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def receiver_that_dies(ready, pool_bytes: int, token: str = TOKEN) -> None:
    """A receiver that SIGKILLs itself once layer 0 of request 1 has arrived."""
    from thunderkv.transfer import KVReceiver

    rx = KVReceiver(pool_bytes, token=token)
    ready.put((rx.host, rx.port))
    rx.incoming(1, timeout=60).wait_layer(0, timeout=60)
    os.kill(os.getpid(), signal.SIGKILL)


def receiver_that_dies_once_a_request_starts(ready, pool_bytes: int,
                                              token: str = TOKEN) -> None:
    """A receiver that SIGKILLs itself once the first byte of request 1 (a payload of
    non-zero bytes) landed in its pool: in the middle of the sender's PUTs."""
    from thunderkv.transfer import KVReceiver

    rx = KVReceiver(pool_bytes, token=token)
    ready.put((rx.host, rx.port))
    first = rx.incoming(1, timeout=60).slice.view[:1]
    deadline = time.monotonic() + 60
    while int(first) == 0 and time.monotonic() < deadline:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def quantized_sender(host: str, port: int, request_id: int, tokens: int, seed: int, results,
                     token: str = TOKEN, device: str = "cpu") -> None:
    """Quantize seeded KV straight into a registered send buffer on ``device`` and send it
    (4-bit)."""
    from thunderkv.bench.transfer import fill_payload, geometry, make_header
    from thunderkv.transfer import KVSender

    try:
        header = make_header(geometry("smollm2"), tokens, 4, 64, request_id)
        with KVSender(host, port, token=token) as tx:
            pool = tx.register(header.payload_length, device)
            payload = pool.allocate(header.payload_length).view
            fill_payload(header, payload, torch.Generator().manual_seed(seed))
            r = tx.send(header, payload)
        results.put({"request_id": request_id, "bytes": r.payload_bytes})
    except Exception as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def receiver_in_child(ready, pool_bytes: int, token: str = TOKEN) -> None:
    """A receiver process that serves until killed (tests stop it with SIGSTOP/SIGKILL)."""
    from thunderkv.transfer import KVReceiver

    rx = KVReceiver(pool_bytes, token=token)
    ready.put((rx.host, rx.port, os.getpid()))
    while True:
        rx.recv().release()
