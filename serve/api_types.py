"""Types shared by the HTTP front end (serve/http.py) and the serving engine.

The HTTP layer only talks to the engine through :class:`Engine` and :class:`RequestHandle`, so
either side can be replaced (and the HTTP layer tested with a fake engine).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class RequestError(ValueError):
    """A client error, reported as an OpenAI-style JSON error with HTTP status ``status``.

    ``param`` names the offending request field (or ``None``); ``code`` is an optional short
    machine-readable code (OpenAI's ``error.code``). Engines raise it too, e.g. from
    :meth:`Engine.submit` when the prompt is too long after tokenization (400) or the queue is
    full (429/503).
    """

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


def _new_request_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(t) and t >= 0 for t in x)


# Bounds of the ``stop`` parameter: OpenAI's limit on the number of stop strings, and a length
# far beyond any real stop sequence that keeps a request's matching work small.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1024


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes
    can carry but no UTF-8 text can), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate {text[exc.start]!r} at character {exc.start}"
    return None


def _is_off_or_false(v: Any) -> bool:
    return v is None or v is False


def _is_zero(v: Any) -> bool:
    return v is None or (_is_number(v) and v == 0)


def _is_empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


# Parameters of OpenAI's completions API that this server does not implement, with a test for
# the values that mean "feature off": anything else is rejected rather than silently ignored.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v is None or (_is_int(v) and v == 1),
    "echo": _is_off_or_false,
    "logprobs": lambda v: v is None,
    "suffix": lambda v: v is None or v == "",
    "frequency_penalty": _is_zero,
    "presence_penalty": _is_zero,
    "logit_bias": _is_empty,
}

# The same for the chat completions API (tools, structured output, other modalities...).
_UNSUPPORTED_CHAT: dict[str, Callable[[Any], bool]] = {
    "logprobs": _is_off_or_false,
    "top_logprobs": lambda v: v is None,
    "frequency_penalty": _is_zero,
    "presence_penalty": _is_zero,
    "logit_bias": _is_empty,
    "tools": _is_empty,
    "functions": _is_empty,
    "tool_choice": lambda v: v is None or v == "none",
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
}

# Fields each API reads, and those it accepts and ignores (they change nothing about the
# answer: end-user ids, metadata, storage and routing hints). Any other field -- a typo such
# as "max_token", or another server's extension such as "top_k" -- is a 400 naming it, as
# OpenAI answers, rather than silently falling back to a default.
_SHARED_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "n", "stream",
                            "stream_options", "stop", "user"})
_COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt"} | set(_UNSUPPORTED)
_CHAT_FIELDS = (_SHARED_FIELDS | {"messages", "max_completion_tokens", "metadata", "store",
                                  "service_tier", "parallel_tool_calls", "prompt_cache_key",
                                  "safety_identifier"} | set(_UNSUPPORTED_CHAT))

# Chat roles this server accepts, and the role the chat template sees ("developer" is OpenAI's
# newer name for "system").
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _parse_prompt(prompt: Any) -> str | list[int]:
    """A completions ``prompt``: a string, token ids, or a batch of exactly one of those."""
    if prompt is None:
        raise RequestError("'prompt' is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # ["text"] or [[ids...]]: a batch of one
    if isinstance(prompt, str):
        if (why := unicode_problem(prompt)) is not None:
            raise RequestError(f"'prompt' is not valid Unicode: {why}", "prompt")
    elif isinstance(prompt, list) and _is_token_list(prompt):
        prompt = list(prompt)
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("only one prompt per request is supported", "prompt")
    else:
        raise RequestError(
            "'prompt' must be a string or a list of non-negative integer token ids", "prompt"
        )
    if len(prompt) == 0:
        raise RequestError("'prompt' must not be empty", "prompt")
    return prompt


def _check_prompt_length(prompt: str | list[int], max_prompt_chars: int, param: str) -> None:
    """400 ``context_length_exceeded`` for a prompt over ``max_prompt_chars`` (chars or ids)."""
    if len(prompt) > max_prompt_chars:
        unit = "characters" if isinstance(prompt, str) else "tokens"
        raise RequestError(
            f"prompt is too long: {len(prompt)} {unit}, at most {max_prompt_chars} allowed",
            param,
            code="context_length_exceeded",
        )


def _parse_max_tokens(body: dict, name: str, default: int, limit: int) -> int:
    """``body[name]`` (``null`` or absent: ``default``), an integer in 1..``limit``."""
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = default
    if not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(f"'{name}' must be an integer >= 1", name)
    if max_tokens > limit:
        raise RequestError(f"'{name}' is {max_tokens}, at most {limit} allowed", name)
    return max_tokens


def _parse_stop(stop: Any) -> list[str] | None:
    """``stop``: a non-empty string or a list of up to MAX_STOP_SEQUENCES of them."""
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        return None
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(
            "'stop' must be a non-empty string or a list of non-empty strings", "stop"
        )
    if len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(
            f"'stop' has {len(stop)} strings, at most {MAX_STOP_SEQUENCES} allowed", "stop"
        )
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise RequestError(
                f"a stop string is {len(s)} characters long, at most {MAX_STOP_CHARS} "
                "allowed", "stop"
            )
        if (why := unicode_problem(s)) is not None:
            raise RequestError(f"a stop string is not valid Unicode: {why}", "stop")
    return list(stop) or None


def _parse_options(body: dict) -> dict[str, Any]:
    """The sampling and output fields both APIs share (``null`` means "default")."""
    temperature = body.get("temperature")
    if temperature is None:
        temperature = CompletionRequest.temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise RequestError("'temperature' must be a number between 0 and 2", "temperature")

    top_p = body.get("top_p")
    if top_p is None:
        top_p = CompletionRequest.top_p
    if not _is_number(top_p) or not 0 <= top_p <= 1:  # 0 (OpenAI allows it): the top token
        raise RequestError("'top_p' must be a number in [0, 1]", "top_p")

    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError("'seed' must be an integer", "seed")

    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise RequestError("only n=1 is supported", "n")

    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream")

    stop = _parse_stop(body.get("stop"))

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    return {
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": seed,
        "stream": stream,
        "stop": stop,
        "model": model,
    }


def _reject_unsupported(body: dict, unsupported: dict[str, Callable[[Any], bool]],
                        known: frozenset[str] | set[str]) -> None:
    """400 for a field this API does not have (``known``: every field it reads or ignores) and
    for a feature this server does not implement set to anything but "off"."""
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise RequestError(f"unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, is_off in unsupported.items():
        if not is_off(body.get(name)):
            raise RequestError(f"'{name}' is not supported by this server", name)


def _message_text(content: Any, role: str, param: str) -> str:
    """A message's ``content``: a string, or a list of text parts (joined with newlines)."""
    if isinstance(content, str):
        text = content
    elif content is None and role == "assistant":
        text = ""
    elif isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"'{param}': only text content parts are supported", param)
        text = "\n".join(p["text"] for p in content)
    else:
        raise RequestError(f"'{param}' must be a string or a list of text parts", param)
    if (why := unicode_problem(text)) is not None:
        raise RequestError(f"'{param}' is not valid Unicode: {why}", param)
    return text


