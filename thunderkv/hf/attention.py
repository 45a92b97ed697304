"""A transformers attention implementation that decodes straight from ThunderKVCache's packed KV.

``use_fused_attention(model)`` registers the implementation ``"thunderkv"`` and switches the
model to it. From then on, a :class:`~thunderkv.hf.ThunderKVCache` built from ``model.config``
stops materializing its quantized history for single-token decode steps: the layer hands its
full-precision residual to :func:`thunderkv_attention_forward`, which runs
:func:`thunderkv.attention.kivi_decode_attention` over the packed history plus that residual.
The kernel is the compiled C++ one for CPU tensors and the Triton one for CUDA tensors.
Everything else -- prefill, other caches, non-KIVI axes, masks other than a boolean padding
mask, CUDA tensors where Triton is missing -- goes through transformers' own SDPA path with exactly the tensors it
would have had, so switching is always safe.

The layer and the attention call meet through a thread-local handoff checked by identity (the
key tensor the attention receives must be the one the layer just returned), so no model code
changes and no other cache can be mistaken for ours. Some models transform what the cache
returns before attending (MLA / latent-KV models such as DeepSeek-V2/V3, GLM-4-MoE-lite, Kimi,
MiniCPM3: ``expand_kv`` after ``cache.update``); there the identity check can never match, and a
layer that returned only its residual would have lost the history. So each layer's first
single-token step is a *probe*: it returns the full keys and values, as without fusion, and
hands off a state keyed by them; only if the attention received exactly those tensors does the
layer return just its residual on later steps. A layer whose probe was not taken keeps
materializing. After a layer's probe succeeded, an attention call that meets its hand-off with
other keys raises RuntimeError (that step would attend without the history), and a hand-off
that no attention call met at all raises at the layer's next update.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..api import QuantizedTensor
from ..attention import backend_ready, fused_attention_available, kivi_decode_attention

ATTENTION_NAME = "thunderkv"
# thunderkv.attention's backend for the fused steps: "auto" = the C++ kernel on CPU tensors,
# the Triton kernel on CUDA ones. Tests set "triton" to run the CUDA path's kernel on CPU
# tensors under TRITON_INTERPRET=1.
KERNEL_BACKEND = "auto"


def kernel_available(device: torch.device) -> bool:
    """Whether the fused kernel runs on tensors on ``device`` (with :data:`KERNEL_BACKEND`)."""
    return backend_ready(KERNEL_BACKEND, device)[0]

_handoff = threading.local()


@dataclass
class HandOff:
    """Whether the attention took a layer's hand-off: all the layer keeps of it, so the state's
    tensors (the previous history, a probe's materialized keys) are freed once the attention
    call that used them returns."""

    taken: bool = False


@dataclass
class DecodeState:
    """What one layer's step attends to, in sequence order: the exact sink tokens
    (``[B, H, Ts, D]``, or None), the first ``tq`` quantized tokens, then ``keys``/``values``
    (full precision, ``[B, H, Tr, D]``, the new tokens last)."""

    qkeys: QuantizedTensor | None
    qvalues: QuantizedTensor | None
    tq: int
    keys: torch.Tensor
    values: torch.Tensor
    backend: str = "auto"  # the cache's thunderkv backend, for materialize()
    sink_keys: torch.Tensor | None = None
    sink_values: torch.Tensor | None = None
    # The key tensor the layer returned, when it is not ``keys`` (a probe step returns the
    # materialized keys); the attention must receive exactly this tensor to take the state.
    handle: torch.Tensor | None = None
    ticket: HandOff = field(default_factory=HandOff)  # taken: the attention took the state

    @property
    def ts(self) -> int:
        """Sink tokens."""
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All attended keys and values in full precision, ``[B, H, Ts + tq + Tr, D]``."""
        ks, vs = ([self.sink_keys], [self.sink_values]) if self.ts else ([], [])
        if self.qkeys is not None and self.tq:
            k = self.qkeys.dequantize(backend=self.backend)
            v = self.qvalues.dequantize(backend=self.backend)
            ks.append(k[..., : self.tq, :])
            vs.append(v[..., : self.tq, :])
        if not ks:
            return self.keys, self.values
        return torch.cat([*ks, self.keys], dim=-2), torch.cat([*vs, self.values], dim=-2)

    def exact(self, mask: torch.Tensor | None):
        """``(keys, values, mask)`` for :func:`kivi_decode_attention`: the sink joins the
        exact tokens after the history (attention is order-free once RoPE is applied), and
        the ``[B, Ts + tq + Tr]`` mask columns are permuted the same way."""
        ts = self.ts
        if not ts:
            return self.keys, self.values, mask
        keys = torch.cat([self.sink_keys, self.keys], dim=-2)
        values = torch.cat([self.sink_values, self.values], dim=-2)
        if mask is not None:
            mask = torch.cat([mask[:, ts:ts + self.tq], mask[:, :ts], mask[:, ts + self.tq:]],
                             dim=-1)
        return keys, values, mask


def hand_off(state: DecodeState | None) -> None:
    """Called by the cache layer: the next attention call on ``state.keys`` may use ``state``.
    ``None`` (at every update) drops a state left by an update whose attention never ran (an
    interrupted step): the attention call after this update is not its own."""
    _handoff.state = state


def _take(key: torch.Tensor) -> DecodeState | None:
    """The pending state if ``key`` is the tensor its layer returned, else None (a probe that
    did not match). Either way the hand-off is cleared: an attention call follows its own
    layer's update, so a state that this call does not take can never be taken. A fused state
    (its layer returned only the residual) met with other keys raises RuntimeError: attending
    without the history would be silently wrong."""
    state = getattr(_handoff, "state", None)
    if state is None:
        return None
    _handoff.state = None
    if state.handle is not None:  # a probe: the keys returned were complete either way
        if state.handle is not key:
            return None
    elif state.keys is not key:  # fused: the layer returned only its residual
        raise RuntimeError(
            "the fused ThunderKV attention received keys other than the ones its cache layer "
            "just returned, so the quantized history and sink would be left out of this step; "
            "the model must pass the cache's keys to attention unchanged (else use the 'sdpa' "
            "attention with ThunderKVCache)")
    state.ticket.taken = True
    return state


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records this step (grad mode on and an input requires grad, as in a
    forward outside ``torch.no_grad()``): the fused kernel has no backward, so such a step
    takes the materialized SDPA path, whose gradient is right, instead of silently cutting
    the graph at the attention."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _padding_mask(attention_mask: torch.Tensor | None, batch: int, length: int):
    """(ok, bool [B, length] or None) from transformers' SDPA mask for one query token."""
    if attention_mask is None:
        return True, None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 \
            or attention_mask.shape[1] != 1 or attention_mask.shape[-1] < length:
        return False, None
    m = attention_mask[:, 0, -1, :length]
    return True, m.expand(batch, length)


def thunderkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query ``[B, Hq, q, D]``, key/value ``[B, H, T, D]``;
    returns ``([B, q, Hq, D], None)`` like SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _take(key)
    if state is not None:
        plain = not any(kwargs.get(k) is not None for k in ("softcap", "sliding_window",
                                                             "position_bias", "s_aux"))
        length = state.ts + state.tq + state.keys.shape[-2]
        ok, mask = _padding_mask(attention_mask, query.shape[0], length)
        if (query.shape[2] == 1 and plain and ok and dropout == 0.0
                and not _needs_grad(query, key, value) and kernel_available(query.device)):
            keys, values, mask = state.exact(mask)
            out = kivi_decode_attention(query[:, :, 0], state.qkeys, state.qvalues, keys,
                                        values, scaling=scaling, key_mask=mask,
                                        tq_attend=state.tq, backend=KERNEL_BACKEND)
            return out.unsqueeze(1), None
        if state.handle is None:  # a probe step already passed the materialized key/value
            key, value = state.materialize()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def register_fused_attention() -> None:
    """Register ``"thunderkv"`` with transformers' attention and mask interfaces (idempotent);
    masks are built exactly as for ``"sdpa"``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, thunderkv_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_fused_attention(model) -> None:
    """Switch ``model`` (a transformers PreTrainedModel) to the ``"thunderkv"`` attention.

    Caches other than ThunderKVCache keep working (SDPA). Raises RuntimeError where the compiled
    kernel is unavailable, where the model's attention has no SDPA form (gpt-oss, Gemma 2), or
    where the model does not take transformers' attention interface (e.g. Falcon, whose
    attention is its own code: transformers only logs a warning and keeps the old
    implementation); ThunderKVCache still works with those models' own attention.
    """
    device = getattr(model, "device", torch.device("cpu"))
    ok, why = fused_attention_available(device)
    if not ok:
        raise RuntimeError(f"fused ThunderKV attention is unavailable on {device}: {why}")
    if not getattr(model, "_supports_sdpa", True):
        raise RuntimeError(
            f"{type(model).__name__} has no SDPA form of its attention (e.g. gpt-oss's attention "
            "sinks, Gemma 2's capped logits), and the fused ThunderKV attention falls back to "
            f"SDPA on every step it does not fuse. Keep the model's "
            f"{model.config._attn_implementation!r} attention: ThunderKVCache works with it")
    register_fused_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    if not fused_attention_enabled(model.config):
        now = getattr(model.config, "_attn_implementation", None)
        raise RuntimeError(
            f"{type(model).__name__} did not switch to the fused ThunderKV attention (it still "
            f"uses {now!r}): its attention does not go through transformers' AttentionInterface. "
            "ThunderKVCache works with it unfused; drop use_fused_attention() for this model")


def fused_attention_enabled(config) -> bool:
    """True when ``config`` (a model config) selects the ``"thunderkv"`` attention."""
    return getattr(config, "_attn_implementation", None) == ATTENTION_NAME
