"""One transformer layer's KIVI-style format v1 KV cache (a transformers ``CacheLayerMixin``).

State of a layer holding ``T = Ts + Tq + Tr`` tokens, batch ``B``, ``H`` KV heads, head_dim ``D``:

- ``sink_keys``, ``sink_values``: the sequence's first ``Ts <= sink_length`` tokens in full
  precision, ``[B, H, Ts, D]`` (attention sinks: see below);
- ``qkeys``: keys ``[B, H, Tq, D]`` quantized per channel (``key_axis=-2``, groups of G run
  along tokens): packed uint8 ``[B, H, D, Tq*bits/8]``, scale/minimum ``[B, H, D, Tq/G]``;
- ``qvalues``: values quantized per token (``value_axis=-1``): packed ``[B, H, Tq, D*bits/8]``,
  scale/minimum ``[B, H, Tq, D/G]``;
- ``keys``, ``values``: the newest ``Tr`` tokens in full precision, ``[B, H, Tr, D]``.

``Tq`` is always a multiple of G. Once the residual exceeds ``residual_length`` tokens, its
oldest whole groups are quantized -- from the model's own full-precision values -- and appended
to the history; the residual then holds at most ``max(residual_length, G - 1)`` tokens (like HF's
QuantizedCache, whose residual_length is the full-precision capacity) and, when
``residual_length >= G``, at least ``residual_length - G + 1``. The history is never
re-quantized, so it is bit-identical to format v1 applied once to all of its tokens (groups are
independent).

Attention sinks: the first token(s) of a sequence draw a large share of attention in every
layer and their keys are outliers in many channels (Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks"; KVQuant, Hooper et al. 2024, keeps them in fp16 too).
Quantized per channel, such a key would stretch the range of its whole first key group. The
first ``sink_length`` tokens (default 1) therefore stay exact, and the history starts after
them. Measured on SmolLM2-135M (docs/hf.md): one sink token cuts the 4-bit KL divergence 2.5x
and the 2-bit perplexity increase 3-4x, for one token's full-precision bytes per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers.cache_utils import CacheLayerMixin

from ..api import QuantizedTensor, quantize
from ..backends import unavailable_reason
from ..format import MAX_SINK_TOKENS, SUPPORTED_DTYPES, FormatSpec
from .attention import DecodeState, HandOff, fused_attention_enabled, hand_off, kernel_available


def cat_quantized(a: QuantizedTensor | None, b: QuantizedTensor) -> QuantizedTensor:
    """Append ``b``'s tokens to ``a`` (same spec, dtype, batch, heads and head_dim)."""
    if a is None:
        return b
    # axis=-2 stores [..., D, T*bits/8]: tokens run along the last axis; axis=-1 along axis -2.
    dim = -1 if a.spec.axis == -2 else -2
    shape = list(a.shape)
    shape[-2] += b.shape[-2]
    return QuantizedTensor(
        torch.cat([a.packed, b.packed], dim=dim),
        torch.cat([a.scale, b.scale], dim=dim),
        torch.cat([a.minimum, b.minimum], dim=dim),
        a.spec, torch.Size(shape), a.dtype,
    )


def _map_quantized(q: QuantizedTensor | None, fn: Callable[[torch.Tensor], torch.Tensor]):
    if q is None:
        return None
    packed, scale, minimum = fn(q.packed), fn(q.scale), fn(q.minimum)
    shape = torch.Size((scale.shape[0], *q.shape[1:]))
    return QuantizedTensor(packed, scale, minimum, q.spec, shape, q.dtype)