def _chat_message(message: Any, i: int) -> dict[str, str]:
    """One validated message as ``{"role", "content"}`` (the chat template's input)."""
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise RequestError(f"'{param}' must be an object", param)
    role = message.get("role")
    if role not in _CHAT_ROLES:
        raise RequestError(
            f"'{param}.role' must be one of {', '.join(_CHAT_ROLES)} (got {role!r}); "
            "tool messages are not supported", f"{param}.role"
        )
    for name in ("tool_calls", "function_call"):
        if message.get(name):
            raise RequestError(f"'{param}.{name}' is not supported by this server",
                               f"{param}.{name}")
    content = _message_text(message.get("content"), role, f"{param}.content")
    return {"role": _CHAT_ROLES[role], "content": content}


def chat_messages(body: dict) -> list[dict[str, str]]:
    """The ``messages`` of a ``/v1/chat/completions`` body, validated: a non-empty list of
    system/developer/user/assistant messages with text content (``developer`` becomes
    ``system``); raises :class:`RequestError` (param ``messages`` or ``messages[i]...``)."""
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", "messages")
    return [_chat_message(m, i) for i, m in enumerate(messages)]


@dataclass
class CompletionRequest:
    """One completion request, as handed to :meth:`Engine.submit`."""

    prompt: str | list[int]  # text, or token ids
    max_tokens: int = 16
    temperature: float = 1.0  # OpenAI default; 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    stop: list[str] | None = None  # the completion ends before the first (serve/stops.py)
    model: str | None = None
    request_id: str = field(default_factory=_new_request_id)  # "cmpl-<hex>"

    @classmethod
    def from_json(
        cls, body: dict, *, max_prompt_chars: int, max_tokens_limit: int
    ) -> CompletionRequest:
        """Validates an OpenAI ``/v1/completions`` request body; raises :class:`RequestError`.

        ``prompt`` may be a string, a list of token ids, or a list holding exactly one of
        those (batched prompts are not supported). ``max_prompt_chars`` bounds the prompt's
        length in characters (text) or ids (token list). ``null`` means "default" for every
        optional field, as in OpenAI's API.
        """
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        prompt = _parse_prompt(body.get("prompt"))
        _check_prompt_length(prompt, max_prompt_chars, "prompt")
        max_tokens = _parse_max_tokens(body, "max_tokens", cls.max_tokens, max_tokens_limit)
        options = _parse_options(body)
        _reject_unsupported(body, _UNSUPPORTED, _COMPLETION_FIELDS)
        return cls(prompt=prompt, max_tokens=max_tokens, **options)

    @classmethod
    def from_chat_json(
        cls, body: dict, prompt: str, *, max_prompt_chars: int, max_tokens_limit: int,
        default_max_tokens: Callable[[], int],
    ) -> CompletionRequest:
        """Validates the fields of an OpenAI ``/v1/chat/completions`` body other than
        ``messages`` (see :func:`chat_messages`), whose rendering through the model's chat
        template is ``prompt``. ``max_completion_tokens`` (or the older ``max_tokens``)
        defaults to ``default_max_tokens()`` (called only then, once the prompt's length is
        known to be within ``max_prompt_chars``); the request id is ``"chatcmpl-<hex>"``."""
        _check_prompt_length(prompt, max_prompt_chars, "messages")
        name = "max_tokens" if body.get("max_completion_tokens") is None else \
            "max_completion_tokens"
        default = default_max_tokens() if body.get(name) is None else max_tokens_limit
        max_tokens = _parse_max_tokens(body, name, default, max_tokens_limit)
        options = _parse_options(body)
        _reject_unsupported(body, _UNSUPPORTED_CHAT, _CHAT_FIELDS)
        return cls(prompt=prompt, max_tokens=max_tokens,
                   request_id="chat" + _new_request_id(), **options)


