"""CRC-32C throughput against a same-run copy, for gpu_check.sh (one JSON line per size).

    python benchmarks/crc_bench.py --device cuda --json OUT.jsonl

The transfer layer checksums every layer of a request on the device that holds it (the GPU
kernel for CUDA payloads), so on a GPU this says whether the checksum could bound a transfer:
it is read-only over the payload, like half of a copy. Rows carry the same keys as
``thunderkv bench quant`` rows so gpu_check's summary prints them alongside.
"""

from __future__ import annotations

import argparse
import json

import torch

from thunderkv.bench.timing import time_calls
from thunderkv.transfer.checksum import crc32c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--mib", type=int, nargs="+", default=[16, 256])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    with open(args.json, "a") as out:
        for mib in args.mib:
            n = mib << 20
            src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy = time_calls(lambda s=src, d=dst: d.copy_(s), reps=args.reps, sync=sync).p50
            crc = time_calls(lambda s=src: crc32c(s), reps=args.reps, sync=sync).p50
            want = crc32c(src.cpu())
            assert crc32c(src) == want, "device CRC differs from the host CRC"
            # copy moves 2n bytes (read + write); the CRC reads n: compare time per payload byte
            for op, sec, moved in (("copy", copy, 2 * n), ("crc32c", crc, n)):
                row = {"bench": "crc", "label": f"{mib} MiB", "dtype": "uint8", "axis": -1,
                       "op": op, "backend": device.type, "gbps": moved / sec / 1e9,
                       "ratio_to_copy": copy / sec, "seconds": sec,
                       "note": "ratio = copy time / op time for the same payload"}
                out.write(json.dumps(row) + "\n")
                print(f"{mib:5d} MiB {op:7s} {sec * 1e3:8.3f} ms {moved / sec / 1e9:8.1f} GB/s")


if __name__ == "__main__":
    main()
