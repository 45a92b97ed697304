#!/usr/bin/env bash
# Ours planned in the hybrid space (prefill, decode and colocated groups side by side; the space
# rescheduling already uses) against the default phase-split space. run_hybrid.py swaps the space
# for "thunderkv" only with --hybrid; nothing else changes. Ours only (--baselines none): the
# baselines are those of planner-2026-11-29i-cpu (same code for them).
# 2026-11-29, 2-core AMD EPYC VM, nothing else running. From the repository root.
T=examples/traces/AzureLLMInferenceTrace_conv.csv
B="--cluster examples/planner/cloud-32.yaml --model llama-30b --baselines none"
R=benchmarks/results/planner-2026-11-29k-cpu
for v in hyb split; do
  f=""; [ $v = hyb ] && f="--hybrid"
  for s in 0 1 2; do
    .venv/bin/python $R/run_hybrid.py plan $B --trace $T --seed $s $f --json $R/conv-s$s-$v.json > $R/conv-s$s-$v.out 2>&1
  done
  .venv/bin/python $R/run_hybrid.py plan $B --workload coding $f --json $R/coding-$v.json > $R/coding-$v.out 2>&1
done