@dataclass
class TokenEvent:
    """One step of a generation, as yielded by :meth:`RequestHandle.events`."""

    text: str  # new text since the previous event (may be "")
    token_id: int | None
    # "stop" | "length" | None; Engine's handle ends a cancelled request with "cancelled",
    # which the HTTP layer never passes on to a client
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@runtime_checkable
class RequestHandle(Protocol):
    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Blocks for each event; ends after the event that carries a ``finish_reason``.

        ``timeout`` bounds the wait for any single event (raise ``TimeoutError`` when it
        passes). Raises on engine failure (a :class:`RequestError` is reported to the client
        with its own status, anything else as a 500).
        """
        ...

    def usage(self) -> Usage:
        """Token counts; valid once :meth:`events` has finished."""
        ...

    def cancel(self) -> None:
        """Stops the generation and frees its resources; idempotent, callable from any thread.

        A handle may also have ``stop()``: the same, for a request whose client has its whole
        answer (a stop string matched), so that the engine counts it as completed rather than
        cancelled. The HTTP layer calls it when present, else ``cancel()``.
        """
        ...


@runtime_checkable
class Engine(Protocol):
    """What the HTTP layer needs of the serving engine.

    Chat completions also use two optional attributes when present: ``tokenizer`` (with
    ``encode(text)`` and ``render_chat(messages)``, as in serve/tokenizer.py; without it the
    messages are rendered as ChatML) and ``max_positions`` (the default ``max_tokens`` of a
    chat request is what the prompt leaves of them).
    """

    model_name: str

    def submit(self, request: CompletionRequest) -> RequestHandle:
        """Queues a request; may raise :class:`RequestError` (e.g. prompt too long → 400)."""
        ...

    def health(self) -> dict:
        """Health report; ``{"ok": False, ...}`` (or ``"status"`` other than "ok") → HTTP 503."""
        ...

    def metrics_text(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        ...

    def workers(self) -> list[dict]: ...

    def reschedule(self, body: dict) -> dict:
        """Admin: re-plan the workers; may raise :class:`RequestError`."""
        ...


def health_ok(report: Any) -> bool:
    """Whether an :meth:`Engine.health` report says "healthy".

    ``{"ok": bool}`` decides when present; otherwise ``{"status": ...}`` must be "ok",
    "healthy" or "ready"; a report with neither key counts as healthy.
    """
    if not isinstance(report, dict):
        return False
    if "ok" in report:
        return bool(report["ok"])
    if "status" in report:
        return str(report["status"]).lower() in ("ok", "healthy", "ready")
    return True


__all__ = [
    "MAX_STOP_CHARS",
    "MAX_STOP_SEQUENCES",
    "CompletionRequest",
    "Engine",
    "RequestError",
    "RequestHandle",
    "TokenEvent",
    "Usage",
    "chat_messages",
    "health_ok",
]
