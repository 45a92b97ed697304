"""``thunderkv bench e2e``: one workload replayed through colocated and disaggregated serving.

Modes: ``colocated`` (workers that prefill and decode), ``disagg-16`` (prefill and decode
workers, fp16 KV shipped raw) and ``disagg-4`` (the same with format v1 4-bit KV). Requests
get prompt/output lengths from the Azure conversation trace (scaled to this machine) or fixed
synthetic lengths, Poisson arrivals at ``rate`` requests/s, prompts cut from a fixed text. Per
mode: TTFT/TPOT percentiles, tokens/s, KV bytes moved; and how the mode's next-token
predictions agree with colocated 16-bit: identical greedy output for ``disagg-16`` (required),
teacher-forced top-1 agreement for ``disagg-4`` (computed here through the same KV write/read
path the workers use).
"""

from __future__ import annotations

import csv
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from thunderkv._bundled import CONVERSATION_TRACE, trace_path

from .api_types import CompletionRequest
from .engine import Engine, ServeConfig

TRACE = trace_path()  # None only if the package was installed without its data


@dataclass(frozen=True)
class Preset:
    requests: int
    rate: float  # requests per second (Poisson)
    max_prompt: int
    max_output: int
    prompt_scale: float  # trace context tokens x this (the 2-core machine can't do 1k-token chats)


PRESETS = {
    "quick": Preset(requests=10, rate=1.0, max_prompt=256, max_output=16, prompt_scale=0.25),
    "default": Preset(requests=40, rate=1.0, max_prompt=512, max_output=32, prompt_scale=0.5),
}
MODES = {
    "colocated": dict(colocated=2),
    "disagg-16": dict(prefill=1, decode=1, kv_bits=16),
    "disagg-4": dict(prefill=1, decode=1, kv_bits=4),
}


@dataclass
class Job:
    arrival: float
    prompt: list[int]
    max_tokens: int


@dataclass
class Outcome:
    job: Job
    submitted: float = 0.0
    first: float | None = None
    done: float | None = None
    tokens: list[int] = field(default_factory=list)
    error: str | None = None


