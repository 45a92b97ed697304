"""CPU seconds per thread on both sides over 50 raw 47 MB requests (smollm2-135m, 2048 tokens)
over loopback: where the two cores go.

    THUNDERKV_TRANSFER_TOKEN=... python threads_cpu.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from thunderkv.bench import transfer as bt
from thunderkv.transfer import KVSender

PORT = 23931


def cpu_seconds(pid: int) -> dict[tuple[str, str], float]:
    """User + system CPU seconds of each thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        name = stat[stat.index("(") + 1:stat.index(")")]
        fields = stat[stat.index(")") + 2:].split()
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> None:
    srv = subprocess.Popen([sys.executable, "-m", "thunderkv.cli", "bench", "transfer", "--role",
                            "server", "--port", str(PORT)], stdout=subprocess.PIPE, text=True)
    srv.stdout.readline()
    me = os.getpid()
    try:
        with KVSender("127.0.0.1", PORT, timeout=5) as tx:
            geo = bt.geometry("smollm2-135m")
            header = bt.make_header(geo, 2048, 16, 64, 0)
            payload = tx.register(header.payload_length).allocate(header.payload_length).view
            bt.fill_payload(header, payload, torch.Generator().manual_seed(0))
            tx.send(bt.make_header(geo, 2048, 16, 64, 1), payload)
            time.sleep(1)
            rx0, tx0 = cpu_seconds(srv.pid), cpu_seconds(me)
            t0 = time.perf_counter()
            for i in range(50):
                tx.send(bt.make_header(geo, 2048, 16, 64, i + 2), payload)
            elapsed = time.perf_counter() - t0
            rx1, tx1 = cpu_seconds(srv.pid), cpu_seconds(me)
            time.sleep(1)
            rx2 = cpu_seconds(srv.pid)
    finally:
        srv.terminate()
        srv.wait()
    print(f"50 requests in {elapsed:.3f} s")
    for k in rx1:
        print("RX", k, f"{rx1[k] - rx0.get(k, 0):.2f} s busy; idle 1 s after: "
              f"{rx2.get(k, 0) - rx1[k]:.2f}")
    for k in tx1:
        print("TX", k, f"{tx1[k] - tx0.get(k, 0):.2f} s")


if __name__ == "__main__":
    main()
