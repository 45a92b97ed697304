"""Lower level, part 2: routing prefill -> decode as a linear program (scipy HiGHS).

Variables ``x[i, j]`` (req/s sent from prefill group i to decode group j). Constraints:
prefill capacity ``sum_j x[i, j] <= P[i]``, decode capacity ``sum_i x[i, j] <= D[j]``, and for
every network resource ``l`` -- a node link, or one direction of a node's NIC -- the KV bytes it
carries ``sum_ij x[i, j] * bytes[i, j, l] <= C[l]`` (bytes per request from the mean prompt;
compressed or raw per the cost model; ``costmodel.KVLeg`` names the resources). Pairs whose mean
transfer time exceeds the transfer budget are not allowed. Objective: maximise total rate; the
final routing then minimises the rate-weighted transfer time among maximal solutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

LinkKey = tuple[str, ...]  # a node link (a, b) or a NIC direction ("nic", node, "out" | "in")


@dataclass(slots=True)
class RoutingProblem:
    """Inputs of the routing LP (see module docstring)."""

    pcap: list[float]
    dcap: list[float]
    pair_bytes: list[list[dict[LinkKey, float]]]   # [i][j] resource -> bytes per request
    pair_time: list[list[float]]                    # [i][j] mean transfer seconds per request
    link_cap: dict[LinkKey, float]                  # resource -> usable bytes/s
    budget: float = float("inf")                    # max allowed mean transfer time per request

    def __post_init__(self) -> None:
        n, m = len(self.pcap), len(self.dcap)
        if len(self.pair_bytes) != n or any(len(r) != m for r in self.pair_bytes):
            raise ValueError("pair_bytes must be len(pcap) x len(dcap)")
        if len(self.pair_time) != n or any(len(r) != m for r in self.pair_time):
            raise ValueError("pair_time must be len(pcap) x len(dcap)")
        if any(c < 0 for c in self.pcap) or any(c < 0 for c in self.dcap):
            raise ValueError("capacities must be >= 0")

    def allowed(self, i: int, j: int) -> bool:
        return self.pair_time[i][j] <= self.budget and self.pcap[i] > 0 and self.dcap[j] > 0


@dataclass(slots=True)
class Routing:
    """``flow[i][j]`` req/s; ``total`` = sum of flows."""

    flow: np.ndarray
    total: float


def _proportional(p: RoutingProblem) -> np.ndarray:
    P, D = np.asarray(p.pcap, float), np.asarray(p.dcap, float)
    total = min(P.sum(), D.sum())
    if total <= 0:
        return np.zeros((len(P), len(D)))
    return total * np.outer(P / P.sum(), D / D.sum())


def _feasible(p: RoutingProblem, x: np.ndarray, tol: float = 1e-9) -> bool:
    load: dict[LinkKey, float] = {}
    for i, j in zip(*np.nonzero(x)):
        if not p.allowed(i, j):
            return False
        for k, b in p.pair_bytes[i][j].items():
            load[k] = load.get(k, 0.0) + x[i, j] * b
    return all(v <= p.link_cap[k] * (1 + tol) + tol for k, v in load.items())


def max_throughput(p: RoutingProblem) -> float:
    """Maximum routable rate (fast path when the proportional split is already feasible)."""
    x = _proportional(p)
    if _feasible(p, x):
        return float(x.sum())
    return solve(p, tiebreak=False).total


def solve(p: RoutingProblem, tiebreak: bool = True) -> Routing:
    """Solve the LP; with ``tiebreak`` minimise transfer time among max-rate routings.

    The constraint matrix is built sparse: one row per replica and per network resource, but
    each pair touches only its two replicas and the few resources its KV crosses (a 320-GPU
    plan has thousands of pairs and hundreds of resources)."""
    n, m = len(p.pcap), len(p.dcap)
    pairs = [(i, j) for i in range(n) for j in range(m) if p.allowed(i, j)]
    flow = np.zeros((n, m))
    if not pairs:
        return Routing(flow, 0.0)
    links = sorted({k for i, j in pairs for k in p.pair_bytes[i][j]})
    row_of = {k: n + m + r for r, k in enumerate(links)}
    rows, cols, vals = [], [], []
    for c, (i, j) in enumerate(pairs):
        rows += [i, n + j]
        cols += [c, c]
        vals += [1.0, 1.0]
        for k, b in p.pair_bytes[i][j].items():
            rows.append(row_of[k])
            cols.append(c)
            vals.append(b / p.link_cap[k])  # normalised: load / capacity <= 1
    A = sparse.csr_matrix((vals, (rows, cols)), shape=(n + m + len(links), len(pairs)))
    bv = np.concatenate([np.asarray(p.pcap, float), np.asarray(p.dcap, float),
                         np.ones(len(links))])
    res = linprog(-np.ones(len(pairs)), A_ub=A, b_ub=bv, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"routing LP failed: {res.message}")
    x, best = res.x, -res.fun
    if tiebreak and best > 0:
        t = np.asarray([p.pair_time[i][j] for i, j in pairs])
        A2 = sparse.vstack([A, sparse.csr_matrix(-np.ones((1, len(pairs))))], format="csr")
        b2 = np.append(bv, -best * (1 - 1e-7))
        res2 = linprog(t + 1e-9, A_ub=A2, b_ub=b2, bounds=(0, None), method="highs")
        if res2.status == 0:
            x = res2.x
    for (i, j), v in zip(pairs, x):
        flow[i, j] = max(v, 0.0)
    return Routing(flow, float(flow.sum()))


def proportional(p: RoutingProblem) -> Routing:
    """Network-unaware routing (ablation): split by capacity, ignoring links and budgets."""
    x = _proportional(p)
    return Routing(x, float(x.sum()))
