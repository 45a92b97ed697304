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


# Parameters of OpenAI's completions API that this server does not implement, with a test for
# the values that mean "feature off": anything else is rejected rather than silently ignored.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v is None or (_is_int(v) and v == 1),
    "echo": lambda v: v is None or v is False,
    "logprobs": lambda v: v is None,
    "suffix": lambda v: v is None or v == "",
    "frequency_penalty": lambda v: v is None or (_is_number(v) and v == 0),
    "presence_penalty": lambda v: v is None or (_is_number(v) and v == 0),
    "logit_bias": lambda v: v is None or v == {},
}


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

        prompt = body.get("prompt")
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
        if len(prompt) > max_prompt_chars:
            unit = "characters" if isinstance(prompt, str) else "tokens"
            raise RequestError(
                f"prompt is too long: {len(prompt)} {unit}, at most {max_prompt_chars} allowed",
                "prompt",
                code="context_length_exceeded",
            )

        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = cls.max_tokens
        if not _is_int(max_tokens) or max_tokens < 1:
            raise RequestError("'max_tokens' must be an integer >= 1", "max_tokens")
        if max_tokens > max_tokens_limit:
            raise RequestError(
                f"'max_tokens' is {max_tokens}, at most {max_tokens_limit} allowed", "max_tokens"
            )

        temperature = body.get("temperature")
        if temperature is None:
            temperature = cls.temperature
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise RequestError("'temperature' must be a number between 0 and 2", "temperature")

        top_p = body.get("top_p")
        if top_p is None:
            top_p = cls.top_p
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise RequestError("'top_p' must be a number in (0, 1]", "top_p")

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

        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None:
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
            stop = list(stop) or None

        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("'model' must be a string", "model")

        for name, is_off in _UNSUPPORTED.items():
            if not is_off(body.get(name)):
                raise RequestError(f"'{name}' is not supported by this server", name)

        return cls(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            seed=seed,
            stream=stream,
            stop=stop,
            model=model,
        )


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
    "health_ok",
]
