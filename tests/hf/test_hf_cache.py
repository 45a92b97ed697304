"""ThunderKVCache against DynamicCache on a tiny random Llama (GQA), on CPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import VOCAB, make_tiny, prompt, teacher_forced
from transformers import DynamicCache, MistralConfig

import thunderkv
from thunderkv.hf import ThunderKVCache
from thunderkv.hf.layer import ThunderKVLayer

G, R = 32, 16  # group size (= head_dim) and residual length used throughout
# Max |logit error| / std(reference logits), teacher-forced over 79 steps after a 48-token
# prefix, measured on this model for 8 prompts (prompt seeds 0-7; this one, seed 2, gives
# 0.0051 / 0.143 / 0.474): 8-bit <= 0.0058, 4-bit <= 0.171, 2-bit <= 0.722. Bounds are ~1.4x
# those maxima.
BOUNDS = {8: 0.01, 4: 0.25, 2: 1.0}


def gen_kwargs(ids: torch.Tensor, mask: torch.Tensor | None = None, **kw) -> dict:
    mask = torch.ones_like(ids) if mask is None else mask
    return dict(attention_mask=mask, do_sample=False, pad_token_id=0, **kw)


def test_bits8_greedy_matches_dynamic_cache(tiny):
    config, model = tiny
    ids = prompt(2, 48)
    with torch.no_grad():
        ref = model.generate(ids, cache=DynamicCache(config=config), max_new_tokens=48,
                             output_scores=True, return_dict_in_generate=True,
                             **gen_kwargs(ids))
        cache = ThunderKVCache(config, bits=8, group_size=G, residual_length=R)
        out = model.generate(ids, cache=cache, max_new_tokens=48, **gen_kwargs(ids))
    # Precondition making the comparison meaningful: along the reference path every top-2
    # margin exceeds the measured 8-bit logit error several times over.
    scores = torch.stack(ref.scores, 1)
    top2 = scores.topk(2, dim=-1).values
    assert ((top2[..., 0] - top2[..., 1]) / scores.std()).min() > 5 * 0.0058
    assert torch.equal(out, ref.sequences)
    assert cache.get_seq_length() == 95 and cache.layers[0].quantized_length > 0


def test_past_key_values_keyword_still_works(tiny):
    config, model = tiny
    ids = prompt(1, 40)
    with torch.no_grad():
        a = model.generate(ids, cache=ThunderKVCache(config, bits=4, group_size=G,
                                                     residual_length=R),
                           max_new_tokens=24, **gen_kwargs(ids))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = model.generate(ids, past_key_values=ThunderKVCache(config, bits=4, group_size=G,
                                                                  residual_length=R),
                               max_new_tokens=24, **gen_kwargs(ids))
    assert torch.equal(a, b)


def test_logit_error_within_calibrated_bounds(tiny):
    config, model = tiny
    ids = prompt(2, 128)
    ref = teacher_forced(model, ids, DynamicCache(config=config), 48)
    errors = {}
    for bits, bound in BOUNDS.items():
        cache = ThunderKVCache(config, bits=bits, group_size=G, residual_length=R)
        got = teacher_forced(model, ids, cache, 48)
        errors[bits] = ((got - ref).abs().max() / ref.std()).item()
        assert errors[bits] < bound, (bits, errors[bits])
    assert errors[8] < errors[4] < errors[2]


def test_history_is_format_v1_of_the_model_values(tiny):
    """Layer 0's K/V do not depend on the cache: its history must equal one-shot format v1."""
    config, model = tiny
    ids = prompt(2, 100)
    ref, cache = DynamicCache(config=config), ThunderKVCache(config, 4, G, R)
    teacher_forced(model, ids, ref, 40)
    teacher_forced(model, ids, cache, 40)
    layer = cache.layers[0]
    ts, tq = layer.sink_tokens, layer.quantized_length
    assert ts == 1 and tq % G == 0 and layer.keys.shape[-2] <= max(R, G - 1)
    assert ts + tq + layer.keys.shape[-2] == ref.get_seq_length() == 99
    for q, full, axis in ((layer.qkeys, ref.layers[0].keys, -2),
                          (layer.qvalues, ref.layers[0].values, -1)):
        once = thunderkv.quantize(full[..., ts:ts + tq, :], bits=4, group_size=G, axis=axis)
        assert torch.equal(q.packed, once.packed)
        assert torch.equal(q.scale, once.scale) and torch.equal(q.minimum, once.minimum)
    assert torch.equal(layer.sink_keys, ref.layers[0].keys[..., :ts, :])
    assert torch.equal(layer.sink_values, ref.layers[0].values[..., :ts, :])
    assert torch.equal(layer.keys, ref.layers[0].keys[..., ts + tq:, :])


