"""A tiny, randomly initialised Llama (no download) and teacher-forced helpers for tests/hf."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

# Fixed, not per-run: the logit bounds below were calibrated on this model (see test_hf_cache).
MODEL_SEED = 2
VOCAB = 32


def make_tiny(seed: int = MODEL_SEED, **overrides):
    """GQA Llama: 2 layers, 4 query heads, 2 KV heads, head_dim 32, vocab 32, float32."""
    cfg = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=256, vocab_size=VOCAB,
               max_position_embeddings=1024, pad_token_id=0)
    cfg.update(overrides)
    config = transformers.LlamaConfig(**cfg)
    torch.manual_seed(seed)
    return config, transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny():
    return make_tiny()


def prompt(batch: int, tokens: int, seed: int = MODEL_SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, tokens), generator=g)


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, cache, prefix: int) -> torch.Tensor:
    """Logits ``[B, N - prefix, V]`` predicting tokens prefix..N-1, one token a step."""
    out = [model(ids[:, :prefix], cache=cache, use_cache=True).logits[:, -1]]
    for t in range(prefix, ids.shape[1] - 1):
        out.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` (for this test) so that each call is recorded; returns the list."""
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.fixture
def count_fused(monkeypatch):
    """Calls of the fused kernel by the "thunderkv" attention."""
    import thunderkv.hf.attention as fused_mod

    return count_calls(monkeypatch, fused_mod, "kivi_decode_attention")
