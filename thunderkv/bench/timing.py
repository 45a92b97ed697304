"""Timing and provenance shared by every benchmark."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call at the 20th, 50th and 80th percentile of ``reps`` timed calls."""

    p20: float
    p50: float
    p80: float
    reps: int


def _percentile(sorted_values: list[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def time_calls(
    fn: Callable[[], object],
    *,
    reps: int,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
) -> Timing:
    """Time ``fn`` ``reps`` times after ``warmup`` calls; ``sync`` (e.g. cuda synchronize)
    runs before each clock read so asynchronous work is counted."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return Timing(_percentile(samples, 0.2), _percentile(samples, 0.5), _percentile(samples, 0.8), reps)


def time_graph(fn: Callable[[], object], *, device, reps: int, inner: int = 10) -> Timing:
    """CUDA: ``fn`` (whose tensors live on ``device``) recorded into a CUDA graph (after one
    warm-up call on a side stream, where Triton compiles) and replayed back to back: each of
    ``reps`` samples is ``inner`` replays between two CUDA events, divided by ``inner``. This
    is the kernels' own time, as a serving engine's graph-captured step sees it: no Python,
    argument checks or per-call host sync, which at ~20-40 us per 64 MiB kernel on an
    H100/H200 would otherwise dominate. ``device`` is made current for all of it (streams,
    capture and events belong to the current device). Raises whatever capture raises (e.g.
    an op that syncs the host)."""
    import torch

    with torch.cuda.device(device):
        return _time_graph_here(fn, reps, inner)


def _time_graph_here(fn: Callable[[], object], reps: int, inner: int) -> Timing:
    """:func:`time_graph` on the current CUDA device."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    samples.sort()
    return Timing(_percentile(samples, 0.2), _percentile(samples, 0.5), _percentile(samples, 0.8), reps)


def git_sha() -> str | None:
    """The checkout's commit, or ``THUNDERKV_GIT_SHA`` where there is no git repository (a
    copied working tree, as on the lent GPU machines: gpu_check.sh sets it)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent,
        )
        sha = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or os.environ.get("THUNDERKV_GIT_SHA") or None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str) -> dict:
    """Where and with what a measurement was taken (added to every JSON line)."""
    import numpy
    import torch

    import thunderkv
    from thunderkv.envinfo import kernel_env

    return {
        "device": device,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "thunderkv": thunderkv.__version__,
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # settings that change which kernels run (e.g. the scalar CUDA kernels, for an A/B)
        "env": kernel_env(),
    }


def write_json_lines(path: str | Path, rows: list[dict]) -> None:
    """Append one JSON object per row to ``path`` (parents created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