def feed(layer: ThunderKVLayer, k: torch.Tensor, v: torch.Tensor, start: int, end: int):
    """Tokens ``[start, end)`` one at a time; the last update's returned keys/values."""
    for t in range(start, end):
        out = layer.update(k[..., t:t + 1, :], v[..., t:t + 1, :])
    return out


def test_sink_tokens_stay_exact_and_the_history_starts_after_them(gen):
    k, v = (torch.randn(2, 3, 50, 8, generator=gen) for _ in range(2))
    layer = ThunderKVLayer(4, 8, 4, sink_length=3)
    out_k, out_v = feed(layer, k, v, 0, 50)
    ts, tq = layer.sink_tokens, layer.quantized_length
    assert (ts, tq, layer.keys.shape[-2]) == (3, 40, 7) and layer.get_seq_length() == 50
    assert torch.equal(layer.sink_keys, k[..., :3, :])
    assert torch.equal(out_k[..., :3, :], k[..., :3, :])
    assert torch.equal(out_v[..., :3, :], v[..., :3, :])
    assert torch.equal(out_k[..., 43:, :], k[..., 43:, :])
    once = thunderkv.quantize(k[..., 3:43, :], bits=4, group_size=8, axis=-2)
    assert torch.equal(layer.qkeys.packed, once.packed)
    assert torch.equal(out_k[..., 3:43, :], once.dequantize())
    # sink_length=0 is plain KIVI: the history starts at token 0
    plain = ThunderKVLayer(4, 8, 4, sink_length=0)
    feed(plain, k, v, 0, 50)
    assert plain.sink_tokens == 0 and plain.quantized_length == 48
    once = thunderkv.quantize(k[..., :48, :], bits=4, group_size=8, axis=-2)
    assert torch.equal(plain.qkeys.packed, once.packed)


@pytest.mark.parametrize("left", [0, 2, 3, 20])
def test_crop_through_the_sink_then_refill_is_exact(left, gen):
    k, v = (torch.randn(1, 2, 50, 8, generator=gen) for _ in range(2))
    a, b = ThunderKVLayer(4, 8, 4, sink_length=3), ThunderKVLayer(4, 8, 4, sink_length=3)
    feed(a, k, v, 0, 50)
    feed(b, k, v, 0, 50)
    b.crop(left - 50)
    assert b.get_seq_length() == left and b.sink_tokens == min(left, 3)
    assert torch.equal(b.sink_keys, k[..., :min(left, 3), :])
    feed(b, k, v, left, 50)
    if left < 3 + 8:  # nothing was dequantized back into the residual: every bit rebuilt
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    assert b.get_seq_length() == 50 and b.sink_tokens == 3


def test_a_sink_fills_only_from_the_first_tokens():
    """A cache holding tokens after its (shorter) sink never steals them for the sink."""
    k, v = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    layer = ThunderKVLayer(4, 8, 4, sink_length=0)
    feed(layer, k, v, 0, 10)
    layer.sink_length = 2  # as an import with a larger sink_length than the sender's
    out_k, _ = feed(layer, k, v, 10, 12)
    assert layer.sink_tokens == 0 and torch.equal(out_k[..., 10:, :], k[..., 10:, :])


