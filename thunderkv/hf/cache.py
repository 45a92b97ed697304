"""``ThunderKVCache``: a drop-in transformers ``Cache`` holding KV in format v1 (KIVI layout)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    get_layer_types_and_kwargs,
)
from transformers.configuration_utils import PreTrainedConfig

from .layer import ThunderKVLayer, check_axis

SUPPORTED_LAYER_TYPES = frozenset({"full_attention"})  # quantized, in format v1
# Kept as transformers' own full-precision layers in hybrid models: attention windows (bounded
# by their size: a quantized history could not be trimmed to them), recurrent and convolution
# states (no per-token KV), layers that store nothing (MLP-only layers) and cross-attention
# layers (the image's KV, which the model reads back from ``cache.layers[i].keys``).
# transformers has no layer type for Mllama's cross-attention layers: they are plain DynamicLayers.
CROSS_ATTENTION = "cross_attention"
EXACT_LAYER_TYPES = frozenset({"sliding_attention", "chunked_attention", "conv",
                               "linear_attention", "dummy", CROSS_ATTENTION})


def _decoder_layer_types(config: PreTrainedConfig) -> tuple[list[str], list[dict], str]:
    """(layer types, per-layer kwargs, config class name) of ``config``'s decoder.

    The layers a decoder config lists in ``cross_attention_layers`` (Mllama) are typed
    ``"cross_attention"``: transformers calls them full attention, but they cache the image's
    KV once and read it back on every later step from the layer's ``keys``/``values``.
    """
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"config must be a transformers PreTrainedConfig, got {type(config).__name__}")
    text = config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(text)
    cross = set(getattr(text, "cross_attention_layers", None) or ())
    layer_types = [CROSS_ATTENTION if i in cross else kind for i, kind in enumerate(layer_types)]
    return layer_types, kwargs, type(text).__name__


def _exact_layer(kind: str, kwargs: dict) -> CacheLayerMixin:
    """transformers' own full-precision cache layer for a layer of type ``kind``."""
    return DynamicLayer() if kind == CROSS_ATTENTION else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)


def full_attention_layers(config: PreTrainedConfig) -> int:
    """Number of decoder layers of ``config``; raise ValueError unless all are full attention
    (what a KV message, :func:`~thunderkv.hf.import_kv`, can rebuild)."""
    layer_types, _, name = _decoder_layer_types(config)
    bad = sorted(set(layer_types) - SUPPORTED_LAYER_TYPES)
    if bad:
        raise ValueError(f"{name} has layer types {bad}, not only full attention")
    return len(layer_types)


def cache_layer_types(config: PreTrainedConfig) -> tuple[list[str], list[dict]]:
    """Decoder layer types of ``config`` and the kwargs transformers builds each with.

    ThunderKVCache quantizes the ``"full_attention"`` layers and keeps the types in
    :data:`EXACT_LAYER_TYPES` (sliding windows, chunked attention, linear-attention and
    convolution states, layers without attention, Mllama's cross-attention layers) in
    transformers' own full-precision layers.
    Raises ValueError for other types (e.g. a layer mixing linear and full attention, or indexed
    sparse attention), for KV sharing across layers (Gemma 3n/4) and for a model without any
    full-attention layer (nothing to quantize).
    """
    layer_types, kwargs, name = _decoder_layer_types(config)
    sharing = getattr(config.get_text_config(decoder=True), "kv_sharing_modes", None) or ()
    if "reuse" in sharing:
        raise ValueError(
            f"ThunderKVCache does not support {name}: its last layers reuse earlier layers' "
            "KV (KV sharing), which they take from the attention of the layer that stores it, "
            "not from the cache; use DynamicCache for this model")
    bad = sorted(set(layer_types) - SUPPORTED_LAYER_TYPES - EXACT_LAYER_TYPES)
    if bad:
        raise ValueError(
            f"ThunderKVCache does not support {name}'s layer types {bad}: it quantizes "
            f"full-attention layers and keeps {sorted(EXACT_LAYER_TYPES)} layers exact; use "
            "DynamicCache for this model")
    if "full_attention" not in layer_types:
        raise ValueError(
            f"{name} has no full-attention layer (layer types {sorted(set(layer_types))}): "
            "ThunderKVCache quantizes full-attention KV and would store nothing in format v1 "
            "(every sliding window is bounded anyway); use DynamicCache for this model")
    return layer_types, kwargs


