#!/usr/bin/env bash
# The planner after 5870cea: the simulator books network time in gaps (per-resource busy intervals)
# and books a streamed KV transfer when its prefill batch starts, so a decode iteration's activations
# no longer push streamed layers past them. Earlier: activations on links and NICs, prefill KV held (611e4e8).
# Same commands as planner-2026-11-29h-cpu/run.sh.
# 2026-11-29, 2-core AMD EPYC VM, one job at a time. From the repository root, venv on PATH.
set -x
R=benchmarks/results/planner-2026-11-29i-cpu
C="--cluster examples/planner/cloud-32.yaml --baseline-cluster examples/planner/inhouse-a100x8.yaml --model llama-30b --ablations"
T=examples/traces/AzureLLMInferenceTrace_conv.csv
thunderkv plan $C --trace $T --json $R/conv.json --plot $R/conv.png > $R/conv.out 2>&1
thunderkv plan $C --workload coding --json $R/coding.json --plot $R/coding.png > $R/coding.out 2>&1
thunderkv plan --reschedule $R/conv.json --fail each --json $R/sweep-conv.json --plot $R/sweep-conv.png > $R/sweep-conv.out 2>&1
thunderkv plan --cluster examples/planner/cloud-32.yaml --model llama-30b --baseline-cluster examples/planner/inhouse-a100x8.yaml \
  --trace $T --slo-scale 5 --json $R/conv-scale5.json > $R/conv-scale5.out 2>&1
for s in 1 2; do
  thunderkv plan --cluster examples/planner/cloud-32.yaml --model llama-30b --trace $T --baselines hexgen \
    --seed $s --json $R/conv-seed$s.json > $R/conv-seed$s.out 2>&1
done
# 320 GPUs, site by site (as planner-2026-11-29f-cpu/c320-sites.*), run last on its own:
thunderkv plan --cluster examples/planner/cloud-320.yaml --model llama-30b --trace $T --baselines none \
  --time-limit 500 --json $R/c320-sites.json > $R/c320-sites.out 2>&1
