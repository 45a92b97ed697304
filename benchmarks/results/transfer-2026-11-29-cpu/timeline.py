"""Sender-side timeline of raw (16-bit) requests over loopback: when each PUT, CRC and notice
starts and ends, to see where a request's time goes beside the PUT itself.

    THUNDERKV_TRANSFER_TOKEN=... python timeline.py smollm2-135m 2048   # 47 MB, 30 layers

Spawns the server role of `thunderkv bench transfer` on port 23917, sends 6 requests and prints
the last two. Wraps the sender's internals (channel messages, `_ucx_call`, the CRC job) with
time stamps; nothing is changed in what they do.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from thunderkv.bench import transfer as bt
from thunderkv.transfer import KVSender, channel
from thunderkv.transfer import sender as snd

PORT = 23917
log: list[tuple[float, str]] = []
t0 = [0.0]


def mark(what: str) -> None:
    log.append((time.perf_counter() - t0[0], what))


def stamped(fn, before, after):
    def run(*args, **kwargs):
        if before:
            mark(before)
        out = fn(*args, **kwargs)
        mark(after(out, *args))
        return out
    return run


def main(model: str, tokens: int) -> None:
    channel.send = stamped(channel.send, None, lambda out, sock, kind, *a: f"sent {kind.name}")
    channel.receive = stamped(channel.receive, None, lambda out, *a: f"recv {out.kind.name}")
    snd._ucx_call = stamped(snd._ucx_call, "put start", lambda out, *a: (
        f"put end ({out * 1e3:.2f} ms inside UCX)" if isinstance(out, float) else "ucx call"))
    snd.KVStream._layer_crcs = stamped(snd.KVStream._layer_crcs, "crc start", lambda *a: "crc end")
    server = subprocess.Popen([sys.executable, "-m", "thunderkv.cli", "bench", "transfer",
                               "--role", "server", "--port", str(PORT)])
    try:
        time.sleep(3)
        gen = torch.Generator().manual_seed(0)
        with KVSender("127.0.0.1", PORT, timeout=5) as tx:
            geo = bt.geometry(model)
            header = bt.make_header(geo, tokens, 16, 64, 0)
            pool = tx.register(header.payload_length)
            payload = pool.allocate(header.payload_length).view
            bt.fill_payload(header, payload, gen)
            print("chunk", tx.chunk_bytes, "layer bytes", header.layer_nbytes(),
                  "layers", header.layers)
            for rep in range(6):
                log.clear()
                t0[0] = time.perf_counter()
                r = tx.send(bt.make_header(geo, tokens, 16, 64, rep + 1), payload)
                if rep >= 4:
                    print(f"rep {rep}: {r.seconds * 1e3:.2f} ms, put {r.put_seconds * 1e3:.2f} ms")
                    for t, what in log:
                        print(f"   {t * 1e3:7.2f}  {what}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
