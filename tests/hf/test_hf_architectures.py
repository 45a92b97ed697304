"""ThunderKVCache (and the fused attention) on tiny random models of many transformers
architectures, not only Llama: rotary and learned positions, GQA/MQA, q/k norms, fused QKV,
MoE, multi-head latent attention. No download: every model is built from a small config.

Each decode is teacher-forced and compared with one full-sequence forward without a cache, in
units of that forward's logit standard deviation. At 8 bits the median |difference| stays below
``TOL`` (measured 1.8e-4 to 1.3e-3 over twelve seeds; the median, because one routing flip in
an MoE, or a sink-weighted softmax in gpt-oss, moves a few positions' logits far: their mean
reached 5.6e-3); dropping the first 100 of the 150 prompt tokens moves it by 0.096-0.62, so a
cache that lost or misplaced its history fails.
"""

from __future__ import annotations

import pytest
import torch

from thunderkv.attention import fused_attention_available
from thunderkv.hf import ThunderKVCache, export_kv, import_kv, use_fused_attention
from thunderkv.hf.cache import layer_tensors
from thunderkv.hf.quality import cache_nbytes

transformers = pytest.importorskip("transformers", minversion="5.0")

VOCAB = 64
PROMPT, TOKENS = 150, 200
TOL = 0.005  # median |logit difference| / logit std at 8 bits, group 16

_COMMON = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=VOCAB)
_GQA = dict(_COMMON, num_key_value_heads=2, intermediate_size=256)

# name -> (config class, model class, config kwargs, fused kernel expected on decode steps)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_GQA, attention_bias=True), True),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_GQA, sliding_window=None), True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA, True),
    "qwen3 (q/k norm)": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=32), True),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_GQA, head_dim=32, moe_intermediate_size=64, num_experts=4,
                       num_experts_per_tok=2), True),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_GQA, num_local_experts=4, sliding_window=None), True),
    "phi3 (fused qkv)": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=0), True),
    "phi (partial rotary)": ("PhiConfig", "PhiForCausalLM", _GQA, True),
    "gemma (MQA)": ("GemmaConfig", "GemmaForCausalLM",
                    dict(_COMMON, num_key_value_heads=1, intermediate_size=256, head_dim=32,
                         initializer_range=0.1), True),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _GQA, True),
    "cohere": ("CohereConfig", "CohereForCausalLM", _GQA, True),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_GQA, sliding_window=None),
                   True),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_COMMON, intermediate_size=256), True),
    "gpt2 (learned positions)": ("GPT2Config", "GPT2LMHeadModel",
                                 dict(n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB), True),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(_COMMON, ffn_dim=256, word_embed_proj_dim=128, pad_token_id=1), True),
    # Multi-head latent attention: keys (48 wide) and values (32 wide) differ in head_dim, and
    # the probe finds the attention does not receive the cache's keys: no fused hand-off.
    "deepseek-v3 (MLA)": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                          dict(_COMMON, num_key_value_heads=4, intermediate_size=256,
                               moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
                               n_group=1, topk_group=1, q_lora_rank=64, kv_lora_rank=64,
                               qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                               first_k_dense_replace=1), False),
}


def build(name: str):
    cfg_name, model_name, kwargs, _ = ARCHITECTURES[name]
    if not hasattr(transformers, cfg_name) or not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(0)
    return config, getattr(transformers, model_name)(config).eval()


def ids_for(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (2, TOKENS), generator=g)


