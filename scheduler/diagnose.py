"""Why a plan serves nothing: plain-language notes for the plan JSON and the CLI."""

from __future__ import annotations

import numpy as np

from .evaluate import Evaluator
from .metrics import summarize
from .plan import Plan
from .simulator import simulate
from .workload import SLO, Workload


def zero_goodput_notes(plan: Plan, ev: Evaluator, wl: Workload, slo: SLO) -> list[str]:
    """Notes explaining a goodput of 0 req/s for ``plan`` (empty when nothing explains it)."""
    m = ev.model
    if plan.objective <= 0:
        usable = [g for g in plan.groups if min(g.layers) > 0]
        if not usable:
            return [f"no group of this cluster holds {m.name} ({m.weight_bytes / 1e9:.0f} GB of "
                    "weights) with room for its KV cache: add GPUs or memory"]
        phases = {g.phase for g in usable}
        if "colocated" not in phases and not {"prefill", "decode"} <= phases:
            return ["the plan has no " + ("decode" if "decode" not in phases else "prefill")
                    + " group: this cluster holds too few model replicas to split the phases"]
        return [f"no group meets the SLOs (TTFT {slo.ttft:g} s, TPOT {slo.tpot:g} s) at any "
                "rate: loosen them or add faster GPUs"]
    caps = [g.pipeline(ev.cluster, m, ev.params).kv_token_capacity() for g in plan.groups
            if min(g.layers) > 0 and g.phase in ("decode", "colocated")]
    need = wl.prompts + wl.outputs
    largest = max(caps, default=0)
    too_big = int((need > largest).sum())
    if too_big:
        return [f"{too_big} of {len(wl)} requests need more KV than any decode group holds "
                f"(up to {int(need.max())} tokens of prompt + output; largest group "
                f"{largest} tokens): they never finish"]
    rate = max(plan.objective * 0.05, 1e-3)  # far below the model's capacity
    res = simulate(plan, ev.cluster, m, ev.params, wl.arrivals_at(rate, "poisson", 0))
    s = summarize(res, slo)
    late = (f"TTFT p90 {s['ttft_p90']:.3g} s vs {slo.ttft:g} s, TPOT p90 {s['tpot_p90']:.3g} s "
            f"vs {slo.tpot:g} s") if np.isfinite(s.get("ttft_p90", np.nan)) else "none finished"
    return [f"even at {rate:.3g} req/s only {s['slo_attainment']:.0%} of requests meet both "
            f"deadlines ({late}): the SLOs are out of this plan's reach"]
