"""ThunderKVCache with the fused "thunderkv" attention: same results as materializing the history."""

from __future__ import annotations

import pytest
import torch
from conftest import count_calls, make_tiny, prompt, teacher_forced

import thunderkv.hf.attention as fused_mod
from thunderkv import quantize
from thunderkv.attention import fused_attention_available, kivi_decode_attention_reference
from thunderkv.hf import ThunderKVCache, use_fused_attention

pytestmark = pytest.mark.skipif(not fused_attention_available()[0],
                                reason=fused_attention_available()[1])


@pytest.fixture
def model():
    """A tiny GQA Llama of this test's own (the session-wide one must keep SDPA)."""
    return make_tiny()[1]


def set_attention(model, fused: bool) -> None:
    if fused:
        use_fused_attention(model)
    else:
        model.set_attn_implementation("sdpa")


def run(model, fused: bool, ids, *, prefix, **cache_kwargs):
    set_attention(model, fused)
    cache = ThunderKVCache(model.config, **cache_kwargs)
    return teacher_forced(model, ids, cache, prefix), cache


@pytest.mark.parametrize("bits,group_size,residual", [(4, 16, 8), (2, 32, 0), (8, 16, 40)])
def test_teacher_forced_logits_match_materialized(model, count_fused, bits, group_size,
                                                  residual):
    ids = prompt(2, 90)
    kw = dict(bits=bits, group_size=group_size, residual_length=residual)
    want, ref_cache = run(model, False, ids, prefix=10, **kw)
    assert not count_fused
    got, cache = run(model, True, ids, prefix=10, **kw)
    steps = ids.shape[1] - 1 - 10
    assert len(count_fused) == steps * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # fusion changes how attention reads the cache, not what it stores: layer 0's K/V depend
    # on the embeddings only, so its state is identical (deeper layers see rounding changes)
    for a, b in zip(cache.layers[0].tensors(), ref_cache.layers[0].tensors(), strict=True):
        assert torch.equal(a, b)


def test_greedy_generate_with_left_padding_is_identical(model, count_fused):
    ids = prompt(3, 24)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)

    def generate(fused):
        set_attention(model, fused)
        cache = ThunderKVCache(model.config, bits=8, group_size=16, residual_length=16)
        return model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=40,
                              do_sample=False, pad_token_id=0)

    want = generate(False)
    got = generate(True)
    assert count_fused, "the fused kernel never ran"
    assert torch.equal(got, want)


def test_chunked_prefill_after_decode_falls_back_exactly(model, count_fused):
    """Several new tokens at once (q_len > 1) take SDPA over the same tensors as without fusion."""
    ids = prompt(1, 60)

    def feed(fused):
        set_attention(model, fused)
        cache = ThunderKVCache(model.config, bits=4, group_size=16, residual_length=8)
        outs = []
        with torch.no_grad():
            for a, b in ((0, 20), (20, 21), (21, 22), (22, 40), (40, 41), (41, 60)):
                outs.append(model(ids[:, a:b], cache=cache, use_cache=True).logits)
        return torch.cat(outs, 1)

    want = feed(False)
    got = feed(True)
    assert len(count_fused) == 3 * model.config.num_hidden_layers  # the 1-token steps
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_other_caches_and_axes_are_unaffected(model, count_fused):
    from transformers import DynamicCache

    ids = prompt(2, 40)
    model.set_attn_implementation("sdpa")
    want_dyn = teacher_forced(model, ids, DynamicCache(config=model.config), 8)
    want_axes = teacher_forced(model, ids, ThunderKVCache(
        model.config, bits=4, group_size=16, residual_length=8, key_axis=-1), 8)
    use_fused_attention(model)
    got_dyn = teacher_forced(model, ids, DynamicCache(config=model.config), 8)
    got_axes = teacher_forced(model, ids, ThunderKVCache(
        model.config, bits=4, group_size=16, residual_length=8, key_axis=-1), 8)
    assert not count_fused
    assert torch.equal(got_dyn, want_dyn)
    assert torch.equal(got_axes, want_axes)


def test_use_fused_attention_says_why_when_unavailable(model, monkeypatch):
    monkeypatch.setattr(fused_mod, "fused_attention_available", lambda device=None: (False, "no kernel"))
    with pytest.raises(RuntimeError, match="no kernel"):
        use_fused_attention(model)