def _tensors(obj, seen: set[int]) -> Iterator[torch.Tensor]:
    """Tensors in ``obj`` (a tensor, or lists, tuples and dicts of them), each once (``seen``
    holds ids), followed into the inner tensors of quanto's QTensor subclasses."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
            for attr in ("_data", "_scale", "_shift"):
                inner = getattr(obj, attr, None)
                if isinstance(inner, torch.Tensor) and inner is not obj:
                    yield from _tensors(inner, seen)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, seen)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, seen)


def layer_tensors(layer) -> Iterator[torch.Tensor]:
    """Every tensor a cache layer stores, as plain storage: a ThunderKVLayer's own list, else
    the plain tensors among the layer's attributes, lists and dicts (keys/values, quantized,
    recurrent and convolution states; tensor subclasses are counted by their inner tensors)."""
    if isinstance(layer, ThunderKVLayer):
        yield from layer.tensors()
        return
    for t in _tensors(list(vars(layer).values()), set()):
        if type(t) is torch.Tensor:
            yield t


class ThunderKVCache(Cache):
    """A quantized KV cache for transformers 5.x models, in ThunderKV format v1.

    Use it like any ``Cache``::

        cache = ThunderKVCache(model.config, bits=4, group_size=64, residual_length=128)
        model.generate(**inputs, cache=cache)            # or past_key_values=cache
        model(input_ids, cache=cache, use_cache=True)   # plain forward loop

    With ``thunderkv.hf.use_fused_attention(model)`` first, decode steps on CPU attend straight
    over the packed history instead of dequantizing it every step (see
    :mod:`thunderkv.hf.attention`).

    Keys are quantized per channel (groups of ``group_size`` run along tokens) and values per
    token (groups run along head_dim), as in KIVI. The newest tokens stay in full precision, up to
    ``residual_length`` of them; beyond that, whole groups are quantized once, incrementally, from
    the model's own values (see :class:`~thunderkv.hf.layer.ThunderKVLayer`). The first
    ``sink_length`` tokens (attention sinks) are kept exact and never quantized.

    Parameters
    ----------
    config : the model's config. Its full-attention layers are quantized; in hybrid models
        (Gemma 2/3, gpt-oss, Cohere 2, OLMo 3, Qwen2 with sliding layers, Llama 4's chunked
        layers, linear-attention hybrids) the sliding-window, chunked, linear-attention and
        convolution layers keep transformers' own full-precision layers (bounded by their window
        or state size), and so do Mllama's cross-attention layers (the image's KV). Other layer
        types, and a model with no full-attention layer, raise ValueError.
    bits : 2, 4 or 8 bits per stored code.
    group_size : G, elements per (scale, minimum); must divide head_dim.
    residual_length : full-precision capacity in tokens (at most ``max(residual_length, G - 1)``
        newest tokens are unquantized; 0 quantizes each group as soon as it fills).
    backend : thunderkv backend: "auto", "cpu", "cuda", "triton" or "reference"; one that cannot
        run on any device here raises ValueError now, one that cannot run on the model's
        device at the first update (before anything is stored).
    key_axis, value_axis : -2 (per-channel) or -1 (per-token); KIVI defaults.
    sink_length : first tokens kept in full precision (0..255, default 1; 0 is plain KIVI).
    num_layers : only when ``config`` is None (e.g. :func:`~thunderkv.hf.import_kv`).
    """

    def __init__(
        self,
        config: PreTrainedConfig | None = None,
        bits: int = 4,
        group_size: int = 64,
        residual_length: int = 128,
        backend: str = "auto",
        *,
        key_axis: int = -2,
        value_axis: int = -1,
        sink_length: int = 1,
        num_layers: int | None = None,
    ) -> None:
        if config is not None:
            layer_types, layer_kwargs = cache_layer_types(config)
            if num_layers is not None and num_layers != len(layer_types):
                raise ValueError(f"num_layers={num_layers} but the config has "
                                 f"{len(layer_types)} layers")
        elif num_layers is None or num_layers <= 0:
            raise ValueError("ThunderKVCache needs the model config (or a positive num_layers)")
        else:
            layer_types, layer_kwargs = ["full_attention"] * num_layers, [{}] * num_layers
        from ..backends import check_backend_name
        from ..format import FormatSpec

        check_backend_name(backend)
        why = backend_problem(backend)
        if why is not None:  # now, not at the first forward pass
            raise ValueError(f"backend={backend!r} cannot run here: {why}")
        FormatSpec(bits, group_size)  # bits 2/4/8 and a positive group size, or ValueError
        check_axis("key_axis", key_axis)
        check_axis("value_axis", value_axis)
        head_dim = head_dim_of(config)
        if head_dim and -1 in (key_axis, value_axis) and head_dim % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the model's head_dim={head_dim}: groups "
                "along head_dim (value_axis/key_axis -1) need a divisor, e.g. "
                f"{next(g for g in (128, 64, 32, 16, 8, 4, 2) if head_dim % g == 0)}")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.backend, self.key_axis, self.value_axis = backend, key_axis, value_axis
        self.sink_length = sink_length
        self.layer_types = layer_types
        layers = [
            ThunderKVLayer(bits, group_size, residual_length, backend, key_axis, value_axis,
                           attention_config=config, sink_length=sink_length)
            if kind == "full_attention" else _exact_layer(kind, kwargs)
            for kind, kwargs in zip(layer_types, layer_kwargs)
        ]
        super().__init__(layers=layers)

    @property
    def quantized_layers(self) -> list[int]:
        """Indices of the layers held in format v1 (the full-attention ones)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, ThunderKVLayer)]

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the cache stores, layer by layer."""
        for layer in self.layers:
            yield from layer_tensors(layer)

    @property
    def nbytes(self) -> int:
        """Bytes the cache stores: packed codes, scales, minima and the full-precision residual
        (and, in hybrid models, the exact layers' windows and states)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def get_memory_bytes(self) -> int:
        """Same as :attr:`nbytes`."""
        return self.nbytes

    def __repr__(self) -> str:
        exact = len(self.layers) - len(self.quantized_layers)
        layers = f"{len(self.layers)}" + (f" ({exact} kept exact)" if exact else "")
        return (
            f"ThunderKVCache(layers={layers}, bits={self.bits}, "
            f"group_size={self.group_size}, residual_length={self.residual_length}, "
            f"sink_length={self.sink_length}, "
            f"axes=(key {self.key_axis}, value {self.value_axis}), tokens={self.get_seq_length()}, "
            f"nbytes={self.nbytes})"
        )


def backend_problem(backend: str) -> str | None:
    """Why thunderkv backend ``backend`` can run on no device here (None when it can on the
    CPU or, where torch sees one, a CUDA device; always None for "auto")."""
    from .. import backends

    if backend == "auto":
        return None
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    reasons = [backends.unavailable_reason(backend, d) for d in devices]
    if any(why is None for why in reasons):
        return None
    return "; ".join(f"{d}: {why}" for d, why in zip(devices, reasons))


def head_dim_of(config) -> int | None:
    """head_dim of ``config`` (explicit, or hidden_size / heads); None when it has neither."""
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hd = getattr(text, "head_dim", None)
    if hd:
        return int(hd)
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None
