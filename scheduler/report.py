"""Human output: rich tables of a plan and of the systems, and the attainment-vs-rate plot."""

from __future__ import annotations

from typing import Any

import numpy as np

from thunderkv.plotting import pyplot

from .metrics import attainment


def plan_table(doc: dict[str, Any], title: str = "plan"):
    """A rich Table of ``doc['plan']`` (groups with phase, TP/PP, layers and capacity)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("#", "phase", "GPUs", "TP", "PP", "layers", "model req/s"):
        t.add_column(col, justify="right" if col in ("#", "TP", "PP", "model req/s") else "left")
    for i, g in enumerate(doc["plan"]["groups"]):
        gpus = _compact(g["gpus"])
        idle = not any(g["layers"])  # the planner found no layout that fits: GPUs left unused
        t.add_row(str(i), "idle" if idle else g["phase"], gpus, str(g["tp"]), str(g["pp"]),
                  "-" if idle else "/".join(map(str, g["layers"])),
                  f"{g['capacity_req_per_s']:.2f}")
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


def sweep_table(doc: dict[str, Any]):
    """``--fail each``: per lost node, lightweight vs full re-plan goodput and their ratio."""
    from rich.table import Table

    s = doc["summary"]
    title = (f"one node lost at a time (plan: {_f(doc.get('original_goodput_req_per_s'))} req/s)"
             + (f"; within 10 % of a full re-plan: {s['within_10_percent']}/{s['nodes']}, "
                f"worst {s['min_ratio']:.3f}" if "min_ratio" in s else ""))
    t = Table(title=title)
    for col in ("lost", _adjusted_label(doc, short=True), "full re-plan", "ratio", "seconds",
                "reloading GPUs"):
        t.add_column(col, justify="left" if col == "lost" else "right")
    for r in doc["sweep"]:
        t.add_row(r["failed"], _f(r["lightweight_goodput_req_per_s"]),
                  _f(r["full_replan_goodput_req_per_s"]), _f(r["ratio_to_full_replan"], 3),
                  f"{r['reschedule_seconds']:.2f}", str(r["regrouped_gpus"]))
    return t


def _adjusted_label(doc: dict[str, Any], short: bool = False) -> str:
    """What the sweep's adjusted plans are: lightweight, or a partial reload of K groups."""
    k = doc.get("summary", {}).get("reload_groups", 0)
    if k:
        return f"partial reload (K={k})" if short else \
            f"partial reload: up to {k} intact group(s) re-formed too"
    return "lightweight" if short else "lightweight (phases + routing, orphans re-grouped)"


def plot_sweep(doc: dict[str, Any], path: str, title: str) -> None:
    """Bars per lost node: lightweight vs full re-plan goodput, ratio on top."""
    plt = pyplot()
    rows = doc["sweep"]
    x = np.arange(len(rows))
    light = [r["lightweight_goodput_req_per_s"] for r in rows]
    full = [r["full_replan_goodput_req_per_s"] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4))
    ax.bar(x - 0.2, light, 0.4, label=_adjusted_label(doc))
    ax.bar(x + 0.2, full, 0.4, label="full re-plan", color="grey")
    for i, r in enumerate(rows):
        if r["ratio_to_full_replan"] is not None:
            ax.text(i, max(light[i], full[i]) * 1.01, f"{r['ratio_to_full_replan']:.3f}",
                    ha="center", va="bottom", fontsize=8,
                    bbox={"fc": "white", "ec": "none", "pad": 0.5})  # legible over the line
    if doc.get("original_goodput_req_per_s"):
        ax.axhline(doc["original_goodput_req_per_s"], color="black", ls="--", lw=0.8,
                   label="before the failure")
    ax.set_xticks(x, [r["failed"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("simulated goodput (req/s)")
    ax.set_title(title)
    top = max(light + full + [doc.get("original_goodput_req_per_s") or 0.0])
    ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)  # the ratios and the legend above the bars
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def plot_attainment(curves: dict[str, list[tuple[float, float]]], path: str, title: str) -> None:
    """SLO attainment vs request rate, one line per system (the shape of ThunderServe's Fig. 5).

    Raises RuntimeError with an install hint when matplotlib is missing.
    """
    plt = pyplot()
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
