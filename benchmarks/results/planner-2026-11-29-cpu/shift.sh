#!/usr/bin/env bash
# Workload-shift rescheduling: a plan made for one mix, re-solved for the other, with 0/1/2
# intact groups dissolved (partial reload), each against a full re-plan. 2026-11-29, 2-core VM.
set -x
R=benchmarks/results/planner-2026-11-29-cpu
P=benchmarks/results/planner-2026-11-28b-cpu
for k in 0 1 2; do
  thunderkv plan --reschedule $P/conv.json --workload coding --reload-groups $k \
    --json $R/shift-conv-to-coding-k$k.json > $R/shift-conv-to-coding-k$k.out 2>&1
  thunderkv plan --reschedule $P/coding.json --trace examples/traces/AzureLLMInferenceTrace_conv.csv \
    --reload-groups $k --json $R/shift-coding-to-conv-k$k.json > $R/shift-coding-to-conv-k$k.out 2>&1
done