def token_slice(q: QuantizedTensor, start: int, end: int) -> QuantizedTensor:
    """Tokens ``[start, end)`` of ``q`` as a new, contiguous QuantizedTensor.

    For per-channel (axis=-2) tensors both ends must lie on group boundaries.
    """
    if q.spec.axis == -2:
        G = q.spec.group_size
        if start % G or end % G:
            raise ValueError(f"tokens [{start}, {end}) do not lie on key groups of {G}")
        per = q.spec.bits / 8
        parts = (q.packed[..., int(start * per):int(end * per)],
                 q.scale[..., start // G:end // G], q.minimum[..., start // G:end // G])
    else:
        parts = (q.packed[..., start:end, :], q.scale[..., start:end, :],
                 q.minimum[..., start:end, :])
    packed, scale, minimum = (p.clone(memory_format=torch.contiguous_format) for p in parts)
    shape = torch.Size((*q.shape[:-2], end - start, q.shape[-1]))
    return QuantizedTensor(packed, scale, minimum, q.spec, shape, q.dtype)


def check_axis(name: str, axis: object) -> None:
    """Raise ValueError, naming the argument ``name``, unless ``axis`` is -1 or -2."""
    if isinstance(axis, bool) or not isinstance(axis, int) or axis not in (-1, -2):
        raise ValueError(f"{name} must be -1 (per-token: groups run along head_dim) or -2 "
                         f"(per-channel: groups run along tokens), got {axis!r}")


class ThunderKVLayer(CacheLayerMixin):
    """A format v1 quantized KV cache for one full-attention layer (see the module docstring).

    Parameters
    ----------
    bits : 2, 4 or 8.
    group_size : G; must divide head_dim (values are grouped along it).
    residual_length : full-precision capacity in tokens (>= 0; see the module docstring).
    sink_length : first tokens kept exact (0..255; see the module docstring).
    backend : thunderkv backend for quantize/dequantize ("auto" picks by device).
    key_axis, value_axis : -2 per-channel or -1 per-token (defaults: KIVI, -2 keys, -1 values).
    attention_config : the model config; when it selects the ``"thunderkv"`` attention
        (:func:`~thunderkv.hf.use_fused_attention`), single-token updates of a KIVI layer (CPU,
        or CUDA with Triton) return only the full-precision tokens and hand the packed history
        to that attention --
        once the layer's first such update (a probe returning everything) has shown that the
        attention receives the tensors the layer returns (not so in MLA / latent-KV models,
        which transform them first; those layers keep materializing).
    """

    is_sliding = False
    is_compileable = False
    # Crops within the full-precision residual are exact; deeper ones are supported (see `crop`).
    is_croppable = True

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        residual_length: int = 128,
        backend: str = "auto",
        key_axis: int = -2,
        value_axis: int = -1,
        attention_config=None,
        sink_length: int = 1,
    ) -> None:
        super().__init__()
        self.attention_config = attention_config
        check_axis("key_axis", key_axis)
        check_axis("value_axis", value_axis)
        self.key_spec = FormatSpec(bits, group_size, key_axis)
        self.value_spec = FormatSpec(bits, group_size, value_axis)
        if isinstance(residual_length, bool) or not isinstance(residual_length, int):
            raise TypeError(f"residual_length must be an int, got {residual_length!r}")
        if residual_length < 0:
            raise ValueError(f"residual_length must be >= 0, got {residual_length}")
        self.residual_length = residual_length
        if isinstance(sink_length, bool) or not isinstance(sink_length, int):
            raise TypeError(f"sink_length must be an int, got {sink_length!r}")
        if not 0 <= sink_length <= MAX_SINK_TOKENS:  # the wire header's field is one byte
            raise ValueError(f"sink_length must be in 0..{MAX_SINK_TOKENS}, got {sink_length}")
        self.sink_length = sink_length
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.backend = backend
        self.qkeys: QuantizedTensor | None = None
        self.qvalues: QuantizedTensor | None = None
        # Whether the attention takes this layer's hand-offs: None until the probe step shows it.
        self._attention_takes_handoff: bool | None = None
        self._handed: HandOff | None = None  # whether the last hand-off was taken

    @property
    def group_size(self) -> int:
        return self.key_spec.group_size

    @property
    def sink_tokens(self) -> int:
        """Tokens held exact at the start of the sequence (at most ``sink_length``)."""
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    @property
    def quantized_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, x in (("key_states", key_states), ("value_states", value_states)):
            if x.dim() != 4:
                raise ValueError(f"{name} must be [batch, heads, tokens, head_dim], got {x.shape}")
            if x.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"ThunderKVCache stores float16/bfloat16/float32, got {x.dtype}")
        for spec, x in ((self.key_spec, key_states), (self.value_spec, value_states)):
            if spec.axis == -1 and x.shape[-1] % spec.group_size:
                raise ValueError(
                    f"head_dim {x.shape[-1]} is not divisible by group_size {spec.group_size}: "
                    "per-token groups run along head_dim (choose a group_size dividing it)"
                )
        if self.backend != "auto":
            why = unavailable_reason(self.backend, key_states.device)
            if why is not None:
                raise ValueError(f"ThunderKVCache backend={self.backend!r} cannot run on "
                                 f"{key_states.device}, where the model is: {why}")
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.sink_keys, self.sink_values = self.keys.clone(), self.values.clone()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, n, D]`` new keys/values; return all ``T`` keys and values.

        The history comes back dequantized, the sink, the residual and the new tokens exactly.
        """
        hand_off(None)  # a pending hand-off is stale now (its attention call never came)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise TypeError(f"cache holds {self.dtype}, got {key_states.dtype}/{value_states.dtype}")
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        take = min(self.sink_length - self.sink_tokens, keys.shape[-2])
        if take > 0 and self.quantized_length == 0 and self.keys.shape[-2] == 0:
            # only the sequence's very first tokens: nothing may have passed the sink yet
            self.sink_keys = torch.cat([self.sink_keys, keys[..., :take, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, values[..., :take, :]], dim=-2)
            keys, values = keys[..., take:, :].clone(), values[..., take:, :].clone()
        # What this step attends to: the sink, the history as it was, every still-exact token.
        state = DecodeState(self.qkeys, self.qvalues, self.quantized_length, keys, values,
                            self.backend, self.sink_keys, self.sink_values)
        mode = self._handoff_mode(key_states)
        out_k, out_v = (keys, values) if mode == "fused" else state.materialize()
        if mode == "probe":
            state.handle = out_k
        G, r = self.group_size, keys.shape[-2]
        # fewest whole groups that bring the residual back to <= residual_length (or below G)
        n = min(-(-max(r - self.residual_length, 0) // G) * G, r // G * G)
        if n:
            q = self.key_spec
            self.qkeys = cat_quantized(self.qkeys, quantize(
                keys[..., :n, :], bits=q.bits, group_size=G, axis=q.axis, backend=self.backend))
            q = self.value_spec
            self.qvalues = cat_quantized(self.qvalues, quantize(
                values[..., :n, :], bits=q.bits, group_size=G, axis=q.axis, backend=self.backend))
            self.keys, self.values = keys[..., n:, :].clone(), values[..., n:, :].clone()
        else:
            self.keys, self.values = keys, values
        if mode is not None:
            self._handed = state.ticket  # not the state: its tensors go once attention used them
            hand_off(state)  # the "thunderkv" attention reads it instead of out_k/out_v
        return out_k, out_v

    def _fused_step(self, key_states: torch.Tensor) -> bool:
        """Whether this update hands off to the fused attention (see ``attention_config``)."""
        return (self.attention_config is not None and key_states.shape[-2] == 1
                and self.key_spec.axis == -2 and self.value_spec.axis == -1
                and fused_attention_enabled(self.attention_config)
                and kernel_available(key_states.device))

    def _handoff_mode(self, key_states: torch.Tensor) -> str | None:
        """How this update meets the fused attention: None (return everything, no hand-off),
        "probe" (return everything and hand off, to learn whether the attention receives the
        returned tensors) or "fused" (return only the exact tokens; the attention reads the
        packed history from the hand-off). Raises RuntimeError, before the cache changes, if the
        last fused hand-off was not taken: that step attended without the history."""
        if not self._fused_step(key_states):
            return None
        last = self._handed
        if last is not None:
            if last.taken:
                self._attention_takes_handoff = True
            elif self._attention_takes_handoff:
                raise RuntimeError(
                    "the fused ThunderKV attention did not receive the keys this cache layer "
                    "returned on its previous decode step, so that step attended without the "
                    "quantized history and sink; the model must pass the cache's keys to "
                    "attention unchanged (else use the 'sdpa' attention with ThunderKVCache)")
            else:
                self._attention_takes_handoff = False  # e.g. MLA: K/V are rebuilt after update
        self._handed = None
        if self._attention_takes_handoff is None:
            return "probe"
        return "fused" if self._attention_takes_handoff else None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_tokens + self.quantized_length + self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this layer stores (sink, quantized history, full-precision residual)."""
        if self.is_initialized:
            yield from (self.sink_keys, self.sink_values)
        for q in (self.qkeys, self.qvalues):
            if q is not None:
                yield from (q.packed, q.scale, q.minimum)
        if self.is_initialized:
            yield from (self.keys, self.values)

    @property
    def nbytes(self) -> int:
        """Bytes held by :meth:`tensors`."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.qkeys = _map_quantized(self.qkeys, fn)
        self.qvalues = _map_quantized(self.qvalues, fn)
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)

    def reset(self) -> None:
        self._handed = None
        self.keys = self.values = None
        self.sink_keys = self.sink_values = None
        self.qkeys = self.qvalues = None
        self.is_initialized = False

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch. Exact: quantization groups never span rows."""
        if self.is_initialized:
            idx = beam_idx.to(self.keys.device)
            self._apply(lambda t: t.index_select(0, idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._apply(lambda t: t[indices, ...].contiguous())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens (a negative count, as DynamicLayer).

        Exact while they lie in the full-precision residual (at least ``residual_length - G + 1``
        tokens after every update when ``residual_length >= G``). A deeper crop keeps whole key
        groups as they are and moves the tokens of a partly removed group back into the residual
        as their dequantized values; only those tokens are quantized a second time when the
        residual next fills. A crop into the sink keeps its first tokens exactly.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove}"
            )
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        r = self.keys.shape[-2]
        if n <= r:
            self.keys = self.keys[..., : r - n, :].clone()
            self.values = self.values[..., : r - n, :].clone()
            return
        left = self.get_seq_length() - n  # tokens that stay
        if left < self.sink_tokens:
            self.sink_keys = self.sink_keys[..., : max(left, 0), :].clone()
            self.sink_values = self.sink_values[..., : max(left, 0), :].clone()
        keep = max(self.quantized_length - (n - r), 0)
        whole = keep // self.group_size * self.group_size
        partial_k = self.keys[..., :0, :]
        partial_v = self.values[..., :0, :]
        if keep > whole:
            end = whole + self.group_size
            partial_k = token_slice(self.qkeys, whole, end).dequantize(backend=self.backend)
            partial_v = token_slice(self.qvalues, whole, end).dequantize(backend=self.backend)
            partial_k, partial_v = partial_k[..., : keep - whole, :], partial_v[..., : keep - whole, :]
        self.keys, self.values = partial_k.clone(), partial_v.clone()
        if whole:
            self.qkeys = token_slice(self.qkeys, 0, whole)
            self.qvalues = token_slice(self.qvalues, 0, whole)
        else:
            self.qkeys = self.qvalues = None
