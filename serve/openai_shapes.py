"""OpenAI answer shapes for serve/http.py: completion and chat choices, stream chunks' deltas,
usage, ``stream_options``, and how chat messages become a prompt."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .api_types import Engine, RequestError
from .tokenizer import chatml


def text_choice(text: str, finish_reason: str | None) -> dict:
    """A ``/v1/completions`` choice (whole answer or stream chunk)."""
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(text: str, finish_reason: str | None) -> dict:
    """A ``chat.completion`` choice: the assistant's whole message."""
    return {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def chat_delta(text: str, finish_reason: str | None) -> dict:
    """A ``chat.completion.chunk`` choice: the text since the last chunk."""
    delta = {"content": text} if text else {}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


@dataclasses.dataclass(frozen=True)
class AnswerShape:
    """How one API's answers look: ``object`` of a whole answer and of a stream chunk, the
    choice of each (text, finish_reason), and the choice a stream opens with (or None)."""

    object: str
    chunk_object: str
    choice: Callable[[str, str | None], dict]
    delta: Callable[[str, str | None], dict]
    opening: dict | None = None


TEXT = AnswerShape("text_completion", "text_completion", text_choice, text_choice)
CHAT = AnswerShape(
    "chat.completion",
    "chat.completion.chunk",
    chat_choice,
    chat_delta,
    opening={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None},
)


def render_chat(engine: Engine, messages: list[dict[str, str]]) -> str:
    """The prompt for ``messages``: ``engine.tokenizer.render_chat`` (serve/tokenizer.py: the
    model's chat template, else ChatML) where the engine has one, else ChatML. A template that
    refuses the messages is the client's 400."""
    render = getattr(getattr(engine, "tokenizer", None), "render_chat", chatml)
    try:
        return render(messages)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None


def chat_max_tokens(engine: Engine, prompt: str, limit: int) -> int:
    """Chat's default ``max_tokens`` (OpenAI's is "until the context is full"): the positions
    the prompt leaves, at most ``limit``; ``limit`` where the engine does not say."""
    positions = getattr(engine, "max_positions", None)
    tokenizer = getattr(engine, "tokenizer", None)
    if not isinstance(positions, int) or tokenizer is None:
        return limit
    return max(1, min(limit, positions - len(tokenizer.encode(prompt))))


def include_usage(payload: dict, stream: bool) -> bool:
    """``stream_options.include_usage`` of a request body, validated (400 when malformed)."""
    options = payload.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    if not stream:
        raise RequestError("'stream_options' is only allowed with stream=true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError("'stream_options.include_usage' must be a boolean", "stream_options")
    return include


def usage_dict(usage: Any) -> dict:
    """OpenAI's ``usage`` object from the engine's token counts."""
    prompt, completion = int(usage.prompt_tokens), int(usage.completion_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


__all__ = ["AnswerShape", "CHAT", "TEXT", "chat_max_tokens", "include_usage", "render_chat",
           "usage_dict"]
