"""Pieces every benchmark shares: the copy baseline, device sync, backend selection, rows
(one measurement with provenance, as written to JSON lines) and the printed table."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .. import backends
from .timing import Timing, time_calls


def device_label(device: torch.device) -> str:
    return str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"


def copy_fn(x: torch.Tensor) -> tuple[str, Callable[[], object]]:
    """The same-run baseline: (name, a function copying ``x`` once). ``numpy.copyto`` on CPU
    (torch's float16 ``copy_`` is far below memory speed there), device ``copy_`` on CUDA."""
    if x.device.type == "cpu":
        import numpy as np

        src = x.view(torch.int16).numpy() if x.element_size() == 2 else x.numpy()
        dst = np.empty_like(src)
        return "numpy", lambda: np.copyto(dst, src)
    dst = torch.empty_like(x)
    return "torch", lambda: dst.copy_(x)


def device_sync(device: torch.device) -> Callable[[], object] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def backend_problem(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot be timed on ``device`` (None when it can): an unknown name,
    or the backend's own reason it is unavailable there."""
    if name not in backends.BACKENDS:
        return f"unknown backend {name!r}; choose from {', '.join(backends.BACKENDS)}"
    why = backends.unavailable_reason(name, device)
    return None if why is None else f"backend {name!r} unavailable on {device}: {why}"


def usable_backends(device: torch.device, wanted: Iterable[str] | None) -> list[str]:
    """Backends to time on ``device`` (the requested ones, or every one usable there).
    A requested one that is unknown raises ValueError, one unavailable there RuntimeError."""
    if wanted:
        for name in wanted:
            why = backend_problem(name, device)
            if why is not None:
                raise (ValueError if name not in backends.BACKENDS else RuntimeError)(why)
        return list(wanted)
    return [n for n in backends.BACKENDS if backends.unavailable_reason(n, device) is None]


def measurement_row(base: dict, op: str, backend: str, t: Timing, nbytes: int, copy_gbps: float) -> dict:
    gbps = nbytes / t.p50 / 1e9
    return {
        **base,
        "op": op,
        "backend": backend,
        "bytes": nbytes,
        "reps": t.reps,
        "p20_s": t.p20,
        "p50_s": t.p50,
        "p80_s": t.p80,
        "gbps": gbps,
        "ratio_to_copy": gbps / copy_gbps,
    }


def add_graph_timing(row: dict, fn: Callable[[], object], device: torch.device,
                     copy_graph_gbps: float | None, reps: int, *, baseline: bool = False
                     ) -> float | None:
    """Time ``fn`` replayed from a CUDA graph on ``device`` (:func:`~.timing.time_graph`) and
    add ``graph_p20_s``/``graph_p50_s``/``graph_p80_s``, ``graph_gbps`` (``row["bytes"]`` per
    second) and ``graph_ratio_to_copy`` to ``row``: over ``copy_graph_gbps``, 1 for the copy
    row itself (``baseline``), and left out when the copy could not be graph-timed (the
    targets then fall back to the eager ratio). An op that cannot be captured gets
    ``graph_error`` instead. Returns the graph GB/s (None on error)."""
    from .timing import time_graph

    try:
        t = time_graph(fn, device=device, reps=reps)
    except Exception as e:  # noqa: BLE001 -- reported in the row, the eager timing stands
        cause = e.__context__  # a failed capture_end hides what broke the capture
        row["graph_error"] = (f"{type(e).__name__}: {e}"
                              + (f" (after {type(cause).__name__}: {cause})" if cause else ""))[:400]
        return None
    gbps = row["bytes"] / t.p50 / 1e9
    row.update(graph_p20_s=t.p20, graph_p50_s=t.p50, graph_p80_s=t.p80, graph_gbps=gbps)
    if baseline or copy_graph_gbps:
        row["graph_ratio_to_copy"] = 1.0 if baseline else gbps / copy_graph_gbps
    return gbps


def copy_baseline(base: dict, x: torch.Tensor, *, reps: int, sync, graph: bool
                  ) -> tuple[dict, float, float | None]:
    """The same-run baseline row: ``x`` copied once per call (:func:`copy_fn`; read + write =
    ``2 * x.nbytes``), timed eagerly and, with ``graph`` (CUDA), from a CUDA graph. Returns
    (row, eager GB/s, graph GB/s or None) -- the rates every op row is compared with."""
    name, copy = copy_fn(x)
    t = time_calls(copy, reps=reps, sync=sync)
    nbytes = 2 * x.nbytes
    gbps = nbytes / t.p50 / 1e9
    row = measurement_row(base, "copy", name, t, nbytes, gbps)
    graph_gbps = (add_graph_timing(row, copy, x.device, None, reps, baseline=True)
                  if graph else None)
    return row, gbps, graph_gbps


def number(value: float, decimals: int) -> str:
    """``value`` to ``decimals`` places, or to two significant digits where those places would
    show fewer: a slow backend's 0.0017 GB/s or 0.4x is not "0.00" or "0", nor 0.6x "1"."""
    if value and abs(value) < 10.0 ** (1 - decimals):
        return f"{value:.2g}"
    return f"{value:.{decimals}f}"


def render_table(rows: list[dict], title: str):
    """A rich Table of the rows (one line per shape/op/backend); with CUDA-graph timings, two
    more columns: their GB/s and ratio to the graph-timed copy ("-" where capture failed).
    Only the shape label wraps; every other column is at least as wide as its widest cell,
    so a narrow console never cuts a number (print it with :func:`print_table`)."""
    from rich.table import Table

    graph = any("graph_gbps" in r or "graph_error" in r for r in rows)
    cols = ["heads x tokens", "op", "backend", "p50 ms", "GB/s", "x copy", "x ref"]
    cols += ["graph GB/s", "graph x copy"] if graph else []
    body = []
    for r in rows:
        ref = r.get("speedup_vs_reference")
        cells = [r["label"], r["op"], r["backend"], number(r["p50_s"] * 1e3, 3),
                 number(r["gbps"], 2), number(r["ratio_to_copy"], 2),
                 "" if ref is None else number(ref, 0)]
        if graph:
            gbps, ratio = r.get("graph_gbps"), r.get("graph_ratio_to_copy")
            cells += ["-" if gbps is None else number(gbps, 2),
                      "-" if ratio is None else number(ratio, 2)]
        body.append(cells)
    table = Table(title=title, caption=reference_caption(rows))
    for i, col in enumerate(cols):
        wraps = col == "heads x tokens"
        table.add_column(col, justify="left" if col in ("heads x tokens", "op", "backend") else "right",
                         no_wrap=not wraps,
                         min_width=None if wraps else max(len(c[i]) for c in [cols, *body]))
    for cells in body:
        table.add_row(*cells)
    return table


def reference_mismatches(rows: list[dict]) -> list[str]:
    """"op [backend] on shape" for each row whose output did not match the reference."""
    return [f"{r['op']} [{r['backend']}] on {r['label']}" for r in rows
            if r.get("matches_reference") is False]


def reference_caption(rows: list[dict]) -> str | None:
    """What the check against the reference found, for rows that carry one (None if none)."""
    checked = [r for r in rows if "matches_reference" in r]
    if not checked:
        return None
    bad = reference_mismatches(rows)
    found = (f"{len(bad)} of {len(checked)} DIFFER" if bad else f"all {len(checked)} match")
    return f"checked against the reference before timing: {found}"


def print_table(console, table) -> None:
    """Print ``table`` whole: where ``console`` (80 columns when piped) is narrower than the
    table's narrowest rendering (wrapping columns wrapped, the others whole), it is widened
    to the table's unwrapped width for this table rather than letting rich cut cells to
    "1234.…"."""
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update_width(1 << 16), table)
    width = console.width
    if need.minimum > width:  # too narrow even wrapped: as wide as the table is unwrapped
        console.width = need.maximum
    try:
        console.print(table)
    finally:
        console.width = width


def plot_vs_copy(rows: list[dict], path, title: str, target: float | None = None) -> None:
    """PNG: per shape, each (op, backend)'s bytes/s as a fraction of the same run's copy
    (CUDA-graph timings where the run has them), with the copy at 1.0 and ``target`` (e.g.
    the issue's 0.85) drawn as lines. Needs matplotlib."""
    from thunderkv.plotting import pyplot

    plt = pyplot()
    graph = any("graph_ratio_to_copy" in r for r in rows)
    key = "graph_ratio_to_copy" if graph else "ratio_to_copy"
    shapes = list(dict.fromkeys(r["label"] for r in rows))
    series = list(dict.fromkeys((r["op"], r["backend"]) for r in rows if r["op"] != "copy"))
    by = {(r["label"], r["op"], r["backend"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(shapes) + 3), 4.2))
    width = 0.8 / max(len(series), 1)
    for i, (op, backend) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(shapes))]
        vals = [(by.get((s, op, backend)) or {}).get(key) or 0.0 for s in shapes]
        bars = ax.bar(xs, vals, width, label=f"{op} ({backend})")
        for bar, v in zip(bars, vals):
            if v:
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                            va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", lw=1, label="copy (same run)")
    if target is not None:
        ax.axhline(target, color="tab:red", lw=1, ls="--", label=f"target {target:.2f}")
    ax.set_xticks(range(len(shapes)), shapes, fontsize=8)
    ax.set_ylabel("bytes/s as a fraction of the copy's" + (" (CUDA graphs)" if graph else ""))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