@pytest.mark.parametrize("masked", [False, True])
def test_sink_joins_the_exact_tokens_with_the_mask_permuted(masked, gen):
    """The kernel sees [history | sink + residual]; attention must equal plain attention over
    the materialized [sink | history | residual] under the caller's mask."""
    g = gen
    B, H, R, D, G = 2, 2, 3, 16, 16

    def kv(n):
        return torch.randn(B, H, n, D, generator=g)

    qk = quantize(kv(48), bits=4, group_size=G, axis=-2)
    qv = quantize(kv(48), bits=4, group_size=G, axis=-1)
    state = fused_mod.DecodeState(qk, qv, 32, kv(5), kv(5), "cpu", kv(2), kv(2))
    mask = torch.rand(B, 2 + 32 + 5, generator=g) > 0.4 if masked else None
    if masked:
        mask[0, :2] = False  # a left-padded row: its sink is a pad token
        mask[1, :2] = True
    q = torch.randn(B, H * R, D, generator=g)
    keys, values, kernel_mask = state.exact(mask)
    assert keys.shape[-2] == 2 + 5
    got = fused_mod.kivi_decode_attention(q, qk, qv, keys, values, key_mask=kernel_mask,
                                          tq_attend=32)
    full_k, full_v = state.materialize()
    assert full_k.shape[-2] == 2 + 32 + 5 and torch.equal(full_k[..., :2, :], state.sink_keys)
    want = kivi_decode_attention_reference(q, None, None, full_k, full_v, key_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def make_tiny_mla(gen: torch.Generator):
    """A tiny, randomly initialised DeepSeek-V3 (MLA): its cache holds the latents
    ([B, 1, T, 32] and the rotary key [B, 1, T, 16]) and ``expand_kv`` rebuilds K/V from what
    ``cache.update`` returns, so the attention never receives the cache's own tensors."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=2, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, max_position_embeddings=256)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return DeepseekV3ForCausalLM(config).eval()


@pytest.mark.parametrize("sink_length", [0, 1])
def test_latent_kv_model_fused_matches_materialized(count_fused, gen, sink_length):
    """MLA models transform K/V after cache.update: the layers' probe steps are not taken, so
    they keep returning the whole history, and fused attention equals materializing exactly
    (before the fix, decode steps silently attended to the residual only)."""
    model = make_tiny_mla(gen)
    ids = torch.randint(0, 64, (2, 48), generator=gen)
    kw = dict(bits=4, group_size=16, residual_length=8, sink_length=sink_length)
    want, ref_cache = run(model, False, ids, prefix=12, **kw)
    got, cache = run(model, True, ids, prefix=12, **kw)
    assert not count_fused
    assert cache.layers[0].quantized_length > 0
    assert torch.equal(got, want)
    for a, b in zip(cache.tensors(), ref_cache.tensors(), strict=True):
        assert torch.equal(a, b)


def test_fused_handoff_met_with_other_keys_raises_in_that_step(model, gen):
    """After a layer's probe succeeded, an attention call that meets its fused hand-off with
    keys other than the ones the layer returned raises there and then: that very step would
    attend without the quantized history (the update-time check comes one step late)."""
    from thunderkv.hf.attention import _take

    use_fused_attention(model)
    cache = ThunderKVCache(model.config, bits=4, group_size=16, residual_length=8)
    ids = torch.randint(1, 32, (1, 24), generator=gen)
    teacher_forced(model, ids, cache, 20)
    layer = cache.layers[0]
    assert layer._attention_takes_handoff is True
    k = torch.randn(1, 2, 1, 32, generator=gen)
    out_k, _ = layer.update(k, k.clone())  # fused: only the residual comes back
    assert out_k.shape[-2] < layer.get_seq_length()
    with pytest.raises(RuntimeError, match="received keys other than"):
        _take(out_k.clone())  # e.g. a model that rebuilt its keys
    assert _take(out_k) is None  # the hand-off was cleared either way


def test_a_stale_handoff_does_not_reach_the_next_run(model, gen):
    """A fused step whose attention never ran (an interrupted forward) leaves its hand-off
    pending; the next update anywhere drops it, so a fresh run with another cache is not
    mistaken for a model that rebuilt its keys."""
    use_fused_attention(model)
    cache = ThunderKVCache(model.config, bits=4, group_size=16, residual_length=8)
    ids = torch.randint(1, 32, (1, 24), generator=gen)
    teacher_forced(model, ids, cache, 20)
    k = torch.randn(1, 2, 1, 32, generator=gen)
    cache.layers[0].update(k, k.clone())  # fused, and its attention never runs
    fresh = ThunderKVCache(model.config, bits=4, group_size=16, residual_length=8)
    got = teacher_forced(model, ids, fresh, 20)  # raised "received keys other than" before
    # nothing of the stale step leaked in: the same as a run with nothing pending before it
    clean = ThunderKVCache(model.config, bits=4, group_size=16, residual_length=8)
    assert torch.equal(got, teacher_forced(model, ids, clean, 20))


def test_fused_handoff_that_is_not_taken_raises(model, gen):
    """Once a layer has shown that the attention receives its tensors, a later hand-off that is
    not taken (that step attended without the history) fails loudly at the next update."""
    use_fused_attention(model)
    cache = ThunderKVCache(model.config, bits=4, group_size=16, residual_length=8)
    ids = torch.randint(1, 32, (1, 24), generator=gen)
    teacher_forced(model, ids, cache, 20)  # prefill, then probe and fused steps
    layer = cache.layers[0]
    assert layer._attention_takes_handoff is True
    k = torch.randn(1, 2, 1, 32, generator=gen)
    out_k, _ = layer.update(k, k.clone())  # a fused step whose attention never runs
    assert out_k.shape[-2] < layer.get_seq_length()
    before = [t.clone() for t in layer.tensors()]
    with pytest.raises(RuntimeError, match="did not receive the keys"):
        layer.update(k, k.clone())
    assert all(torch.equal(a, b) for a, b in zip(layer.tensors(), before, strict=True))
    with pytest.raises(RuntimeError, match="did not receive the keys"):  # not only once
        layer.update(k, k.clone())


def test_the_cuda_path_kernel_decodes_the_same(model, monkeypatch):
    """The Triton kernel CUDA tensors take, run on CPU tensors (TRITON_INTERPRET=1 without a
    GPU) through the same hand-off: same logits as materializing, every decode step fused."""
    from thunderkv.attention import backend_ready

    ok, why = backend_ready("triton", torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    import thunderkv.triton_kernels as kernels

    calls = count_calls(monkeypatch, kernels, "kivi_decode_attention")
    monkeypatch.setattr(fused_mod, "KERNEL_BACKEND", "triton")
    ids = prompt(2, 60)
    kw = dict(bits=4, group_size=16, residual_length=8)
    want, _ = run(model, False, ids, prefix=10, **kw)
    got, _ = run(model, True, ids, prefix=10, **kw)
    assert len(calls) == (ids.shape[1] - 1 - 10) * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _decode_step_grads(model, fused: bool, ids) -> dict[str, torch.Tensor]:
    """Parameter gradients of one decode step run with autograd on (history prefilled under
    no_grad), through an 8-bit ThunderKVCache."""
    set_attention(model, fused)
    model.zero_grad(set_to_none=True)
    cache = ThunderKVCache(model.config, bits=8, group_size=16, residual_length=8)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache, use_cache=True)
    model(ids[:, -1:], cache=cache, use_cache=True).logits.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_step_that_autograd_records_gets_the_gradient_through_attention(model, count_fused):
    """The fused kernel has no backward: a decode step run outside no_grad used to take it and
    silently cut the graph there (no gradient reached any q/k/v projection). Such a step now
    takes the materialized path and gets its gradient."""
    ids = prompt(1, 60)
    want = _decode_step_grads(model, False, ids)
    got = _decode_step_grads(model, True, ids)
    assert not count_fused  # the recorded step did not use the kernel
    assert got.keys() == want.keys()
    assert any(".q_proj." in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_a_layer_keeps_no_tensors_of_a_step_once_its_attention_ran(model, monkeypatch):
    """Each layer used to keep its last hand-off state until its next update: the history as it
    was before the step (a second copy after every flush) and, after the first decode step,
    that step's materialized full-precision keys."""
    import gc
    import weakref

    import thunderkv.hf.layer as layer_mod

    handed: list[weakref.ref] = []
    real = layer_mod.hand_off

    def recording(state):
        if state is not None:
            handed.append(weakref.ref(state))
        real(state)

    monkeypatch.setattr(layer_mod, "hand_off", recording)
    set_attention(model, True)
    ids = prompt(1, 40)
    cache = ThunderKVCache(model.config, bits=4, group_size=16, residual_length=8)
    with torch.no_grad():
        model(ids[:, :30], cache=cache, use_cache=True)
        for t in range(30, 34):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
    gc.collect()
    assert len(handed) == 4 * model.config.num_hidden_layers
    assert all(ref() is None for ref in handed)