@pytest.mark.parametrize("sink,error", [(-1, ValueError), (256, ValueError), (True, TypeError),
                                        (1.0, TypeError)])
def test_sink_length_is_checked(tiny, sink, error):
    with pytest.raises(error, match="sink_length"):
        ThunderKVCache(tiny[0], group_size=G, sink_length=sink)


@pytest.mark.parametrize("arg,axis", [("key_axis", 0), ("key_axis", 1), ("value_axis", 3),
                                      ("value_axis", -3), ("key_axis", True)])
def test_an_invalid_axis_is_named(tiny, arg, axis):
    """The error names the argument: format v1's "axis must be ..." did not say which one."""
    with pytest.raises(ValueError, match=f"^{arg} must be -1 .* or -2 .*, got {axis!r}$"):
        ThunderKVCache(tiny[0], group_size=G, **{arg: axis})
    with pytest.raises(ValueError, match=f"^{arg} must be"):
        ThunderKVLayer(4, G, R, **{arg: axis})


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reported_memory_equals_tensor_bytes(tiny, bits):
    config, model = tiny
    ids = prompt(3, 90)
    cache = ThunderKVCache(config, bits=bits, group_size=G, residual_length=R)
    teacher_forced(model, ids, cache, 30)
    tensors = list(cache.tensors())
    assert cache.nbytes == sum(t.untyped_storage().nbytes() for t in tensors)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    # and the format's arithmetic: B*H*D per token, bits/8 + 2*4/G bytes each; fp32 residual
    # and sink
    per_token = 3 * 2 * 32
    layer = cache.layers[0]
    tq, tr, ts = layer.quantized_length, layer.keys.shape[-2], layer.sink_tokens
    assert ts == 1
    expect = 2 * 2 * per_token * (tq * (bits / 8 + 8 / G) + (tr + ts) * 4)
    assert cache.nbytes == expect


def test_crop_within_residual_is_exact(tiny):
    config, model = tiny
    ids = prompt(1, 80)
    cache = ThunderKVCache(config, bits=4, group_size=G, residual_length=R)
    teacher_forced(model, ids, cache, 40)
    before = [t.clone() for t in cache.tensors()]
    # With R < G a flush empties the residual: its k tokens were all added since the last flush,
    # so cropping them and feeding them again must rebuild every bit (both layers).
    k = cache.layers[0].keys.shape[-2]
    assert k > 0 and R < G
    cache.crop(-k)
    assert cache.get_seq_length() == 79 - k
    with torch.no_grad():
        for t in range(79 - k, 79):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.tensors()))
    with pytest.raises(ValueError, match="negative"):
        cache.crop(5)


def test_crop_into_quantized_history(tiny):
    config, model = tiny
    ids = prompt(1, 120)
    cache, ref = ThunderKVCache(config, 8, G, R), DynamicCache(config=config)
    teacher_forced(model, ids, cache, 40)
    teacher_forced(model, ids, ref, 40)
    cache.crop(-50)  # 119 -> 69: through the residual and into the middle of a key group
    ref.crop(-50)
    layer = cache.layers[0]
    assert cache.get_seq_length() == 69 and layer.quantized_length % G == 0
    with torch.no_grad():
        a = model(ids[:, 69:70], cache=cache, use_cache=True).logits
        b = model(ids[:, 69:70], cache=ref, use_cache=True).logits
    assert ((a - b).abs().max() / b.std()).item() < BOUNDS[8]
    cache.crop(-70)  # everything, including the token fed above
    assert cache.get_seq_length() == 0 and layer.qkeys is None


def test_reorder_and_batch_ops_are_exact(tiny):
    config, model = tiny
    ids = prompt(3, 90)
    cache = ThunderKVCache(config, 4, G, R)
    teacher_forced(model, ids, cache, 30)
    base = copy.deepcopy(cache)
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    for a, b in zip(base.tensors(), cache.tensors()):
        assert torch.equal(a[idx], b)
    cache = copy.deepcopy(base)
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert all(torch.equal(a[1:], b) for a, b in zip(base.tensors(), cache.tensors()))
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].qkeys.shape[0] == 4 and cache.layers[1].keys.shape[0] == 4
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())


