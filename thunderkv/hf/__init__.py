"""HuggingFace transformers integration: a format v1 KV cache, KV export/import, quality eval.

Needs ``transformers>=5`` (imported by the submodules, not by ``thunderkv`` itself).
"""

from __future__ import annotations

from .attention import register_fused_attention, thunderkv_attention_forward, use_fused_attention
from .cache import ThunderKVCache, cache_layer_types, full_attention_layers
from .layer import ThunderKVLayer
from .wire import (
    KVMessageError,
    export_kv,
    export_kv_into,
    import_kv,
    import_kv_parts,
    kv_header,
    read_header,
)

__all__ = [
    "KVMessageError",
    "ThunderKVCache",
    "ThunderKVLayer",
    "cache_layer_types",
    "export_kv",
    "full_attention_layers",
    "export_kv_into",
    "import_kv",
    "import_kv_parts",
    "kv_header",
    "read_header",
    "register_fused_attention",
    "thunderkv_attention_forward",
    "use_fused_attention",
]