@torch.no_grad()
def cached_logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits ``[B, TOKENS - PROMPT, V]`` predicting tokens PROMPT..TOKENS-1: the prompt in one
    forward, then one token a step."""
    out = [model(ids[:, :PROMPT], cache=cache, use_cache=True).logits[:, -1]]
    for t in range(PROMPT, TOKENS - 1):
        out.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


def error(got: torch.Tensor, full: torch.Tensor) -> float:
    """Median |got - full| in units of ``full``'s standard deviation."""
    return ((got - full).abs().median() / full.std()).item()


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The same positions' logits from one forward over all of ``ids``, no cache."""
    with torch.no_grad():
        return model(ids).logits[:, PROMPT - 1:TOKENS - 1]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_decode_matches_a_full_forward_at_8_bits(name, np_rng):
    config, model = build(name)
    ids = ids_for(int(np_rng.integers(2**31)))
    full = full_logits(model, ids)
    with torch.no_grad():  # the check's own sensitivity: without the first 100 tokens
        short = model(ids[:, 100:]).logits[:, PROMPT - 101:TOKENS - 101]
    assert error(short, full) > 10 * TOL
    cache = ThunderKVCache(config, bits=8, group_size=16, residual_length=32)
    fine = error(cached_logits(model, ids, cache), full)
    assert cache.get_seq_length() == TOKENS - 1
    assert fine < TOL
    # 2 bits is far coarser: the quantized history is really what attention reads
    coarse = error(cached_logits(model, ids, ThunderKVCache(config, bits=2, group_size=16,
                                                            residual_length=32)), full)
    assert coarse > 10 * fine


@pytest.mark.skipif(not fused_attention_available()[0], reason=fused_attention_available()[1])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fused_attention_decodes_the_same(name, np_rng, count_fused):
    config, model = build(name)
    ids = ids_for(int(np_rng.integers(2**31)))
    full = full_logits(model, ids)
    use_fused_attention(model)
    got = cached_logits(model, ids, ThunderKVCache(config, bits=8, group_size=16,
                                                   residual_length=32))
    assert error(got, full) < TOL
    layers = config.num_hidden_layers
    steps = TOKENS - 1 - PROMPT
    if ARCHITECTURES[name][3]:  # every decode step, the first (the probe) included
        assert len(count_fused) == layers * steps
    else:
        assert not count_fused


@pytest.mark.parametrize("name", ["qwen2", "gpt2 (learned positions)", "deepseek-v3 (MLA)"])
def test_generate_with_a_4_bit_cache(name):
    config, model = build(name)
    ids = ids_for(7)[:, :40]
    cache = ThunderKVCache(config, bits=4, group_size=16, residual_length=8)
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=24, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (2, 64)
    assert torch.equal(out[:, :40], ids)
    assert cache.get_seq_length() == 63
    assert cache.layers[0].quantized_length > 0


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_export_import_continues_bit_identically(name, np_rng):
    """A prefix's cache shipped through the wire format decodes the next tokens exactly as
    the sender's own cache would."""
    config, model = build(name)
    ids = ids_for(int(np_rng.integers(2**31)))
    cache = ThunderKVCache(config, bits=4, group_size=16, residual_length=8)
    with torch.no_grad():
        model(ids[:, :PROMPT], cache=cache)
    if name.startswith("deepseek"):  # latent KV: keys and values differ in width
        with pytest.raises(ValueError, match="one heads x head_dim for both"):
            export_kv(cache)
        return
    received = import_kv(export_kv(cache, request_id=9), config, residual_length=8)
    with torch.no_grad():
        for t in range(PROMPT, PROMPT + 12):  # crosses a group boundary: 8 + 12 > 16
            want = model(ids[:, t:t + 1], cache=cache).logits
            got = model(ids[:, t:t + 1], cache=received).logits
            assert torch.equal(got, want)


def test_models_with_their_own_attention_refuse_the_fused_switch():
    if not fused_attention_available()[0]:
        pytest.skip(fused_attention_available()[1])
    config = transformers.FalconConfig(**_COMMON, new_decoder_architecture=True, num_kv_heads=2)
    model = transformers.FalconForCausalLM(config).eval()
    with pytest.raises(RuntimeError, match="FalconForCausalLM did not switch"):
        use_fused_attention(model)
    # ... and ThunderKVCache still works with its own attention
    ids = ids_for(3)
    got = cached_logits(model, ids, ThunderKVCache(config, bits=8, group_size=16,
                                                   residual_length=32))
    assert error(got, full_logits(model, ids)) < TOL


