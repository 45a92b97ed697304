"""Decode speed of a model with each KV cache in the loop, at given context lengths.

The run prefills ``context`` tokens, then times ``steps`` greedy single-token forward passes
(batch 1) with the cache in the loop; the full-precision ``DynamicCache`` (``fp``) is measured
in the same run as the baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .quality import CacheUnavailable, _clock, cache_nbytes, make_cache


def decode_speed(
    model,
    ids: torch.Tensor,
    names: list[str],
    contexts: list[int],
    *,
    steps: int = 32,
    group_size: int = 64,
    residual_length: int = 128,
    sink_length: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per (context, cache): prefill seconds, decode tokens/s, cache bytes, and the
    ratio to ``fp`` at the same context (when ``fp`` is among ``names``).

    ids : int64 ``[1, >= max(contexts)]`` token ids, on the model's device.
    """
    rows: list[dict] = []
    for ctx in contexts:
        if ids.shape[1] < ctx:
            raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than context {ctx}")
        x = ids[:, :ctx]
        for name in names:
            if progress:
                progress(f"context {ctx}: {name}")
            try:
                cache = make_cache(name, model.config, group_size=group_size,
                                   residual_length=residual_length, sink_length=sink_length)
            except (CacheUnavailable, ImportError) as exc:  # a missing package: a row, not a crash
                rows.append({"context": ctx, "cache": name, "status": f"unavailable: {exc}"})
                continue
            with torch.no_grad():
                t0 = _clock(x)
                out = model(x, cache=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                prefill = _clock(x) - t0
                t0 = _clock(x)
                for _ in range(steps):
                    nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                decode = _clock(x) - t0
            rows.append({"context": ctx, "cache": name, "status": "ok", "prefill_s": prefill,
                         "decode_tok_s": steps / decode, "cache_bytes": cache_nbytes(cache),
                         "steps": steps})
            del cache, out
        fp = next((r for r in rows if r["context"] == ctx and r["cache"] == "fp"
                   and r["status"] == "ok"), None)
        for r in rows:
            if fp and r["context"] == ctx and r["status"] == "ok":
                r["speed_vs_fp"] = r["decode_tok_s"] / fp["decode_tok_s"]
    return rows
