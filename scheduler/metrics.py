"""Latency percentiles, SLO attainment, goodput search and latency-deadline scale."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .simulator import SimResult
from .workload import SLO

TARGET_ATTAINMENT = 0.90


def attainment(res: SimResult, slo: SLO) -> float:
    """Fraction of requests that finished with TTFT <= slo.ttft and TPOT <= slo.tpot."""
    ok = np.isfinite(res.finish) & (res.ttft <= slo.ttft) & (res.tpot <= slo.tpot)
    return float(ok.mean())


def _pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if len(x) else float("nan")


def summarize(res: SimResult, slo: SLO) -> dict[str, float]:
    """TTFT/TPOT/E2E percentiles (s), SLO attainment, throughput."""
    done = np.isfinite(res.finish)
    span = float(np.nanmax(res.finish) - res.arrival.min()) if done.any() else float("nan")
    toks = float(res.outputs[done].sum())
    return {
        "requests": int(len(res.arrival)), "finished": int(done.sum()),
        "slo_attainment": round(attainment(res, slo), 4),
        "ttft_p50": _pct(res.ttft, 50), "ttft_p90": _pct(res.ttft, 90), "ttft_p99": _pct(res.ttft, 99),
        "tpot_p50": _pct(res.tpot, 50), "tpot_p90": _pct(res.tpot, 90), "tpot_p99": _pct(res.tpot, 99),
        "e2e_p50": _pct(res.e2e, 50), "e2e_p90": _pct(res.e2e, 90),
        "tokens_per_s": toks / span if span and span > 0 else 0.0,
        "req_per_s": float(done.sum()) / span if span and span > 0 else 0.0,
    }


def required_scale(res: SimResult, slo: SLO, target: float = TARGET_ATTAINMENT) -> float:
    """Smallest k such that scaling both deadlines by k reaches ``target`` attainment
    (the latency-deadline comparison: a system needing a smaller k meets tighter SLOs)."""
    need = np.maximum(res.ttft / slo.ttft, res.tpot / slo.tpot)
    need = np.where(np.isfinite(res.finish), need, np.inf)
    return float(np.quantile(need, target, method="inverted_cdf"))


def goodput_search(run: Callable[[float], SimResult], slo: SLO, hint: float,
                   target: float = TARGET_ATTAINMENT, rel_tol: float = 0.01,
                   max_sims: int = 18, on_sim: Callable[[float, float], None] | None = None
                   ) -> tuple[float, dict[float, float]]:
    """Highest rate (req/s) whose simulated attainment is >= ``target``.

    ``run(rate)`` simulates at ``rate``. Brackets from ``hint`` by factors of 1.5, then bisects to
    ``rel_tol``. ``on_sim(rate, attainment)`` is called after each simulation (progress).
    Returns (goodput, {rate: attainment} of every simulation run).
    """
    seen: dict[float, float] = {}

    def ok(rate: float) -> bool:
        if rate not in seen:
            seen[rate] = attainment(run(rate), slo)
            if on_sim is not None:
                on_sim(rate, seen[rate])
        return seen[rate] >= target

    r = hint if hint > 0 else 0.1
    if ok(r):
        lo, hi = r, r * 1.5
        while ok(hi) and len(seen) < max_sims:
            lo, hi = hi, hi * 1.5
    else:
        hi, lo = r, r / 1.5
        while not ok(lo) and len(seen) < max_sims:
            if lo < 1e-3:
                return 0.0, seen
            hi, lo = lo, lo / 1.5
    if not ok(lo):
        return 0.0, seen
    while hi / lo - 1 > rel_tol and len(seen) < max_sims:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, seen
