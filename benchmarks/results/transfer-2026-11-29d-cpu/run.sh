#!/usr/bin/env bash
# Loopback transfer after the lifecycle fixes (d9222c4..821e0d3: hand-out once, discard, slices
# held until the sender stops, a check for the receiver's ERROR before every PUT), to see that
# the raw path kept its speed. Same command as transfer-2026-11-29c-cpu, twice.
# 2026-11-29, 2-core AMD EPYC VM, nothing else running. From the repository root, venv on PATH.
R=benchmarks/results/transfer-2026-11-29d-cpu
for i in 1 2; do
  thunderkv bench transfer --reps 12 --json $R/loopback.jsonl > $R/loopback-run$i.txt 2>&1
done