def workload(preset: Preset, tokenizer, *, seed: int = 0, trace: Path | None = TRACE,
             rate: float | None = None) -> list[Job]:
    """Jobs with trace (or synthetic) lengths, Poisson arrivals and prompts cut from a text."""
    from thunderkv.hf.models import default_text

    rng = random.Random(seed)
    text_ids = tokenizer.encode(default_text() * 4)
    lengths = []
    if trace is not None and trace.exists():
        with trace.open() as f:
            rows = list(csv.DictReader(f))
        for row in rng.sample(rows, preset.requests):
            lengths.append((int(int(row["ContextTokens"]) * preset.prompt_scale),
                            int(row["GeneratedTokens"])))
    else:
        lengths = [(preset.max_prompt // 2, preset.max_output)] * preset.requests
    jobs, t = [], 0.0
    for ctx, out in lengths:
        n = max(16, min(preset.max_prompt, ctx))
        start = rng.randrange(0, max(1, len(text_ids) - n))
        jobs.append(Job(t, text_ids[start:start + n], max(4, min(preset.max_output, out))))
        t += rng.expovariate(rate or preset.rate)
    return jobs


def replay(engine: Engine, jobs: list[Job], progress: Callable[[str], object]) -> list[Outcome]:
    """Submit each job at its arrival time (greedy); wait for all; return their timings."""
    outcomes = [Outcome(j) for j in jobs]
    t0 = time.monotonic()

    def run(o: Outcome) -> None:
        delay = o.job.arrival - (time.monotonic() - t0)
        if delay > 0:
            time.sleep(delay)
        o.submitted = time.monotonic()
        try:
            handle = engine.submit(CompletionRequest(prompt=o.job.prompt,
                                                     max_tokens=o.job.max_tokens, temperature=0))
            for ev in handle.events(timeout=300):
                if ev.token_id is not None:
                    if o.first is None:
                        o.first = time.monotonic()
                    o.tokens.append(ev.token_id)
            o.done = time.monotonic()
        except Exception as exc:  # reported in the results, never hidden
            o.error = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(o,), daemon=True) for o in outcomes]
    for t in threads:
        t.start()
    for i, t in enumerate(threads):
        t.join()
        progress(f"{i + 1}/{len(threads)} requests done")
    return outcomes


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(mode: str, outcomes: list[Outcome], engine: Engine) -> dict:
    ok = [o for o in outcomes if o.error is None and o.first is not None]
    ttft = [o.first - o.submitted for o in ok]
    tpot = [(o.done - o.first) / (len(o.tokens) - 1) for o in ok if len(o.tokens) > 1]
    makespan = max(o.done for o in ok) - min(o.submitted for o in ok) if ok else 0.0
    generated = sum(len(o.tokens) for o in ok)
    return {
        "bench": "e2e", "mode": mode, "requests": len(outcomes), "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if o.error})[:3],
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9),
        "tpot_p50_s": _pct(tpot, 0.5), "tpot_p90_s": _pct(tpot, 0.9),
        "e2e_p50_s": _pct([o.done - o.submitted for o in ok], 0.5),
        "tokens_per_s": generated / makespan if makespan else None,
        "generated_tokens": generated,
        "prompt_tokens": sum(len(o.job.prompt) for o in outcomes),
        "kv_bytes_moved": engine.metrics.kv_bytes.value,
        "kv_transfer_seconds": engine.metrics.kv_transfer_seconds.value,
        "transports": sorted(engine.metrics.transports),
        "prefill_p50_s": statistics.median(engine.metrics.prefill_seconds.samples)
        if engine.metrics.prefill_seconds.samples else None,
        "decode_step_p50_s": statistics.median(engine.metrics.decode_step_seconds.samples)
        if engine.metrics.decode_step_seconds.samples else None,
        "decode_batch_mean": statistics.fmean(engine.metrics.decode_batches.samples)
        if engine.metrics.decode_batches.samples else None,
    }


def teacher_forced_agreement(runner, jobs: list[Job], reference: list[list[int]],
                             kv_bits: int, group_size: int = 64, sink: int | None = None
                             ) -> float:
    """Top-1 agreement with the reference continuations when the prompt's KV went through
    the ``kv_bits`` wire path (write_layer -> read_layers), decoding teacher-forced."""
    import torch

    from .kvwire import DEFAULT_SINK, geometry_of, message_header, read_layers, write_layer
    from .runner import SequenceKV

    sink = DEFAULT_SINK if sink is None else sink
    hits = total = 0
    for job, ref in zip(jobs, reference):
        if len(ref) < 2:
            continue
        _, full = runner.prefill(job.prompt)
        layers = full.layers()
        header = message_header(geometry_of(runner), len(job.prompt), kv_bits, 0, group_size,
                                sink)
        payload = torch.empty(header.payload_length, dtype=torch.uint8)
        for i, (k, v) in enumerate(layers):
            write_layer(header, payload, i, k, v)
        seq = SequenceKV.from_layers(read_layers(header, payload))
        for j in range(1, len(ref)):
            logits = runner.decode([seq], [ref[j - 1]])
            hits += int(logits[0].argmax()) == ref[j]
            total += 1
    return hits / total if total else float("nan")


def link_from_env():
    """The shaped link this process runs across (set by ``bench e2e --link-rate``), or None."""
    from .netplace import LinkInfo

    return LinkInfo.from_env()