_HYBRID = dict(_GQA, num_hidden_layers=4)
WINDOW = 64  # < PROMPT: the sliding layers really drop tokens

# Hybrid models: full-attention layers quantized, the others kept in transformers' own layers.
# name -> (config class, model class, config kwargs, exact layer type, fused attention):
# "kernel" (the fused kernel runs on every full layer's decode steps) or "refused" (no SDPA
# form of the attention: softcapped logits, attention sinks).
HYBRIDS = {
    "gemma2 (softcap)": ("Gemma2Config", "Gemma2ForCausalLM",
                         dict(_HYBRID, head_dim=32, sliding_window=WINDOW), "sliding_attention",
                         "refused"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_HYBRID, head_dim=32, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"] * 2),
               "sliding_attention", "kernel"),
    "gpt-oss (sinks)": ("GptOssConfig", "GptOssForCausalLM",
                        dict(_HYBRID, head_dim=32, sliding_window=WINDOW, num_local_experts=4,
                             num_experts_per_tok=2), "sliding_attention", "refused"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(_HYBRID, sliding_window=WINDOW),
                "sliding_attention", "kernel"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(_HYBRID, sliding_window=WINDOW),
              "sliding_attention", "kernel"),
    "qwen2 (sliding layers)": ("Qwen2Config", "Qwen2ForCausalLM",
                               dict(_HYBRID, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=2), "sliding_attention", "kernel"),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM",
                dict(_HYBRID, sliding_window=WINDOW, sliding_window_pattern=2),
                "sliding_attention", "kernel"),
    "llama4 (chunked)": ("Llama4TextConfig", "Llama4ForCausalLM",
                         dict(_HYBRID, head_dim=32, attention_chunk_size=WINDOW,
                              intermediate_size_mlp=256, num_local_experts=2),
                         "chunked_attention", "kernel"),
    "qwen3-next (linear attention)": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                                      dict(_HYBRID, head_dim=32, linear_num_value_heads=4,
                                           linear_num_key_heads=2, linear_key_head_dim=32,
                                           linear_value_head_dim=32, moe_intermediate_size=64,
                                           num_experts=4, num_experts_per_tok=2,
                                           full_attention_interval=2),
                                      "linear_attention", "kernel"),
    "lfm2 (convolutions)": ("Lfm2Config", "Lfm2ForCausalLM",
                            dict(_HYBRID, block_ff_dim=256,
                                 layer_types=["conv", "full_attention"] * 2), "conv", "kernel"),
}


def build_hybrid(name: str):
    cfg_name, model_name, kwargs, _, _ = HYBRIDS[name]
    if not hasattr(transformers, cfg_name) or not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(0)
    return config, getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_models_quantize_their_full_attention_layers(name, np_rng):
    config, model = build_hybrid(name)
    exact_type = HYBRIDS[name][3]
    ids = ids_for(int(np_rng.integers(2**31)))
    full = full_logits(model, ids)
    with torch.no_grad():
        short = model(ids[:, 100:]).logits[:, PROMPT - 101:TOKENS - 101]
    assert error(short, full) > 10 * TOL
    cache = ThunderKVCache(config, bits=8, group_size=16, residual_length=32)
    kinds = cache.layer_types
    assert set(kinds) == {"full_attention", exact_type}
    assert cache.quantized_layers == [i for i, k in enumerate(kinds) if k == "full_attention"]
    fine = error(cached_logits(model, ids, cache), full)
    assert fine < TOL
    coarse = error(cached_logits(model, ids, ThunderKVCache(config, bits=2, group_size=16,
                                                            residual_length=32)), full)
    assert coarse > 10 * fine
    # the exact layers count in nbytes, and the whole is below a full-precision cache's
    dynamic = transformers.DynamicCache(config=config)
    with torch.no_grad():
        model(ids[:, :TOKENS - 1], cache=dynamic)
    quantized = sum(cache.layers[i].nbytes for i in cache.quantized_layers)
    # what eval quality/speed report: both caches counted the same way, exact layers included
    assert quantized < cache.nbytes == cache_nbytes(cache) < cache_nbytes(dynamic)
    held = [sum(t.numel() * t.element_size() for t in layer_tensors(layer))
            for layer in dynamic.layers]
    assert cache_nbytes(dynamic) == sum(held)  # recurrent / convolution states included
    exact = sum(b for i, b in enumerate(held) if i not in cache.quantized_layers)
    assert cache.nbytes - quantized == exact  # the exact layers hold what DynamicCache's do
    with pytest.raises(ValueError, match="hybrid model"):
        export_kv(cache)


