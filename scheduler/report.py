"""Human output: rich tables of a plan and of the systems, and the attainment-vs-rate plot."""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import attainment


def plan_table(doc: dict[str, Any], title: str = "plan"):
    """A rich Table of ``doc['plan']`` (groups with phase, TP/PP, layers and capacity)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("#", "phase", "GPUs", "TP", "PP", "layers", "model req/s"):
        t.add_column(col, justify="right" if col in ("#", "TP", "PP", "model req/s") else "left")
    for i, g in enumerate(doc["plan"]["groups"]):
        gpus = _compact(g["gpus"])
        t.add_row(str(i), g["phase"], gpus, str(g["tp"]), str(g["pp"]),
                  "/".join(map(str, g["layers"])), f"{g['capacity_req_per_s']:.2f}")
    return t


def _compact(gpus: list[str]) -> str:
    by: dict[str, list[str]] = {}
    for g in gpus:
        n, i = g.rsplit(":", 1)
        by.setdefault(n, []).append(i)
    return " ".join(f"{n}:{','.join(v)}" for n, v in by.items())


def systems_table(doc: dict[str, Any]):
    """Ours vs baselines vs ablations: goodput, $/h, per-dollar, latencies at goodput, ratios."""
    from rich.table import Table

    t = Table(title="systems: goodput = max req/s at >= 90% SLO attainment (same simulator); "
                    "x = ours / system (goodput, per dollar, latency deadline)")
    for col in ("system", "$/h", "goodput", "per $/h", "tok/s", "TTFT90", "TPOT90",
                "x good", "x per$", "x ddl"):
        t.add_column(col, justify="left" if col == "system" else "right")
    rows = [("thunderkv", doc["predicted"])] + list(doc.get("baselines", {}).items()) + \
        list(doc.get("ablations", {}).items())
    for name, m in rows:
        r = doc.get("ratios", {}).get(name, {})
        t.add_row(name, f"{m['cost_per_hour']:.2f}", f"{m['goodput_req_per_s']:.2f}",
                  _f(m.get("goodput_per_dollar_hour")), f"{m['tokens_per_s']:.0f}",
                  _f(m.get("ttft_p90")), _f(m.get("tpot_p90"), 3), _f(r.get("goodput")),
                  _f(r.get("goodput_per_dollar")), _f(r.get("latency_deadline")))
    return t


def _f(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def plot_attainment(curves: dict[str, list[tuple[float, float]]], path: str, title: str) -> None:
    """SLO attainment vs request rate, one line per system (the shape of ThunderServe's Fig. 5).

    Raises RuntimeError with an install hint when matplotlib is missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, np.asarray(ys) * 100, marker="o", ms=3, label=name,
                lw=2.5 if name == "thunderkv" else 1.2)
    ax.axhline(90, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attainment_curves(raw: dict[str, dict], run_for, slo, rates: list[float]
                      ) -> dict[str, list[tuple[float, float]]]:
    """Simulated attainment of every system at each of ``rates``."""
    return {n: [(r, attainment(run_for(n)(r), slo)) for r in rates] for n in raw}