def run(model: str, preset: Preset, modes: list[str], *, seed: int, threads: int,
        rate: float | None, progress: Callable[[str], object],
        kv_group_size: int = 32, kv_sink_tokens: int = 0
        ) -> tuple[list[dict], list[Job]]:
    from .netplace import Placement
    from .tokenizer import load_tokenizer

    link = link_from_env()
    if TRACE is None:
        progress(f"note: {CONVERSATION_TRACE} is not installed with this package; request "
                 "lengths are synthetic (fixed), not the documented trace's")
    jobs = workload(preset, load_tokenizer(model), seed=seed, rate=rate)
    rows, outputs = [], {}
    # The agreement check needs the model in this process: load it while the first mode's
    # workers load theirs (never during a measured replay), instead of after every mode.
    runner_box: dict = {}
    loader = None
    if "colocated" in modes and len(modes) > 1:
        def _load() -> None:
            from .runner import ModelRunner

            runner_box["runner"] = ModelRunner.load(model)

        loader = threading.Thread(target=_load, name="agreement-model", daemon=True)
        loader.start()
    for mode in modes:
        progress(f"{mode}: starting workers")
        across = link is not None and mode != "colocated"
        placement = Placement(link) if across else None
        with Engine(ServeConfig(model=model, threads=threads, placement=placement,
                                kv_group_size=kv_group_size,
                                kv_sink_tokens=kv_sink_tokens,
                                **MODES[mode])) as engine:
            if loader is not None and loader.is_alive():
                progress(f"{mode}: loading the agreement model")
                loader.join()
            warm = Job(0.0, jobs[0].prompt[:32], 4)
            replay(engine, [warm], lambda m: None)
            engine.metrics.__init__()  # measure the replay only
            outcomes = replay(engine, jobs, lambda m, mode=mode: progress(f"{mode}: {m}"))
            rows.append(summarize(mode, outcomes, engine))
            outputs[mode] = [o.tokens for o in outcomes]
    if "colocated" in outputs:
        ref = outputs["colocated"]
        for row in rows:
            mine = outputs[row["mode"]]
            row["identical_outputs"] = sum(a == b for a, b in zip(mine, ref)) / len(ref)
    if "colocated" in outputs and loader is not None:
        ref = outputs["colocated"]
        progress("teacher-forced agreement")
        loader.join()
        if "runner" not in runner_box:
            raise RuntimeError("loading the model for the agreement check failed (see above)")
        runner = runner_box["runner"]
        for row in rows:
            if row["mode"] == "disagg-4":
                row["teacher_forced_top1"] = teacher_forced_agreement(runner, jobs, ref, 4,
                                                                      kv_group_size, kv_sink_tokens)
            elif row["mode"] == "disagg-16":
                row["teacher_forced_top1"] = teacher_forced_agreement(runner, jobs, ref, 16)
    label = (f"decode across a veth shaped to {link.rate_bps / 1e6:g} Mbit/s" if link
             else "loopback")
    for row in rows:
        row.update(model=model, preset_requests=preset.requests,
                   rate_req_s=rate or preset.rate, seed=seed, threads_per_worker=threads,
                   kv_group_size=kv_group_size if row["mode"] == "disagg-4" else None,
                   kv_sink_tokens=(kv_sink_tokens if row["mode"] == "disagg-4" else None),
                   link=label if row["mode"] != "colocated" else "one process set, no link",
                   link_rate_bps=link.rate_bps if link else None)
    return rows, jobs


def plot(rows: list[dict], path: str | Path) -> None:
    """TTFT and TPOT (p50 bars, p90 whiskers) per mode, as a PNG."""
    from thunderkv.plotting import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    modes = [r["mode"] for r in rows]
    for ax, metric, label in ((axes[0], "ttft", "TTFT (s)"), (axes[1], "tpot", "TPOT (s)")):
        p50 = [r[f"{metric}_p50_s"] or 0 for r in rows]
        p90 = [r[f"{metric}_p90_s"] or 0 for r in rows]
        ax.bar(modes, p50, color=["#888", "#4a7", "#27c"][:len(rows)], label="p50")
        ax.errorbar(modes, p50, yerr=[[0] * len(rows), [b - a for a, b in zip(p50, p90)]],
                    fmt="none", ecolor="k", capsize=4, label="p90")
        ax.set_title(label)
        ax.legend(fontsize=8)
    axes[2].bar(modes, [r["kv_bytes_moved"] / 1e6 for r in rows], color="#c72")
    axes[2].set_title("KV moved (MB)")
    fig.suptitle(f"{rows[0]['model']}: {rows[0]['requests']} requests at "
                 f"{rows[0]['rate_req_s']:g} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
