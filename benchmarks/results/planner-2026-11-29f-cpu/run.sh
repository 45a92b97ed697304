#!/usr/bin/env bash
# The planner after the network review (85a8bc6): one 25 Gbit/s NIC per node in cloud-32/320,
# streamed KV legs wait for their layers, colocated prompts join at the next iteration, NVLink
# one-way. Same commands as planner-2026-11-29e-cpu/run.sh, plus ours and HexGen-like on
# cloud-32 without the NIC line (the old network assumption, same code).
# 2026-11-29, 2-core AMD EPYC VM, one job at a time. From the repository root, venv on PATH.
set -x
R=benchmarks/results/planner-2026-11-29f-cpu
C="--cluster examples/planner/cloud-32.yaml --baseline-cluster examples/planner/inhouse-a100x8.yaml --model llama-30b --ablations"
T=examples/traces/AzureLLMInferenceTrace_conv.csv
thunderkv plan $C --trace $T --json $R/conv.json --plot $R/conv.png > $R/conv.out 2>&1
thunderkv plan $C --workload coding --json $R/coding.json --plot $R/coding.png > $R/coding.out 2>&1
thunderkv plan --reschedule $R/conv.json --fail each --json $R/sweep-conv.json --plot $R/sweep-conv.png > $R/sweep-conv.out 2>&1
thunderkv plan --cluster examples/planner/cloud-32.yaml --model llama-30b --baseline-cluster examples/planner/inhouse-a100x8.yaml \
  --trace $T --slo-scale 5 --json $R/conv-scale5.json > $R/conv-scale5.out 2>&1
# run to run: another tabu seed and another Poisson sample, ours against HexGen-like
for s in 1 2; do
  thunderkv plan --cluster examples/planner/cloud-32.yaml --model llama-30b --trace $T --baselines hexgen \
    --seed $s --json $R/conv-seed$s.json > $R/conv-seed$s.out 2>&1
done
# the old network assumption: no NIC limit (links only)
grep -v "^  nic_gbps:" examples/planner/cloud-32.yaml > $R/cloud-32-no-nic.yaml
thunderkv plan --cluster $R/cloud-32-no-nic.yaml --model llama-30b --trace $T --baselines hexgen \
  --json $R/conv-no-nic.json > $R/conv-no-nic.out 2>&1
# c320.* came from a5e7587 (one search over all 320 GPUs); c320-sites.* from the next commit,
# which searches each 32-GPU site first (scheduler/decompose.py). Same command.
thunderkv plan --cluster examples/planner/cloud-320.yaml --model llama-30b --trace $T --baselines none \
  --time-limit 500 --json $R/c320-sites.json > $R/c320-sites.out 2>&1