def test_beam_search_matches_dynamic_cache_at_8_bits(tiny):
    config, model = tiny
    ids = prompt(2, 40)
    kw = gen_kwargs(ids, num_beams=3, max_new_tokens=40)
    with torch.no_grad():
        ref = model.generate(ids, cache=DynamicCache(config=config), **kw)
        out = model.generate(ids, cache=ThunderKVCache(config, 8, G, R), **kw)
    assert torch.equal(out, ref)


def test_left_padded_batch_matches_dynamic_cache_at_8_bits(tiny):
    config, model = tiny
    ids = prompt(2, 44)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # row 1 is 7 tokens shorter, left-padded
    kw = gen_kwargs(ids, mask, max_new_tokens=40)
    with torch.no_grad():
        ref = model.generate(ids, cache=DynamicCache(config=config), **kw)
        out = model.generate(ids, cache=ThunderKVCache(config, 8, G, R), **kw)
    assert torch.equal(out, ref)


def test_reset_and_reuse(tiny):
    config, model = tiny
    ids = prompt(1, 70)
    cache = ThunderKVCache(config, 4, G, R)
    first = teacher_forced(model, ids, cache, 20)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    assert torch.equal(teacher_forced(model, ids, cache, 20), first)


def test_unsupported_configurations_raise_clearly():
    with pytest.raises(ValueError, match=r"no full-attention layer \(layer types \['sliding_attention'\]\)"):
        ThunderKVCache(MistralConfig(num_hidden_layers=2, sliding_window=16))
    config, model = make_tiny(head_dim=48, hidden_size=192)
    # caught when the cache is made, not at the first forward inside generate
    with pytest.raises(ValueError, match="group_size=32 does not divide the model's head_dim=48"):
        ThunderKVCache(config, bits=4, group_size=32)
    cache = ThunderKVCache(config, bits=4, group_size=48)
    with torch.no_grad():
        model(prompt(1, 8), cache=cache, use_cache=True)
    # a layer without the model's config still checks at the first forward
    layer_cache = ThunderKVCache(num_layers=config.num_hidden_layers, bits=4, group_size=32)
    with pytest.raises(ValueError, match="head_dim 48 is not divisible by group_size 32"):
        with torch.no_grad():
            model(prompt(1, 8), cache=layer_cache, use_cache=True)
    with pytest.raises(ValueError, match="bits"):
        ThunderKVCache(config, bits=3, group_size=16)
    with pytest.raises(ValueError, match="residual_length"):
        ThunderKVCache(config, group_size=16, residual_length=-1)
    with pytest.raises(ValueError, match="config"):
        ThunderKVCache(None)
    with pytest.raises(TypeError, match="PreTrainedConfig"):
        ThunderKVCache({"num_hidden_layers": 2})
    assert VOCAB == config.vocab_size


def test_a_backend_that_cannot_run_fails_before_anything_is_stored(gen, monkeypatch):
    """backend="cuda" with no usable GPU used to fail only mid-generate, at the first quantize:
    now at construction; and one that cannot run on the model's device at its first update."""
    import thunderkv.hf.cache as cache_mod

    k = torch.randn(1, 2, 40, 32, generator=gen)
    if cache_mod.backend_problem("cuda") is not None:  # no usable GPU here
        with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
            ThunderKVCache(None, group_size=16, residual_length=8, backend="cuda", num_layers=1)
    monkeypatch.setattr(cache_mod, "backend_problem", lambda backend: None)  # as with a GPU
    cache = ThunderKVCache(None, group_size=16, residual_length=8, backend="cuda", num_layers=1)
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu"):
        cache.update(k, k.clone(), 0)
    assert not cache.layers[0].is_initialized and cache.get_seq_length() == 0
