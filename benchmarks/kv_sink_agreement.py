"""Teacher-forced top-1 agreement of the serving loop's 4-bit KV messages with and without an
exact attention-sink token, for several group sizes (SmolLM2-135M, CPU, no workers or links).

    python benchmarks/kv_sink_agreement.py [quick|default] [--json PATH]

The reference is greedy decoding from the prompt's fp16 KV (what a colocated worker does); each
configuration sends the same prompts' KV through ``serve.kvwire`` (write_layer -> read_layers)
and decodes the reference continuation teacher-forced, as ``thunderkv bench e2e`` does.
"""

from __future__ import annotations

import argparse
import json

import torch
from thunderkv.serve.bench_e2e import PRESETS, teacher_forced_agreement, workload
from thunderkv.serve.kvwire import geometry_of, message_header
from thunderkv.serve.runner import ModelRunner
from thunderkv.serve.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", nargs="?", default="default", choices=sorted(PRESETS))
    p.add_argument("--json", metavar="PATH", help="append one JSON line per configuration")
    args = p.parse_args()
    torch.set_num_threads(2)
    runner = ModelRunner.load("smollm2")
    jobs = workload(PRESETS[args.preset], load_tokenizer("smollm2"), seed=0)
    reference = []
    with torch.no_grad():
        for job in jobs:
            logits, seq = runner.prefill(job.prompt)
            toks = [int(logits.reshape(-1, logits.shape[-1])[-1].argmax())]
            for _ in range(job.max_tokens - 1):
                toks.append(int(runner.decode([seq], [toks[-1]])[0].argmax()))
            reference.append(toks)
        for group in (16, 32, 64):
            for sink in (0, 1):
                top1 = teacher_forced_agreement(runner, jobs, reference, 4, group, sink)
                nbytes = sum(message_header(geometry_of(runner), len(j.prompt), 4, 0, group,
                                            sink).payload_length for j in jobs)
                row = {"preset": args.preset, "requests": len(jobs), "group_size": group,
                       "sink_tokens": sink, "teacher_forced_top1": round(top1, 4),
                       "kv_bytes": nbytes, "torch": torch.__version__}
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
