#!/usr/bin/env bash
# The planner with goodput resolved to 1 % (40ae73d; 3 % before): conversation and coding
# against every baseline and ablation, and every single-node loss of the conversation plan.
# 2026-11-29, 2-core AMD EPYC VM, one job at a time. From the repository root, venv on PATH.
set -x
R=benchmarks/results/planner-2026-11-29c-cpu
C="--cluster examples/planner/cloud-32.yaml --baseline-cluster examples/planner/inhouse-a100x8.yaml --model llama-30b --ablations"
thunderkv plan $C --trace examples/traces/AzureLLMInferenceTrace_conv.csv --json $R/conv.json --plot $R/conv.png > $R/conv.out 2>&1
thunderkv plan $C --workload coding --json $R/coding.json --plot $R/coding.png > $R/coding.out 2>&1
thunderkv plan --reschedule $R/conv.json --fail each --json $R/sweep-conv.json --plot $R/sweep-conv.png > $R/sweep-conv.out 2>&1
