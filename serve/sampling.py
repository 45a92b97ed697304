"""Per-request token sampling for a decode batch: greedy, temperature and nucleus (top-p)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["sample"]


def _probabilities(row: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(row / temperature)`` that stays finite for any ``temperature > 0``.

    Dividing the raw logits by a tiny temperature (1e-40, which the API allows: it is in
    [0, 2]) overflows to ``inf`` and the softmax to NaN, which ``torch.multinomial`` refuses.
    Shifted by their maximum the scaled logits are <= 0 (the largest exactly 0), so they can
    only underflow to ``-inf`` (probability 0), and float64 keeps the division exact where a
    float32 temperature would round to 0."""
    shifted = row.double() - row.max().double()
    return torch.softmax(shifted / temperature, dim=-1)


def sample(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """Pick the next token of every row of a decode batch.

    Parameters
    ----------
    logits:
        ``[B, vocab]`` (float32; other float dtypes are upcast).
    temperature:
        ``B`` values; ``<= 0`` means greedy (argmax, first index on ties), otherwise the logits
        are divided by it before the softmax (any positive value, however small: see
        :func:`_probabilities`).
    top_p:
        ``B`` values in ``[0, 1]``: nucleus sampling keeps the smallest set of most probable
        tokens whose probability mass reaches ``top_p`` (the most probable token is always
        kept, so ``top_p`` 0, as OpenAI allows, or a tiny one is argmax); ``>= 1`` keeps the
        whole vocabulary.
    generators:
        ``B`` per-request ``torch.Generator`` (on the logits' device) for reproducible seeds, or
        None to use torch's global generator.

    Returns
    -------
    ``B`` token ids (Python ints).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, vocab], got {tuple(logits.shape)}")
    B = logits.shape[0]
    if not len(temperature) == len(top_p) == len(generators) == B:
        raise ValueError(f"need {B} temperatures, top_p values and generators, got "
                         f"{len(temperature)}, {len(top_p)} and {len(generators)}")
    logits = logits.detach().float()
    out = logits.argmax(dim=-1).tolist() if B else []
    for i in range(B):
        temp, p = float(temperature[i]), float(top_p[i])
        if temp <= 0.0:
            continue
        if not p >= 0.0:
            raise ValueError(f"top_p must be in [0, 1], got {p}")
        probs = _probabilities(logits[i], temp)
        if p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep a token while the mass *before* it is below top_p (the first always stays).
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            keep = int((before < p).sum())
            kept = sorted_probs[:max(keep, 1)]
            pick = torch.multinomial(kept, 1, generator=generators[i])
            out[i] = int(order[pick])
        else:
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out
