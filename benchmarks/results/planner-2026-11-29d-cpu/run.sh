#!/usr/bin/env bash
# Lightweight rescheduling that replays the search's next-best states within its 2 s budget
# (0c89982), on the 2026-11-29c conversation plan: every single-node loss vs a full re-plan.
# 2026-11-29, 2-core AMD EPYC VM, one job at a time. From the repository root, venv on PATH.
set -x
R=benchmarks/results/planner-2026-11-29d-cpu
thunderkv plan --reschedule benchmarks/results/planner-2026-11-29c-cpu/conv.json --fail each \
  --json $R/sweep-conv.json --plot $R/sweep-conv.png > $R/sweep-conv.out 2>&1
