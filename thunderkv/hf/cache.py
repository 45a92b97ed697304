"""``ThunderKVCache``: a drop-in transformers ``Cache`` holding KV in format v1 (KIVI layout)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs
from transformers.configuration_utils import PreTrainedConfig

from .layer import ThunderKVLayer

SUPPORTED_LAYER_TYPES = frozenset({"full_attention"})


def full_attention_layers(config: PreTrainedConfig) -> int:
    """Number of decoder layers of ``config``; raise ValueError unless all are full attention.

    Sliding-window, chunked, hybrid/linear-attention and KV-sharing layers are rejected: a
    quantized history cannot be trimmed to a window, and they hold no plain per-token KV.
    """
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"config must be a transformers PreTrainedConfig, got {type(config).__name__}")
    text = config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(text)
    bad = sorted(set(layer_types) - SUPPORTED_LAYER_TYPES)
    if bad:
        raise ValueError(
            f"ThunderKVCache supports models whose layers are all full attention; "
            f"{type(text).__name__} has layer types {bad} (sliding-window, chunked, hybrid and "
            "KV-sharing layers are not supported: use DynamicCache for this model)"
        )
    return len(layer_types)


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
    config : the model's config; every decoder layer must be full attention (else ValueError).
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
            n = full_attention_layers(config)
            if num_layers is not None and num_layers != n:
                raise ValueError(f"num_layers={num_layers} but the config has {n} layers")
        elif num_layers is None or num_layers <= 0:
            raise ValueError("ThunderKVCache needs the model config (or a positive num_layers)")
        else:
            n = num_layers
        from ..backends import check_backend_name
        from ..format import FormatSpec

        check_backend_name(backend)
        why = backend_problem(backend)
        if why is not None:  # now, not at the first forward pass
            raise ValueError(f"backend={backend!r} cannot run here: {why}")
        FormatSpec(bits, group_size)  # bits 2/4/8 and a positive group size, or ValueError
        head_dim = head_dim_of(config)
        if head_dim and -1 in (key_axis, value_axis) and head_dim % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the model's head_dim={head_dim}: groups "
                "along head_dim (value_axis/key_axis -1) need a divisor, e.g. "
                f"{next(g for g in (128, 64, 32, 16, 8, 4, 2) if head_dim % g == 0)}")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.backend, self.key_axis, self.value_axis = backend, key_axis, value_axis
        self.sink_length = sink_length
        layers = [
            ThunderKVLayer(bits, group_size, residual_length, backend, key_axis, value_axis,
                           attention_config=config, sink_length=sink_length)
            for _ in range(n)
        ]
        super().__init__(layers=layers)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the cache stores, layer by layer."""
        for layer in self.layers:
            yield from layer.tensors()

    @property
    def nbytes(self) -> int:
        """Bytes the cache stores: packed codes, scales, minima and the full-precision residual."""
        return sum(layer.nbytes for layer in self.layers)

    def get_memory_bytes(self) -> int:
        """Same as :attr:`nbytes`."""
        return self.nbytes

    def __repr__(self) -> str:
        return (
            f"ThunderKVCache(layers={len(self.layers)}, bits={self.bits}, "
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
