"""The router's tokenizers render chat messages: the model's template, else ChatML."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from serve.tokenizer import ByteTokenizer, HFTokenizer, chatml  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "hi"}]


def _hf_tokenizer(template: str | None):
    """A transformers fast tokenizer built in memory (no files), with ``template``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")),
        unk_token="[UNK]")
    tok.chat_template = template
    return HFTokenizer(tok)


def test_the_model_template_renders_the_messages_with_the_assistant_turn_opened():
    template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert _hf_tokenizer(template).render_chat(MESSAGES) == "[system]Be brief[user]hi[assistant]"


def test_without_a_template_chat_is_chatml():
    want = ("<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert chatml(MESSAGES) == want
    assert _hf_tokenizer(None).render_chat(MESSAGES) == want
    assert ByteTokenizer().render_chat(MESSAGES) == want


def test_a_template_that_refuses_the_messages_raises_value_error():
    refusing = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(ValueError, match="chat template refused the messages: .*must alternate"):
        _hf_tokenizer(refusing).render_chat(MESSAGES)
