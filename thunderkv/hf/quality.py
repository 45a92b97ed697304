"""Quality of a KV cache with the cache in the loop: perplexity, top-1 agreement, KL, bytes, speed.

The text is fed token by token after a prefix, so every prediction after the prefix attends
over the cache as stored (quantized history + residual), not over full-precision activations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import ThunderKVCache, layer_tensors

CACHES = ("fp", "thunderkv8", "thunderkv4", "thunderkv2", "hf-quanto4", "hf-hqq4", "hf-fp8")
DEFAULT_CACHES = ("fp", "thunderkv4", "thunderkv2", "hf-quanto4", "hf-hqq4")


class CacheUnavailable(RuntimeError):
    """A cache option cannot be built here (an optional package is missing)."""


@dataclass(slots=True)
class CacheRun:
    """One cache's pass over the text.

    logprobs : float32 ``[N - prefix, vocab]``: log-softmax of the prediction of each token
        ``prefix .. N-1`` (kept only for the reference run).
    nll : float64 ``[N - prefix]`` negative log-likelihood of each target token.
    top1 : int64 ``[N - prefix]`` argmax of each prediction.
    """

    nll: torch.Tensor
    top1: torch.Tensor
    kl: torch.Tensor | None
    logprobs: torch.Tensor | None
    cache_bytes: int
    decode_seconds: float
    decode_steps: int


def make_cache(name: str, config, *, group_size: int = 64, residual_length: int = 128,
               sink_length: int = 1):
    """Build the cache called ``name`` (one of :data:`CACHES`) for a model with ``config``.

    ``sink_length`` applies to the ThunderKV caches only (HF's have no attention sinks).

    Raises
    ------
    CacheUnavailable : the HF backend's package (optimum-quanto, hqq) is not installed.
    ValueError : unknown name.
    """
    from transformers import DynamicCache, QuantizedCache
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    if name == "fp":
        return DynamicCache(config=config)
    if name.startswith("thunderkv") and name[9:] in ("2", "4", "8"):
        return ThunderKVCache(config, bits=int(name[9:]), group_size=group_size,
                              residual_length=residual_length, sink_length=sink_length)
    hf = {"hf-quanto4": ("quanto", is_optimum_quanto_available, "optimum-quanto"),
          "hf-hqq4": ("hqq", is_hqq_available, "hqq")}
    if name in hf:
        backend, available, package = hf[name]
        if not available():
            raise CacheUnavailable(f"{name} needs `pip install {package}`")
        return QuantizedCache(backend, config, nbits=4, q_group_size=group_size,
                              residual_length=residual_length)
    if name == "hf-fp8":
        return QuantizedCache("fp8", config)
    raise ValueError(f"unknown cache {name!r}; choose from {', '.join(CACHES)}")


def cache_nbytes(cache) -> int:
    """Bytes of the tensors a cache stores: every tensor among its layers' attributes (keys,
    values, quantized states, and the convolution / recurrent states of a hybrid model's
    linear-attention layers; :func:`~thunderkv.hf.cache.layer_tensors`), so caches of one
    model compare like for like."""
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in layer_tensors(layer))


def _clock(t: torch.Tensor) -> float:
    """``time.perf_counter()`` once the work queued on ``t``'s GPU (if any) has finished."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


@torch.no_grad()
def run_cache(
    model,
    ids: torch.Tensor,
    cache,
    *,
    prefix: int = 64,
    reference: torch.Tensor | None = None,
    keep_logprobs: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CacheRun:
    """Feed ``ids`` (int64 ``[1, N]``) to ``model``: the prefix at once, then one token a step.

    ``reference`` (float32 ``[N - prefix, vocab]`` log-probs of the full-precision run) adds the
    per-token KL(reference || this cache).
    """
    n = ids.shape[1]
    if not 0 < prefix < n:
        raise ValueError(f"prefix {prefix} must be in 1..{n - 1} for {n} tokens")
    nll, top1, kl, keep = [], [], [], []

    def score(logits: torch.Tensor, i: int) -> None:
        lp = torch.log_softmax(logits.float(), dim=-1)
        nll.append(-lp[ids[0, i]].double())
        top1.append(lp.argmax())
        if reference is not None:
            ref = reference[i - prefix]
            kl.append((ref.exp() * (ref - lp)).sum().double())
        if keep_logprobs:
            keep.append(lp)

    out = model(ids[:, :prefix], cache=cache, use_cache=True)
    score(out.logits[0, -1], prefix)
    t0 = _clock(ids)
    for i in range(prefix, n - 1):
        out = model(ids[:, i : i + 1], cache=cache, use_cache=True)
        score(out.logits[0, -1], i + 1)
        if progress is not None:
            progress(i + 1 - prefix, n - 1 - prefix)
    seconds = _clock(ids) - t0
    return CacheRun(
        torch.stack(nll), torch.stack(top1), torch.stack(kl) if kl else None,
        torch.stack(keep) if keep_logprobs else None, cache_nbytes(cache), seconds, n - 1 - prefix,
    )


def summarize(name: str, run: CacheRun, ref: CacheRun | None) -> dict:
    """One result row (plain JSON types)."""
    ppl = math.exp(run.nll.mean().item())
    row = {
        "cache": name,
        "status": "ok",
        "perplexity": ppl,
        "tokens_scored": int(run.nll.numel()),
        "cache_bytes": run.cache_bytes,
        "decode_tok_s": run.decode_steps / run.decode_seconds if run.decode_seconds else None,
    }
    if ref is not None:
        ref_ppl = math.exp(ref.nll.mean().item())
        row["ppl_delta_pct"] = 100.0 * (ppl / ref_ppl - 1.0)
        row["top1_agreement"] = (run.top1 == ref.top1).double().mean().item()
        row["mean_kl"] = run.kl.mean().item() if run.kl is not None else 0.0
    return row


def evaluate(
    model,
    ids: torch.Tensor,
    names: list[str],
    *,
    prefix: int = 64,
    group_size: int = 64,
    residual_length: int = 128,
    sink_length: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run every cache in ``names`` over ``ids`` (``[1, N]``); the fp cache runs first as reference.

    Returns one row per name (see :func:`summarize`); an unavailable option gives a row with
    ``status`` "unavailable: ..." instead of raising. ``on_row`` sees each row as it is done.
    """
    def step(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda i, n: progress(name, i, n))

    config = model.config
    ref = run_cache(model, ids, make_cache("fp", config), prefix=prefix, keep_logprobs=True,
                    progress=step("fp"))
    rows = []
    for name in names:
        if name == "fp":
            row = summarize("fp", ref, ref)
        else:
            try:
                cache = make_cache(name, config, group_size=group_size,
                                   residual_length=residual_length, sink_length=sink_length)
            except CacheUnavailable as exc:
                row = {"cache": name, "status": f"unavailable: {exc}"}
            else:
                run = run_cache(model, ids, cache, prefix=prefix, reference=ref.logprobs,
                                progress=step(name))
                row = summarize(name, run, ref)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
