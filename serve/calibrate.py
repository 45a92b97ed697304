"""Simulator fidelity: calibrate the planner's cost model for this CPU, replay a measured
``bench e2e`` workload through the simulator, and compare TTFT/TPOT with the measured ones.

Three steps:

* :func:`measure_cpu_costs` times prefill and batched decode steps of a
  :class:`~thunderkv.serve.runner.ModelRunner` on one torch thread (what a serving worker uses);
* :func:`fit_cpu_gpu_type` fits a ``"cpu"`` catalog entry (:class:`thunderkv.scheduler.cluster.GpuType`)
  to those timings by least squares on the relative error. The cost model is used as is: its
  FLOPs, bytes and overhead counts per measured point are read off
  :class:`~thunderkv.scheduler.costmodel.Pipeline` itself, so the fit can never disagree with the
  formula it calibrates. Free parameters: achieved FLOP/s and bytes/s (``fp16_tflops`` x
  ``compute_eff``, ``mem_bw_gbs`` x ``mem_eff``) and, unless ``overheads=False``, the per-layer /
  per-sequence overheads (``layer_overhead_s``, ``seq_overhead_s``) that dominate a CPU running
  a 135M model one Python op at a time;
* :func:`simulate_measured` rebuilds the measured runs as planner inputs (2 "cpu" devices, the
  shaped link, the workload's arrival times and lengths, one plan per mode) and reports
  predicted vs measured TTFT/TPOT p50/p90. By default the simulator is told what the serving
  loop does differently from the planner's model (both opt-in knobs of
  :func:`~thunderkv.scheduler.simulator.simulate`): each request's KV message size (4-bit
  messages send the ``tokens % 64`` tail raw) and layer-streamed transfers.

What "TTFT" means is taken from the serving loop, not the simulator: a disaggregated request's
first token reaches the client when the decode worker has imported its KV (the router forwards it
with the DECODING event), so the predicted TTFT of a disaggregated mode is the simulator's
``decode_start - arrival`` (the simulator's own ``first_token`` is the end of the prefill, before
the transfer; it is reported as ``sim_ttft_p50_prefill_done_s``) and its TPOT is counted from
there. Percentiles use the benchmark's own nearest-rank rule.

``python -m thunderkv.serve.calibrate [--rows PATH] [--json OUT]`` measures SmolLM2, fits, simulates
and prints the tables (``--costs`` reuses timings saved by an earlier ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from thunderkv.scheduler.cluster import Cluster, GpuType, NodeSpec
from thunderkv.scheduler.costmodel import CostParams, Pipeline, build_pipeline
from thunderkv.scheduler.kv_bytes import kv_bytes_per_element
from thunderkv.scheduler.model import ModelSpec
from thunderkv.scheduler.plan import Plan, PlanGroup
from thunderkv.scheduler.simulator import SimResult, simulate
from thunderkv.scheduler.workload import Workload

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = REPO / "benchmarks" / "results" / "e2e-2026-11-28-cpu" / "smollm2-quick-20mbit.jsonl"
GPU_NAME = "cpu"
METRICS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")
TARGET_REL_ERROR = 0.20

# SmolLM2-135M as the runner loads it (KV cache fp16 = the wire's 16-bit format; the weights are
# float32 on CPU, so the fitted bandwidth is "fp16-equivalent": half the bytes/s really moved).
SMOLLM2 = ModelSpec("smollm2", layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152)
MODEL_SPECS = {"smollm2": SMOLLM2}
# Tokens of ``default_text() * 4`` under each model's tokenizer: bench_e2e.workload draws the
# prompt offsets with randrange over this length, so the arrival times depend on it (and on
# nothing else about the tokenizer). "tiny" uses bytes and is computed.
TEXT_TOKENS = {"smollm2": 18864}


# --------------------------------------------------------------------------------------------
# 1. measuring
# --------------------------------------------------------------------------------------------
def model_spec_of(runner) -> ModelSpec:
    """The planner's view of a :class:`ModelRunner`'s model (dtype = the KV cache's)."""
    layer = runner.layers[0]
    return ModelSpec(str(runner.name), runner.num_layers, runner.hidden_size, runner.num_heads,
                     runner.num_kv_heads, int(layer.w_down.shape[1]), runner.vocab_size,
                     dtype_bytes=int(runner.kv_dtype.itemsize))


def _prompt(n: int, vocab: int, salt: int = 0) -> list[int]:
    return [(7919 * i + 104729 * salt + 13) % vocab for i in range(n)]


def measure_cpu_costs(runner, prompt_lengths: Sequence[int] = (32, 64, 128, 256),
                      batches: Sequence[int] = (1, 2, 4), context: int = 128, *,
                      reps: int = 5, threads: int = 1) -> dict:
    """Median seconds of ``runner.prefill`` per prompt length and of one batched
    ``runner.decode`` step per batch size (every sequence holding ``context`` tokens), on
    ``threads`` torch threads (serving workers use 1). One warm-up call before each point.

    Returns ``{"model", "threads", "reps", "context", "spec": ModelSpec fields,
    "prefill": [{"tokens", "seconds"}], "decode": [{"batch", "context", "seconds"}]}``.
    """
    import torch

    if reps < 1:
        raise ValueError("reps must be >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        vocab = runner.vocab_size
        prefill = []
        for n in prompt_lengths:
            ids = _prompt(n, vocab)
            runner.prefill(ids)
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                runner.prefill(ids)
                samples.append(time.perf_counter() - t0)
            prefill.append({"tokens": int(n), "seconds": statistics.median(samples)})
        decode = []
        for b in batches:
            seqs = [runner.prefill(_prompt(context, vocab, salt=j + 1))[1] for j in range(b)]
            toks = [1] * b
            runner.decode(seqs, toks)  # warm-up (contexts grow by reps + 1 tokens: negligible)
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                runner.decode(seqs, toks)
                samples.append(time.perf_counter() - t0)
            decode.append({"batch": int(b), "context": int(context),
                           "seconds": statistics.median(samples)})
    finally:
        torch.set_num_threads(before)
    return {"model": str(runner.name), "threads": threads, "reps": reps, "context": int(context),
            "spec": dataclasses.asdict(model_spec_of(runner)), "prefill": prefill,
            "decode": decode}


# --------------------------------------------------------------------------------------------
# 2. fitting
# --------------------------------------------------------------------------------------------
def _one_device(gpu: GpuType) -> Cluster:
    return Cluster({gpu.name: gpu}, [NodeSpec("n0", gpu.name, 1, 1000.0)], 1.0)


def _pipe(gpu: GpuType, model: ModelSpec) -> Pipeline:
    return build_pipeline(_one_device(gpu), model, CostParams(), [("n0:0",)], [model.layers])


def _points(costs: dict) -> list[tuple[str, int, float, float]]:
    """(kind, size, ctx_tokens, seconds): prefill of ``size`` tokens or a decode step of batch
    ``size`` holding ``ctx_tokens`` context tokens in total."""
    pts = [("prefill", int(p["tokens"]), 0.0, float(p["seconds"])) for p in costs["prefill"]]
    pts += [("decode", int(d["batch"]), float(d["batch"] * d["context"]), float(d["seconds"]))
            for d in costs["decode"]]
    if not pts or any(s <= 0 for *_, s in pts):
        raise ValueError("costs need positive prefill/decode timings")
    return pts


def _predict(pipe: Pipeline, kind: str, size: int, ctx: float) -> float:
    return pipe.prefill(size)[0] if kind == "prefill" else pipe.decode_iter(size, ctx)


def _features(model: ModelSpec, pts) -> np.ndarray:
    """Per point (FLOPs, bytes, layer passes, sequence-layer passes), read off the cost model by
    probing it with devices where one term alone is non-negligible."""
    huge = 1e12  # TFLOP/s and GB/s of the probe devices: the other term is ~1e-12 of this one
    probes = {
        "flops": GpuType("probe", 1.0, 1e6, huge, 0.0, 1.0, 1.0),    # 1e12 FLOP/s, ~inf bytes/s
        "bytes": GpuType("probe", huge, 1e6, 1.0, 0.0, 1.0, 1.0),    # 1e9 bytes/s
        "zero": GpuType("probe", huge, 1e6, huge, 0.0, 1.0, 1.0),
        "layer": GpuType("probe", huge, 1e6, huge, 0.0, 1.0, 1.0, layer_overhead_s=1.0),
        "seq": GpuType("probe", huge, 1e6, huge, 0.0, 1.0, 1.0, seq_overhead_s=1.0),
    }
    pipes = {k: _pipe(g, model) for k, g in probes.items()}
    out = []
    for kind, size, ctx, _ in pts:
        t = {k: _predict(p, kind, size, ctx) for k, p in pipes.items()}
        out.append((t["flops"] * 1e12, t["bytes"] * 1e9, t["layer"] - t["zero"],
                    t["seq"] - t["zero"]))
    return np.asarray(out)


def fit_cpu_gpu_type(costs: dict, model_spec: ModelSpec | None = None, *,
                     overheads: bool = True, mem_gb: float | None = None,
                     peak_tflops: float | None = None, peak_bw_gbs: float | None = None,
                     ) -> dict:
    """A ``"cpu"`` catalog entry (``GpuType("cpu", **entry)``) fitted to ``costs``.

    Least squares on relative errors over every measured point of
    ``max(FLOPs / F, bytes / B) + layer_passes * layer_overhead_s + seq_layers * seq_overhead_s``
    (all counts from the cost model), F, B and the overheads >= 0, multi-start. With
    ``overheads=False`` only F and B are free (the cost model's existing knobs).
    ``peak_tflops``/``peak_bw_gbs``: datasheet peaks; given, F and B become
    ``compute_eff``/``mem_eff`` (must come out <= 1); else the peaks are the achieved rates and
    the efficiencies 1. ``mem_gb``: memory per device (default: half this machine's RAM, as two
    workers share it).

    Caveat: on a CPU the per-pass overheads and the weight-read time both show up as a constant
    per step, and prefill's intercept is larger than a 1-2 sequence decode step's, so with the
    overheads free the least squares may push the bandwidth far above the machine's (the
    overheads absorb the reads): the entry reproduces this model on this machine; do not
    extrapolate it to other model sizes.
    """
    from scipy.optimize import least_squares

    if model_spec is None:
        model_spec = ModelSpec(**costs["spec"])
    pts = _points(costs)
    y = np.array([p[3] for p in pts])
    X = _features(model_spec, pts)
    # unknowns: 1/F, 1/B, layer overhead, seq overhead, scaled so a typical point is ~1 each
    scale = np.array([np.median(y) / np.median(X[:, 0]), np.median(y) / np.median(X[:, 1]),
                      np.median(y) / max(np.median(X[:, 2]), 1e-12),
                      np.median(y) / max(np.median(X[:, 3]), 1e-12)])
    free = np.array([True, True, overheads, overheads])

    def model(x: np.ndarray) -> np.ndarray:
        p = np.where(free, x, 0.0) * scale
        return np.maximum(X[:, 0] * p[0], X[:, 1] * p[1]) + X[:, 2] * p[2] + X[:, 3] * p[3]

    def resid(x: np.ndarray) -> np.ndarray:
        return model(x) / y - 1.0

    best = None
    grid = (0.1, 1.0)
    for a in grid:
        for b in grid:
            for c in (grid if overheads else (0.0,)):
                for d in (grid if overheads else (0.0,)):
                    x0 = np.array([a, b, c, d])
                    r = least_squares(resid, x0, bounds=(0.0, np.inf), method="trf",
                                      x_scale=1.0, xtol=1e-12, ftol=1e-12, gtol=1e-12)
                    if best is None or r.cost < best.cost:
                        best = r
    p = np.where(free, best.x, 0.0) * scale
    floor = 1e-15  # a term the data cannot see still needs a finite rate: make it ~free
    flops = 1.0 / max(p[0], floor / 1e12)
    bw = 1.0 / max(p[1], floor / 1e9)
    tflops, gbs = flops / 1e12, bw / 1e9
    compute_eff = 1.0 if peak_tflops is None else tflops / peak_tflops
    mem_eff = 1.0 if peak_bw_gbs is None else gbs / peak_bw_gbs
    if compute_eff > 1 or mem_eff > 1:
        raise ValueError(f"fitted rates exceed the given peaks (compute_eff {compute_eff:.3g}, "
                         f"mem_eff {mem_eff:.3g})")
    if mem_gb is None:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 / 2
    return {"fp16_tflops": float(peak_tflops or tflops), "mem_gb": float(mem_gb),
            "mem_bw_gbs": float(peak_bw_gbs or gbs), "price_per_hour": 0.0,
            "compute_eff": float(compute_eff), "mem_eff": float(mem_eff),
            "layer_overhead_s": float(p[2]), "seq_overhead_s": float(p[3])}


def gpu_type(calibration: dict | GpuType, name: str = GPU_NAME) -> GpuType:
    """The :class:`GpuType` of a catalog entry (as :func:`fit_cpu_gpu_type` returns)."""
    if isinstance(calibration, GpuType):
        return calibration
    return GpuType(name, **calibration)


def fit_table(costs: dict, calibration: dict | GpuType,
              model_spec: ModelSpec | None = None) -> list[dict]:
    """Per measured point: measured vs cost-model seconds and the relative error."""
    model_spec = model_spec or ModelSpec(**costs["spec"])
    pipe = _pipe(gpu_type(calibration), model_spec)
    out = []
    for kind, size, ctx, sec in _points(costs):
        pred = _predict(pipe, kind, size, ctx)
        out.append({"kind": kind, "size": size, "ctx_tokens": ctx, "measured_s": sec,
                    "predicted_s": pred, "rel_error": pred / sec - 1})
    return out


# --------------------------------------------------------------------------------------------
# 3. the measured workload through the simulator
# --------------------------------------------------------------------------------------------
class _LengthTokenizer:
    """Stands in for a tokenizer in ``bench_e2e.workload``: only the length of the encoded
    text matters there (prompt *contents* do not reach the simulator)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def encode(self, text: str) -> list[int]:
        return list(range(self.n))


def _text_tokens(model: str) -> int:
    if model in TEXT_TOKENS:
        return TEXT_TOKENS[model]
    from thunderkv.hf.models import default_text

    from .tokenizer import load_tokenizer

    return len(load_tokenizer(model).encode(default_text() * 4))


def measured_workload(row: dict) -> Workload:
    """The job list ``bench e2e`` replayed for ``row`` (same arrivals, prompt and output
    lengths), rebuilt without loading the model's tokenizer."""
    from .bench_e2e import PRESETS, workload

    presets = [p for p in PRESETS.values() if p.requests == row["preset_requests"]]
    if len(presets) != 1:
        raise ValueError(f"no unique bench preset with {row['preset_requests']} requests")
    jobs = workload(presets[0], _LengthTokenizer(_text_tokens(row["model"])),
                    seed=int(row["seed"]), rate=row.get("rate_req_s"))
    prompts = [len(j.prompt) for j in jobs]
    if sum(prompts) != row["prompt_tokens"]:
        raise ValueError(f"rebuilt workload has {sum(prompts)} prompt tokens, the row "
                         f"{row['prompt_tokens']}: not the measured job list")
    return Workload([j.arrival for j in jobs], prompts, [j.max_tokens for j in jobs],
                    f"{row['model']}-{row['mode']}")


def load_rows(rows_or_path: str | Path | Iterable[dict]) -> list[dict]:
    if isinstance(rows_or_path, (str, Path)):
        return [json.loads(line) for line in Path(rows_or_path).read_text().splitlines()
                if line.strip()]
    return list(rows_or_path)


def message_bytes(tokens: int, bits: int, model: ModelSpec, group_size: int = 64,
                  sink: int = 0) -> float:
    """Payload bytes of one sequence's KV message as :mod:`thunderkv.serve.kvwire` builds it:
    16-bit sends every token raw; quantized messages send the first ``sink`` tokens raw, then
    whole groups of ``g = min(group_size, head_dim)`` tokens in format v1, and the ragged tail
    raw. (``sink`` 0: rows measured before the sink existed.)"""
    per_token = model.kv_elements_per_token()
    if bits >= 16:
        return float(tokens * per_token * model.dtype_bytes)
    g = min(group_size, model.head_dim)
    quant = (tokens - min(sink, tokens)) // g * g
    return (quant * per_token * kv_bytes_per_element(bits, g, model.dtype_bytes)
            + (tokens - quant) * per_token * model.dtype_bytes)


def _mode(row: dict) -> tuple[str, int | None]:
    mode = row["mode"]
    if mode == "colocated":
        return "colocated", None
    bits = 16 if mode.endswith("16") else 4 if mode.endswith("-4") else None
    if not mode.startswith("disagg") or bits is None:
        raise ValueError(f"unknown bench mode {mode!r}")
    return "disagg", bits


def scaled(gpu: GpuType, k: float, name: str) -> GpuType:
    """``gpu`` with every time it predicts multiplied by ``k`` (rates / k, overheads x k)."""
    return dataclasses.replace(gpu, name=name, fp16_tflops=gpu.fp16_tflops / k,
                               mem_bw_gbs=gpu.mem_bw_gbs / k,
                               layer_overhead_s=gpu.layer_overhead_s * k,
                               seq_overhead_s=gpu.seq_overhead_s * k)


def insitu_factors(row: dict, gpu: GpuType, model: ModelSpec, wl: Workload) -> tuple[float, float]:
    """(prefill, decode) slowdowns of the serving run over the calibration: the row's measured
    prefill p50 / the cost model's median prefill of the same prompts, and its decode step p50 /
    the model's median batch-1 step at mid-output context (batch 1: an approximation, the
    simulated batches average 1.2-1.4)."""
    pipe = _pipe(gpu, model)
    pre = float(np.median([pipe.prefill(int(p))[0] for p in wl.prompts]))
    dec = float(np.median([pipe.decode_iter(1, float(p + o / 2))
                           for p, o in zip(wl.prompts, wl.outputs)]))
    kp = row["prefill_p50_s"] / pre if row.get("prefill_p50_s") else 1.0
    kd = row["decode_step_p50_s"] / dec if row.get("decode_step_p50_s") else 1.0
    return kp, kd


def measured_setup(row: dict, calibration: dict | GpuType, model: ModelSpec | None = None,
                   kv_sizes: str = "message", insitu: bool = False,
                   ) -> tuple[Plan, Cluster, ModelSpec, CostParams, Workload,
                              np.ndarray | None, dict]:
    """Planner inputs for one bench row: 2 ``cpu`` devices (one per worker, nodes ``w0``/``w1``)
    joined by a link at ``link_rate_bps`` (loopback, 100 Gbit/s, when None), the plan of the
    row's mode (colocated: two colocated replicas, half the requests each; disaggregated: one
    prefill and one decode replica), the cost parameters (KV bits of the mode), the workload,
    and each request's KV wire bytes: ``kv_sizes="message"`` the serving loop's message sizes
    (:func:`message_bytes`), ``"ratio"`` the row's ``kv_bytes_moved / prompt_tokens`` per token,
    ``"model"`` None (the cost model's format bytes per token). ``insitu``: a diagnostic, not a
    prediction -- scale the device by the row's own measured step times
    (:func:`insitu_factors`; disaggregated: the prefill device by the prefill factor, the decode
    device by the decode one; colocated: both by their geometric mean), to separate the cost of
    calibrating in isolation from the simulator's own structure."""
    model = model or MODEL_SPECS.get(row["model"])
    if model is None:
        raise ValueError(f"no model spec for {row['model']!r}: pass model=")
    if kv_sizes not in ("message", "ratio", "model"):
        raise ValueError(f"kv_sizes must be 'message', 'ratio' or 'model', got {kv_sizes!r}")
    gpu = gpu_type(calibration)
    layout, bits = _mode(row)
    params = CostParams(kv_bits=bits or 16)
    rate = row.get("link_rate_bps") if layout == "disagg" else None
    gbps = rate / 1e9 if rate else 100.0
    wl = measured_workload(row)
    g0 = g1 = gpu
    kp = kd = 1.0
    if insitu:
        kp, kd = insitu_factors(row, gpu, model, wl)
        if layout == "colocated":
            g0 = g1 = scaled(gpu, (kp * kd) ** 0.5, f"{gpu.name}-insitu")
        else:
            g0, g1 = scaled(gpu, kp, f"{gpu.name}-prefill"), scaled(gpu, kd, f"{gpu.name}-decode")
    nodes = [NodeSpec("w0", g0.name, 1, 1000.0), NodeSpec("w1", g1.name, 1, 1000.0)]
    cluster = Cluster({g0.name: g0, g1.name: g1}, nodes, gbps, name="cpu-bench-e2e")
    L = [model.layers]
    if layout == "colocated":
        plan = Plan([PlanGroup("colocated", [("w0:0",)], L), PlanGroup("colocated", [("w1:0",)], L)],
                    np.zeros((0, 0)), [0.5, 0.5])
    else:
        plan = Plan([PlanGroup("prefill", [("w0:0",)], L), PlanGroup("decode", [("w1:0",)], L)],
                    np.ones((1, 1)), [])
    kv = None
    if layout == "disagg" and kv_sizes == "message":
        group = row.get("kv_group_size") or 64  # rows before the option existed used 64
        sink = row.get("kv_sink_tokens") or 0  # and no sink
        kv = np.array([message_bytes(int(t), bits, model, group, sink) for t in wl.prompts])
    elif layout == "disagg" and kv_sizes == "ratio":
        kv = wl.prompts * (row["kv_bytes_moved"] / row["prompt_tokens"])
    model_bpt = model.kv_elements_per_token() * kv_bytes_per_element(
        params.kv_bits, params.kv_group, model.dtype_bytes)
    info = {"layout": layout, "kv_bits": bits, "link_gbps": gbps if rate else None,
            "kv_sizes": kv_sizes,
            "kv_bytes_sim": float(kv.sum()) if kv is not None else (
                float(wl.prompts.sum() * model_bpt) if layout == "disagg" else 0.0),
            "kv_bytes_moved": row.get("kv_bytes_moved"), "insitu": insitu,
            "insitu_prefill_factor": kp, "insitu_decode_factor": kd}
    return plan, cluster, model, params, wl, kv, info


def bench_pct(values: Iterable[float], q: float) -> float | None:
    """The benchmark's percentile (``bench_e2e._pct``: nearest rank, Python rounding)."""
    from .bench_e2e import _pct

    return _pct([float(v) for v in values if np.isfinite(v)], q)


def served_latencies(res: SimResult, disaggregated: bool) -> tuple[np.ndarray, np.ndarray]:
    """(TTFT, TPOT) per request as the serving loop defines them: the first token of a
    disaggregated request reaches the client when its KV is in the decode batch."""
    first = res.decode_start if disaggregated else res.first_token
    ttft = first - res.arrival
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = (res.finish - first) / np.maximum(res.outputs - 1, 1)
    return ttft, np.where(res.outputs > 1, tpot, np.nan)


def simulate_measured(rows_or_path: str | Path | Iterable[dict] = DEFAULT_ROWS,
                      calibration: dict | GpuType | None = None, *,
                      model: ModelSpec | None = None, kv_sizes: str = "message",
                      stream_kv: bool = True, insitu: bool = False) -> list[dict]:
    """Replay each measured bench row's workload through the simulator on the calibrated CPU.

    ``kv_sizes`` (see :func:`measured_setup`) and ``stream_kv`` (the transfer starts with the
    prefill's first layer, as the workers stream it) default to what the serving loop does;
    ``kv_sizes="model", stream_kv=False`` is the planner's own view. ``insitu=True`` is the
    diagnostic of :func:`measured_setup`.

    Per row: ``mode``, for each of ttft_p50/ttft_p90/tpot_p50/tpot_p90 ``<m>_measured_s``,
    ``<m>_predicted_s`` and ``<m>_rel_error`` (predicted / measured - 1), ``within_target``
    (both p50 errors within 20 %), ``prefill_p50_{measured,predicted}_s`` (cost model per prompt,
    median), ``sim_ttft_p50_prefill_done_s`` (the simulator's own TTFT: end of prefill),
    ``sim_decoding_mean``, the link and KV bytes used, and ``finished``.
    """
    if calibration is None:
        raise ValueError("a calibration (catalog entry or GpuType) is required")
    out = []
    for row in load_rows(rows_or_path):
        plan, cluster, spec, params, wl, kv, info = measured_setup(row, calibration, model,
                                                                   kv_sizes, insitu)
        res = simulate(plan, cluster, spec, params, wl, kv_bytes=kv, stream_kv=stream_kv)
        disagg = info["layout"] == "disagg"
        ttft, tpot = served_latencies(res, disagg)
        pred = {"ttft_p50": bench_pct(ttft, 0.5), "ttft_p90": bench_pct(ttft, 0.9),
                "tpot_p50": bench_pct(tpot, 0.5), "tpot_p90": bench_pct(tpot, 0.9)}
        pipe = plan.groups[0].pipeline(cluster, spec, params)
        rec: dict[str, Any] = {"mode": row["mode"], **info, "stream_kv": stream_kv,
                               "requests": len(wl),
                               "finished": int(np.isfinite(res.finish).sum())}
        for m in METRICS:
            meas = row.get(f"{m}_s")
            rec[f"{m}_measured_s"] = meas
            rec[f"{m}_predicted_s"] = pred[m]
            rec[f"{m}_rel_error"] = (pred[m] / meas - 1) if meas and pred[m] is not None else None
        rec["within_target"] = all(rec[f"{m}_rel_error"] is not None
                                   and abs(rec[f"{m}_rel_error"]) <= TARGET_REL_ERROR
                                   for m in ("ttft_p50", "tpot_p50"))
        rec["prefill_p50_measured_s"] = row.get("prefill_p50_s")
        rec["prefill_p50_predicted_s"] = float(np.median([pipe.prefill(int(p))[0]
                                                          for p in wl.prompts]))
        rec["decode_step_p50_measured_s"] = row.get("decode_step_p50_s")
        rec["sim_ttft_p50_prefill_done_s"] = bench_pct(res.ttft, 0.5)
        rec["sim_decoding_mean"] = _mean_batch(res)
        out.append(rec)
    return out


def _mean_batch(res: SimResult) -> float:
    """Time-averaged number of requests decoding (all workers together) while any is."""
    start, end = res.decode_start, res.finish
    ok = np.isfinite(start) & np.isfinite(end) & (end > start)
    if not ok.any():
        return 0.0
    ev = sorted([(t, 1) for t in start[ok]] + [(t, -1) for t in end[ok]])
    busy = area = 0.0
    k, last = 0, ev[0][0]
    for t, d in ev:
        if k:
            busy += t - last
            area += k * (t - last)
        k, last = k + d, t
    return area / busy if busy else 0.0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_fit(table: list[dict]) -> str:
    lines = [f"{'point':<22}{'measured s':>11}{'model s':>10}{'error':>9}"]
    for r in table:
        label = (f"prefill {r['size']} tok" if r["kind"] == "prefill"
                 else f"decode b={r['size']} ctx={int(r['ctx_tokens'])}")
        lines.append(f"{label:<22}{r['measured_s']:>11.4f}{r['predicted_s']:>10.4f}"
                     f"{r['rel_error']:>+9.1%}")
    return "\n".join(lines)


def format_results(results: list[dict]) -> str:
    head = f"{'mode':<11}" + "".join(f"{m + ' meas/pred (err)':>30}" for m in METRICS)
    lines = [head]
    for r in results:
        cells = []
        for m in METRICS:
            e = r[f"{m}_rel_error"]
            cells.append(f"{_f(r[f'{m}_measured_s'])} / {_f(r[f'{m}_predicted_s'])} "
                         f"({_f(e, '{:+.0%}')})")
        lines.append(f"{r['mode']:<11}" + "".join(f"{c:>30}" for c in cells))
    lines.append("prefill p50 meas/model: " + ", ".join(
        f"{r['mode']} {_f(r['prefill_p50_measured_s'])}/{_f(r['prefill_p50_predicted_s'])}"
        for r in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thunderkv.serve.calibrate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=str(DEFAULT_ROWS), help="bench e2e JSONL to compare with")
    ap.add_argument("--json", help="write costs, calibrations and comparisons here")
    ap.add_argument("--costs", help="reuse the 'costs' of an earlier --json instead of measuring")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    if not Path(a.rows).is_file():
        ap.error(f"--rows {a.rows}: no such file (the default is a measurement kept in a source "
                 "checkout's benchmarks/results; pass the --json of a `thunderkv bench e2e` run)")
    if a.costs:
        costs = json.loads(Path(a.costs).read_text())["costs"]
    else:
        from .runner import ModelRunner

        t0 = time.perf_counter()
        runner = ModelRunner.load(a.model)
        print(f"loaded {a.model} in {time.perf_counter() - t0:.1f} s; measuring (1 thread)")
        costs = measure_cpu_costs(runner, reps=a.reps)
    spec = ModelSpec(**costs["spec"])
    doc: dict[str, Any] = {"costs": costs, "rows": a.rows, "calibrations": {}, "results": {}}
    cals = {}
    for label, overheads in (("roofline+overheads", True), ("roofline only", False)):
        cal = cals[label] = fit_cpu_gpu_type(costs, spec, overheads=overheads)
        table = fit_table(costs, cal, spec)
        doc["calibrations"][label] = {"entry": cal, "fit": table}
        print(f"\n== fit, {label}: {GPU_NAME} = "
              + ", ".join(f"{k} {v:.4g}" for k, v in cal.items() if k != "price_per_hour"))
        print(format_fit(table))
    runs = (
        ("prediction: roofline+overheads, serving-loop KV sizes, streamed transfers",
         "roofline+overheads", {}),
        ("ablation: roofline only (existing knobs)", "roofline only", {}),
        ("ablation: planner's view (format-v1 bytes per token, transfer after prefill)",
         "roofline+overheads", {"kv_sizes": "model", "stream_kv": False}),
        ("ablation: measured kv_bytes_moved/prompt_tokens per token, transfer after prefill",
         "roofline+overheads", {"kv_sizes": "ratio", "stream_kv": False}),
        ("diagnostic, not a prediction: device scaled by the run's own step times (in situ)",
         "roofline+overheads", {"insitu": True}),
    )
    for title, label, kw in runs:
        results = simulate_measured(a.rows, cals[label], model=spec, **kw)
        doc["results"][title] = results
        print(f"\n== {title}")
        print(format_results(results))
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
