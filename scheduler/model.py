"""Model shapes for the cost model: presets (LLaMA 7B/13B/30B/70B) or a YAML file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UnknownModel
from .yamlio import Doc, load_yaml


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """A decoder-only transformer with a gated (LLaMA-style, 3-matrix) MLP."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model {self.name}: {f} must be > 0")
        if self.hidden % self.heads:
            raise ValueError(f"model {self.name}: hidden must be divisible by heads")
        if self.heads % self.kv_heads:
            raise ValueError(f"model {self.name}: heads must be divisible by kv_heads")
        if self.dtype_bytes not in (2, 4):
            raise ValueError(f"model {self.name}: dtype_bytes must be 2 or 4")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer layer (attention + gated MLP; norms ignored)."""
        return 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.ffn

    @property
    def embed_params(self) -> int:
        """Input embedding + LM head (untied)."""
        return 2 * self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    def kv_elements_per_token(self, layers: int | None = None) -> int:
        """K and V elements one token adds to the cache over ``layers`` (default: all)."""
        return 2 * (self.layers if layers is None else layers) * self.kv_dim

    def kv_bytes_per_token(self, layers: int | None = None) -> float:
        return self.kv_elements_per_token(layers) * self.dtype_bytes


PRESETS: dict[str, ModelSpec] = {
    "llama-7b": ModelSpec("llama-7b", 32, 4096, 32, 32, 11008, 32000),
    "llama-13b": ModelSpec("llama-13b", 40, 5120, 40, 40, 13824, 32000),
    "llama-30b": ModelSpec("llama-30b", 60, 6656, 52, 52, 17920, 32000),
    "llama-70b": ModelSpec("llama-70b", 80, 8192, 64, 8, 28672, 32000),
}

_FIELDS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A preset name (``llama-30b``) or a model YAML with layers/hidden/heads/kv_heads/ffn/vocab."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    if Path(key).suffix.lower() not in (".yaml", ".yml") and not Path(key).exists():
        raise UnknownModel(f"unknown model preset {key!r}; presets: {sorted(PRESETS)} "
                         "(or pass a model .yaml)", source="--model")
    return model_from_doc(load_yaml(key), Path(key).stem)


def model_from_doc(doc: Doc, default_name: str) -> ModelSpec:
    """The model of a YAML document or of a plan JSON's ``inputs.model`` (one set of checks)."""
    doc.mapping(doc.root, "", f"a mapping with {', '.join(_FIELDS)}")
    doc.check_keys((*_FIELDS, "dtype_bytes", "name"))
    vals = {f: int(doc.number(f, integer=True)) for f in _FIELDS}
    dtype_bytes = int(doc.number("dtype_bytes", integer=True, default=2))
    if dtype_bytes not in (2, 4):
        raise doc.error("dtype_bytes", f"must be 2 or 4, got {dtype_bytes}",
                        doc.node("dtype_bytes").line)
    if vals["hidden"] % vals["heads"]:
        raise doc.error("heads", "hidden must be divisible by heads", doc.node("heads").line)
    if vals["heads"] % vals["kv_heads"]:
        raise doc.error("kv_heads", "heads must be divisible by kv_heads", doc.node("kv_heads").line)
    name = doc.string("name", default=default_name)
    return ModelSpec(name=name, dtype_bytes=dtype_bytes, **vals)