@pytest.mark.skipif(not fused_attention_available()[0], reason=fused_attention_available()[1])
@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_models_with_the_fused_attention(name, np_rng, count_fused):
    config, model = build_hybrid(name)
    mode = HYBRIDS[name][4]
    if mode == "refused":
        with pytest.raises(RuntimeError, match="has no SDPA form of its attention"):
            use_fused_attention(model)
        assert model.config._attn_implementation != "thunderkv"
        return
    ids = ids_for(int(np_rng.integers(2**31)))
    full = full_logits(model, ids)
    use_fused_attention(model)
    cache = ThunderKVCache(config, bits=8, group_size=16, residual_length=32)
    assert error(cached_logits(model, ids, cache), full) < TOL
    steps = TOKENS - 1 - PROMPT
    assert len(count_fused) == len(cache.quantized_layers) * steps


@pytest.mark.parametrize("name", ["gemma3", "qwen3-next (linear attention)"])
def test_generate_past_the_window_with_a_hybrid_model(name):
    config, model = build_hybrid(name)
    ids = ids_for(11)[:, :WINDOW + 16]
    cache = ThunderKVCache(config, bits=4, group_size=16, residual_length=8)
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=24, do_sample=False,
                             pad_token_id=0)
        want = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert out.shape == want.shape == (2, WINDOW + 40)
    assert cache.get_seq_length() == WINDOW + 39
    assert all(cache.layers[i].quantized_length > 0 for i in cache.quantized_layers)
    # the prompt's forward attends to exact keys, so the first new token is full precision's;
    # later ones read the 4-bit history and may part from it
    assert torch.equal(out[:, :WINDOW + 17], want[:, :WINDOW + 17])


def test_a_hybrid_model_cannot_import_a_kv_message():
    config, model = build("llama")
    cache = ThunderKVCache(config, bits=4, group_size=16, residual_length=8)
    with torch.no_grad():
        model(ids_for(5)[:, :40], cache=cache)
    hybrid_config = build_hybrid("gemma3")[0]
    with pytest.raises(ValueError, match="every layer is full attention; Gemma3TextConfig"):
        import_kv(export_kv(cache), hybrid_config)


