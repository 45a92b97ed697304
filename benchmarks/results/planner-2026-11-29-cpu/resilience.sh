#!/usr/bin/env bash
# Failure-aware plan choice vs the default, each swept over every single-node loss.
# 2026-11-29, 2-core AMD EPYC VM. Run from the repository root with the venv's thunderkv on PATH.
set -x
R=benchmarks/results/planner-2026-11-29-cpu
C="--cluster examples/planner/cloud-32.yaml --model llama-30b --trace examples/traces/AzureLLMInferenceTrace_conv.csv --baselines none"
thunderkv plan $C --resilience 0.02 --json $R/conv-resilient.json > $R/conv-resilient.out 2>&1
thunderkv plan --reschedule $R/conv-resilient.json --fail each --json $R/sweep-conv-resilient.json \
  --plot $R/sweep-conv-resilient.png > $R/sweep-conv-resilient.out 2>&1
thunderkv plan $C --json $R/conv-default.json > $R/conv-default.out 2>&1
thunderkv plan --reschedule $R/conv-default.json --fail each --json $R/sweep-conv-default.json \
  --plot $R/sweep-conv-default.png > $R/sweep-conv-default.out 2>&1
# coding-like mix: default plan, swept
C2="--cluster examples/planner/cloud-32.yaml --model llama-30b --workload coding --baselines none"
thunderkv plan $C2 --json $R/coding-default.json > $R/coding-default.out 2>&1
thunderkv plan --reschedule $R/coding-default.json --fail each --json $R/sweep-coding-default.json \
  --plot $R/sweep-coding-default.png > $R/sweep-coding-default.out 2>&1
