#!/usr/bin/env bash
# The planner after its 1.35x evaluation speed-up (506dace) and --iters 5000 (the 30 s budget
# binds again): conversation and coding against every baseline and ablation; 320 GPUs.
# 2026-11-29, 2-core AMD EPYC VM, one job at a time. From the repository root, venv on PATH.
set -x
R=benchmarks/results/planner-2026-11-29b-cpu
C="--cluster examples/planner/cloud-32.yaml --baseline-cluster examples/planner/inhouse-a100x8.yaml --model llama-30b --ablations"
thunderkv plan $C --trace examples/traces/AzureLLMInferenceTrace_conv.csv --json $R/conv.json --plot $R/conv.png > $R/conv.out 2>&1
thunderkv plan $C --workload coding --json $R/coding.json --plot $R/coding.png > $R/coding.out 2>&1
# run before --iters 5000 (the 500 s limit bound at 659 iterations either way):
# thunderkv plan --cluster examples/planner/cloud-320.yaml --model llama-30b \
#   --trace examples/traces/AzureLLMInferenceTrace_conv.csv --baselines none --time-limit 500 --iters 1000 \
#   --json $R/c320.json > $R/c320.out
# every single-node loss of the conversation plan, lightweight vs a full re-plan
thunderkv plan --reschedule $R/conv.json --fail each --json $R/sweep-conv.json --plot $R/sweep-conv.png > $R/sweep-conv.out 2>&1
# failure-aware choice, swept the same way
thunderkv plan --cluster examples/planner/cloud-32.yaml --model llama-30b --trace examples/traces/AzureLLMInferenceTrace_conv.csv \
  --baselines none --resilience 0.02 --json $R/conv-resilient.json > $R/conv-resilient.out 2>&1
thunderkv plan --reschedule $R/conv-resilient.json --fail each --json $R/sweep-conv-resilient.json \
  --plot $R/sweep-conv-resilient.png > $R/sweep-conv-resilient.out 2>&1
# a longer search (run first, on the speed-up commit before --iters 5000 was the default):
# thunderkv plan --cluster examples/planner/cloud-32.yaml --model llama-30b \
#   --trace examples/traces/AzureLLMInferenceTrace_conv.csv --baselines hexgen --iters 4000 \
#   --time-limit 90 --json $R/conv-hexgen-iters4000.json > $R/conv-hexgen-iters4000.out
# DistServe-style SLOs: 5x the single-request latency
thunderkv plan --cluster examples/planner/cloud-32.yaml --model llama-30b --baseline-cluster examples/planner/inhouse-a100x8.yaml \
  --trace examples/traces/AzureLLMInferenceTrace_conv.csv --slo-scale 5 --json $R/conv-scale5.json > $R/conv-scale5.out 2>&1