def build_mllama():
    """A tiny Mllama (Llama 3.2 Vision): 4 text layers, 1 and 3 cross-attending to one image of
    two 28x28 tiles (34 vision tokens)."""
    if not hasattr(transformers, "MllamaForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Mllama")
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  intermediate_size=64, vision_output_dim=64, image_size=28, patch_size=7,
                  max_num_tiles=2, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2]])
    text = dict(_GQA, num_hidden_layers=4, cross_attention_layers=[1, 3], pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    config = transformers.MllamaConfig(vision_config=vision, text_config=text,
                                       image_token_index=VOCAB - 1)
    torch.manual_seed(0)
    return config, transformers.MllamaForConditionalGeneration(config).eval()


def test_mllama_keeps_its_cross_attention_layers_exact(np_rng):
    """Mllama's cross-attention layers cache the image's KV at the first step and on later
    steps read it back from ``cache.layers[i].keys``: a ThunderKVLayer there handed back only
    its residual (SDPA failed on the second step, the image's 34 tokens cut to 1). They are
    kept exact, as transformers' DynamicLayer; the self-attention layers are quantized."""
    config, model = build_mllama()
    prompt, tokens = 48, 72
    g = torch.Generator().manual_seed(int(np_rng.integers(2**31)))
    ids = torch.randint(3, VOCAB - 1, (2, tokens), generator=g)
    ids[:, 0] = VOCAB - 1  # the image token
    image = dict(pixel_values=torch.randn(2, 1, 2, 3, 28, 28, generator=g),
                 aspect_ratio_ids=torch.tensor([[2], [2]]),
                 aspect_ratio_mask=torch.ones(2, 1, 2, dtype=torch.long))
    xmask = torch.ones(2, tokens, 1, 2, dtype=torch.long)  # every token sees both tiles
    cache = ThunderKVCache(config, bits=8, group_size=16, residual_length=8)
    assert cache.layer_types == ["full_attention", "cross_attention"] * 2
    assert cache.quantized_layers == [0, 2]
    with torch.no_grad():
        full = model(ids, cross_attention_mask=xmask, **image).logits[:, prompt - 1:tokens - 1]
        short = model(ids[:, 30:], cross_attention_mask=xmask[:, 30:], **image).logits
        dynamic = transformers.DynamicCache(config=config)
        model(ids[:, :prompt], cache=dynamic, cross_attention_mask=xmask[:, :prompt], **image)
        got = [model(ids[:, :prompt], cache=cache, cross_attention_mask=xmask[:, :prompt],
                     **image).logits[:, -1]]
        for t in range(prompt, tokens - 1):
            got.append(model(ids[:, t:t + 1], cache=cache,
                             cross_attention_mask=xmask[:, t:t + 1]).logits[:, -1])
    assert error(short[:, prompt - 31:tokens - 31], full) > 10 * TOL
    assert error(torch.stack(got, 1), full) < TOL
    assert all(cache.layers[i].quantized_length > 0 for i in (0, 2))
    for i in (1, 3):  # the image's KV, exactly as DynamicCache holds it
        assert torch.equal(cache.layers[i].keys, dynamic.layers[i].keys)
        assert torch.equal(cache.layers[i].values, dynamic.layers[i].values)
    with pytest.raises(ValueError, match="hybrid model"):
        export_kv(cache)


def test_encoder_decoder_models_take_it_as_their_self_attention_cache():
    """docs/hf.md's recipe for encoder-decoder models: generate() hands a plain cache to both
    self- and cross-attention (DynamicCache too), so ThunderKVCache goes inside an
    EncoderDecoderCache, which keeps the encoder's KV in a DynamicCache of its own."""
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config).eval()
    ids = ids_for(13)[:, :40]
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)
    cache = transformers.EncoderDecoderCache(
        ThunderKVCache(config, bits=8, group_size=16, residual_length=8),
        transformers.DynamicCache(config=config))
    with torch.no_grad():
        want = model.generate(ids, **kw)
        got = model.generate(ids, cache=cache, **kw)
    assert torch.equal(got, want)
    decoder = cache.self_attention_cache
    assert decoder.get_seq_length() == 40 and decoder.layers[0].quantized_length > 0
    assert cache.cross_attention_cache.get_seq_length() == 40  # the encoder's 40 tokens, once


@pytest.mark.parametrize("cfg_name, kwargs, match", [
    ("MistralConfig", dict(_GQA, sliding_window=16), "no full-attention layer"),
    ("Gemma3nTextConfig", dict(_GQA, num_hidden_layers=4, num_kv_shared_layers=2,
                               layer_types=["sliding_attention", "full_attention"] * 2),
     "reuse earlier layers' KV"),
    ("Qwen3NextConfig", dict(_GQA, layer_types=["linear_attention"] * 2),
     "no full-attention layer"),
])
def test_models_without_quantizable_layers_are_refused(cfg_name, kwargs, match):
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_name}")
    with pytest.raises(ValueError, match=match):
        ThunderKVCache(getattr(transformers, cfg_name)(**kwargs))
