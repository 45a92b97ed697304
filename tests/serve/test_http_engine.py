"""The HTTP API over the real serving engine (worker processes, tiny random Llama, byte
tokenizer, 4096 positions): what only the real sampler and context limit show."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from thunderkv.serve.engine import Engine, ServeConfig  # noqa: E402
from thunderkv.serve.http import ApiServer  # noqa: E402

from thunderkv.transfer import unavailable_reason  # noqa: E402

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"UCX transfer unavailable: {unavailable_reason()}")


@pytest.fixture(scope="module")
def client():
    with Engine(ServeConfig(model="tiny", colocated=1)) as engine, ApiServer(engine) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                          timeout=120)
        yield c
        c.close()


def test_a_tiny_temperature_samples_like_greedy(client):
    """temperature=1e-40 (valid: 0..2) used to overflow logits / T to inf and the softmax to
    NaN; torch.multinomial refused it on every one of 5 attempts, so the client got a 503
    `request_failed` and 3 such requests turned /health "degraded"."""
    greedy = client.completions.create(model="tiny", prompt="hello", max_tokens=6,
                                       temperature=0)
    for temperature in (1e-40, 5e-324):  # the latter is 0 as a float32
        out = client.completions.create(model="tiny", prompt="hello", max_tokens=6,
                                        temperature=temperature, seed=1)
        assert out.choices[0].text == greedy.choices[0].text
        assert out.usage.completion_tokens == 6


def test_chat_without_max_tokens_fills_the_context(client):
    """Chat's max_tokens defaults to what the prompt leaves of the model's positions (OpenAI:
    until the context is full), not a fixed number that a long conversation would exceed."""
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x" * 4000}], temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert 4000 < out.usage.prompt_tokens < 4096
    assert out.usage.total_tokens == 4096  # tiny's positions
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * 4096}])
    assert e.value.code == "context_length_exceeded"
