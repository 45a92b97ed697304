"""Both sides' timeline of raw (16-bit) requests over loopback: the sender's PUTs, CRC jobs and
notices and the receiver's notices, checks and ACK on one clock (time.perf_counter is
CLOCK_MONOTONIC, shared by the two processes).

    THUNDERKV_TRANSFER_TOKEN=... python timeline_both.py smollm2-135m 2048   # 47 MB, 30 layers

Runs a KVReceiver in a child process (this script with --receiver), sends 6 requests, prints
the last two. Wraps internals (channel messages, `_ucx_call`, the CRC job, the receiver's
per-notice check) with time stamps; nothing is changed in what they do.
"""

from __future__ import annotations

import subprocess
import sys
import time

PORT = 23918
log: list[tuple[float, str]] = []


def stamped(fn, before, after):
    def run(*args, **kwargs):
        if before:
            log.append((time.perf_counter(), before))
        out = fn(*args, **kwargs)
        log.append((time.perf_counter(), after(out, *args)))
        return out
    return run


def receiver() -> None:
    from thunderkv.transfer import KVReceiver, channel
    from thunderkv.transfer import receiver as rcv

    channel.send = stamped(channel.send, None, lambda out, sock, kind, *a: f"RX sent {kind.name}")
    channel.receive = stamped(channel.receive, None, lambda out, *a: f"RX recv {out.kind.name}")
    rcv.KVReceiver._verify_layers = staticmethod(stamped(
        rcv.KVReceiver._verify_layers, "RX check start", lambda *a: "RX check end"))
    with KVReceiver(1 << 30, port=PORT, timeout=5) as rx:
        print("LISTENING", flush=True)
        for i in range(6):
            rx.recv(timeout=30).release()
            log.append((time.perf_counter(), "RX delivered"))
            if i >= 4:
                for t, what in log:
                    print(f"{t:.6f} {what}")
            log.clear()


def sender(model: str, tokens: int) -> None:
    import torch

    from thunderkv.bench import transfer as bt
    from thunderkv.transfer import KVSender, channel
    from thunderkv.transfer import sender as snd

    channel.send = stamped(channel.send, None, lambda out, sock, kind, *a: f"TX sent {kind.name}")
    channel.receive = stamped(channel.receive, None, lambda out, *a: f"TX recv {out.kind.name}")
    snd._ucx_call = stamped(snd._ucx_call, "TX put start", lambda out, *a: "TX put end")
    snd.KVStream._layer_crcs = stamped(snd.KVStream._layer_crcs, "TX crc start",
                                       lambda *a: "TX crc end")
    rx = subprocess.Popen([sys.executable, __file__, "--receiver"], stdout=subprocess.PIPE,
                          text=True)
    rx.stdout.readline()
    timed = []
    with KVSender("127.0.0.1", PORT, timeout=5) as tx:
        geo = bt.geometry(model)
        header = bt.make_header(geo, tokens, 16, 64, 0)
        pool = tx.register(header.payload_length)
        payload = pool.allocate(header.payload_length).view
        bt.fill_payload(header, payload, torch.Generator().manual_seed(0))
        print("chunk", tx.chunk_bytes, "layer bytes", header.layer_nbytes(), "layers",
              header.layers)
        for rep in range(6):
            log.clear()
            start = time.perf_counter()
            r = tx.send(bt.make_header(geo, tokens, 16, 64, rep + 1), payload)
            if rep >= 4:
                timed.append((start, list(log), r.seconds, r.put_seconds))
    out, _ = rx.communicate(timeout=60)
    rx_log = [(float(line.split()[0]), line.split(None, 1)[1]) for line in out.splitlines()]
    for start, tx_log, secs, put in timed:
        print(f"--- request: {secs * 1e3:.2f} ms, {put * 1e3:.2f} ms inside PUTs")
        for t, what in sorted(tx_log + [e for e in rx_log if start <= e[0] <= start + secs]):
            print(f"  {(t - start) * 1e3:7.2f}  {what}")


if __name__ == "__main__":
    if sys.argv[1] == "--receiver":
        receiver()
    else:
        sender(sys.argv[1], int(sys.argv[2]))
