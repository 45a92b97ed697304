"""OpenAI-compatible HTTP front end of the serving engine (standard library only).

Routes (all errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``)::

    POST /v1/completions     OpenAI completions; ``"stream": true`` → Server-Sent Events
    POST /v1/chat/completions  OpenAI chat completions (text messages, the model's chat
                             template), JSON or Server-Sent Events likewise
    GET  /v1/models          the engine's model, OpenAI list shape (and /v1/models/<id>)
    GET  /health             engine.health() as JSON; 503 when it reports not ok, and
                             503 {"ok": false, "status": "starting"} before there is an engine
    GET  /metrics            engine.metrics_text() + HTTP counters (Prometheus text 0.0.4)
    GET  /admin/workers      engine.workers() as a JSON list
    GET  /admin/routing      {"routing": the plan's flows and requests routed on each, or null}
    POST /admin/reschedule   JSON body → engine.reschedule(body) → JSON

The server speaks HTTP/1.1 with keep-alive; a stream is sent with chunked transfer encoding,
one SSE ``data:`` line per engine event, then ``data: [DONE]``; a failure after the status
line went out is sent in-band as a ``data: {"error": {...}}`` event before ``[DONE]``. A client
that disconnects (mid-stream, or while waiting for a non-streamed answer) gets its request
cancelled: a watcher thread per in-flight request notices the closed socket, and a failed write
does too. Shutting the server down (:meth:`ApiServer.close`) cancels in-flight requests too, and
answers them 503 ("server shutting down"; in-band for a stream), never with a cut-off text.

No authentication: it binds 127.0.0.1 by default; put a proxy in front before exposing it.
Against other web sites a browser visits (cross-site requests, DNS rebinding): a POST needs
``Content-Type: application/json`` (415 otherwise: no HTML form or "simple" fetch can send
it), a request with an ``Origin`` header other than this server's own localhost origin gets
403, and while bound to a loopback address so does one whose ``Host`` is not localhost,
127.0.0.1 or [::1].

    with ApiServer(engine) as server:      # binds on construction, serves on start()/enter
        print(server.url)                  # e.g. http://127.0.0.1:41235
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .api_types import (
    CompletionRequest,
    Engine,
    RequestError,
    RequestHandle,
    TokenEvent,
    chat_messages,
    health_ok,
)
from .openai_shapes import (
    CHAT,
    TEXT,
    AnswerShape,
    chat_max_tokens,
    include_usage,
    render_chat,
    usage_dict,
)
from .stops import StopMatcher

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413
_DRAIN_LIMIT = 16 << 20  # oversized bodies up to this are read and dropped: the 413 gets through
_IO_TIMEOUT = 60.0  # socket timeout: idle keep-alive connections, stalled reads and writes
_WATCH_INTERVAL = 0.25  # seconds between a disconnect watcher's checks of its stop flag
_SHUTDOWN_GRACE = 3.0  # close(): how long in-flight requests get to send their 503
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# path → {method: handler method name}
_ROUTES: dict[str, dict[str, str]] = {
    "/v1/completions": {"POST": "_completions"},
    "/v1/chat/completions": {"POST": "_chat_completions"},
    "/v1/models": {"GET": "_models"},
    "/health": {"GET": "_health"},
    "/metrics": {"GET": "_metrics"},
    "/admin/workers": {"GET": "_workers"},
    "/admin/routing": {"GET": "_routing"},
    "/admin/reschedule": {"POST": "_reschedule"},
}
_MODEL_PREFIX = "/v1/models/"
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(value: str) -> str | None:
    """The host of a Host header or an origin's netloc ("[::1]:8000" -> "::1"), lower case."""
    try:
        name = urlsplit("//" + value.strip()).hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


class _ClientGone(Exception):
    """The client closed the connection (or stopped reading); nothing more can be sent."""


def _error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error"


def _error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    return {
        "error": {"message": message, "type": _error_type(status), "param": param, "code": code}
    }


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    item = getattr(o, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except Exception:
            pass
    return str(o)


def _dumps(obj: Any) -> bytes:
    # allow_nan=False: NaN or Infinity (not JSON) raise ValueError, answered as a 500, rather
    # than go out as a body that strict JSON parsers reject
    return json.dumps(
        obj, default=_json_default, separators=(",", ":"), allow_nan=False
    ).encode()


def _shutting_down() -> RequestError:
    return RequestError("server shutting down", status=503, code="server_shutting_down")


class _Inflight:
    """One submitted request: cancels its handle at most once, and never after it finished."""

    def __init__(self, handle: RequestHandle, request_id: str) -> None:
        self.handle = handle
        self.request_id = request_id
        self.finished = False
        self.cancelled = False
        self.client_gone = False
        self.shut_down = False  # cancelled because the server is shutting down
        self._lock = threading.Lock()

    def finish(self) -> None:
        with self._lock:
            self.finished = True

    def cancel(self, *, completed: bool = False, shutdown: bool = False) -> None:
        """Stops the generation. ``completed``: a stop string matched, the client has its
        whole answer (the handle's optional ``stop()`` counts it as completed, not cancelled);
        ``shutdown``: the server is closing (the client then gets a 503, see ``_events``)."""
        with self._lock:
            if self.finished or self.cancelled:
                return
            self.cancelled = True
            self.shut_down = shutdown
        try:
            stop = getattr(self.handle, "stop", None) if completed else None
            (stop if callable(stop) else self.handle.cancel)()
        except Exception:
            log.exception("cancelling %s failed", self.request_id)

    def disconnected(self) -> None:
        self.client_gone = True
        log.info("client of %s disconnected; cancelling", self.request_id)
        self.cancel()


class _DisconnectWatcher(threading.Thread):
    """Calls ``on_disconnect`` once when the peer closes ``sock``, until ``stop()``.

    Peeks (never consumes) the socket: EOF or an error means the client is gone. Data (a
    pipelined next request) ends the watch, since the connection is then evidently alive.
    """

    def __init__(self, sock: socket.socket, on_disconnect: Callable[[], None]) -> None:
        super().__init__(name="thunderkv-http-watch", daemon=True)
        self._sock = sock
        self._on_disconnect = on_disconnect
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def _readable(self, fd: int) -> bool:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(int(_WATCH_INTERVAL * 1000)))
        r, _, x = select.select([fd], [], [fd], _WATCH_INTERVAL)
        return bool(r or x)

    def run(self) -> None:
        try:
            fd = self._sock.fileno()
            while not self._stopped.is_set():
                if not self._readable(fd):
                    continue
                if self._stopped.is_set():
                    return
                try:
                    data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data and not self._stopped.is_set():
                    self._on_disconnect()
                return
        except Exception:  # a closed socket (fileno -1, EBADF...): the request is over anyway
            log.debug("disconnect watcher ended", exc_info=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple, api: ApiServer) -> None:
        self.api = api
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unhandled error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "ThunderKV"
    sys_version = ""
    disable_nagle_algorithm = True  # one small write per streamed token
    timeout = _IO_TIMEOUT

    # --- plumbing -------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.api._connections_changed(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api._connections_changed(self.connection, add=False)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as e:
            log.debug("connection from %s ended: %r", self.client_address, e)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.address_string(), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """Errors found by http.server itself (bad request line, oversized headers...)."""
        try:
            short = HTTPStatus(code).phrase
        except ValueError:
            short = "error"
        self.close_connection = True
        self._headers_sent = False
        try:
            self._send_json(code, _error_body(code, message or short))
        except _ClientGone:
            pass

    def handle_expect_100(self) -> bool:
        """Refuses an oversized body before the client sends it."""
        try:
            too_large = (self._content_length_or_none() or 0) > MAX_BODY_BYTES
        except RequestError:
            too_large = False  # reported by _read_body
        if too_large:
            self.send_error(413, self._too_large_message())
            return False
        return super().handle_expect_100()

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as e:
            raise _ClientGone() from e

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: tuple = ()) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_sent = True
        try:
            self.end_headers()
        except OSError as e:
            raise _ClientGone() from e
        if self.command != "HEAD":
            self._write(data)

    def _send_json(self, status: int, obj: Any, headers: tuple = ()) -> None:
        self._send_bytes(status, _dumps(obj), "application/json", headers)

    def _content_length_or_none(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        try:
            n = int(value.strip())
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise RequestError("invalid Content-Length header", status=400)
        return n

    @staticmethod
    def _too_large_message() -> str:
        return f"request body too large (limit {MAX_BODY_BYTES} bytes)"

    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te and te.strip().lower() != "identity":
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported", status=411)
        n = self._content_length_or_none()
        if not n:
            return b""
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            self._discard(n)
            raise RequestError(self._too_large_message(), status=413)
        try:
            body = self.rfile.read(n)
        except OSError as e:
            raise _ClientGone() from e
        if len(body) < n:
            raise _ClientGone()
        return body

    def _discard(self, n: int) -> None:
        """Reads and drops an oversized body, so that the client gets to read our 413."""
        if n > _DRAIN_LIMIT:
            return
        try:
            while n > 0:
                got = self.rfile.read(min(n, 1 << 16))
                if not got:
                    return
                n -= len(got)
        except OSError:
            pass

    @staticmethod
    def _json_object(body: bytes, *, empty_ok: bool = False) -> dict:
        if not body.strip() and empty_ok:
            return {}
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise RequestError(f"malformed JSON body: {e}") from None
        if not isinstance(obj, dict):
            raise RequestError("request body must be a JSON object")
        return obj

    # --- dispatch -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._status = 0
        self._headers_sent = False
        self._allow: str | None = None
        self._inflight: _Inflight | None = None  # a completion's, until its answer is out
        path = urlsplit(self.path).path
        route = "unmatched"
        try:
            body = self._read_body()
            self._check_origin_and_host()
            if path in _ROUTES:
                route, methods = path, _ROUTES[path]
            elif path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
                route, methods = _MODEL_PREFIX + "{id}", {"GET": "_model"}
            else:
                raise RequestError(f"no route for {self.command} {path}", status=404)
            method = "GET" if self.command == "HEAD" else self.command
            if method not in methods:
                allow = ", ".join(sorted(methods))
                self._allow = allow
                raise RequestError(
                    f"method {self.command} not allowed on {path} (allowed: {allow})", status=405
                )
            if method == "POST":
                self._require_json()
            if self.server.api.engine is None and route != "/health":
                raise RequestError(
                    "the server is starting: its workers are loading the model",
                    status=503, code="server_starting",
                )
            getattr(self, methods[method])(body, path)
        except _ClientGone:
            self.close_connection = True
        except RequestError as e:
            self._fail(e.status, e.message, e.param, e.code)
        except Exception:
            log.exception("error handling %s %s", self.command, path)
            self._fail(500, "internal server error")
        finally:
            self.server.api._count(route, self._status or 499)
            if self._inflight is not None:  # after the answer (a 503 at shutdown included)
                self.server.api._inflight_changed(self._inflight, add=False)

    def _fail(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        if self._headers_sent:  # too late for a status: drop the connection instead
            self.close_connection = True
            return
        headers = (("Allow", self._allow),) if status == 405 and self._allow else ()
        try:
            self._send_json(status, _error_body(status, message, param, code), headers)
        except _ClientGone:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    # --- cross-site protection ------------------------------------------------------------

    def _check_origin_and_host(self) -> None:
        """403 for a browser page of another site (its Origin) and, on a loopback bind, for a
        Host other than localhost (DNS rebinding: a foreign name resolving to 127.0.0.1)."""
        api = self.server.api
        origin = self.headers.get("Origin")
        if origin is not None and not api._local_origin(origin):
            raise RequestError(
                f"cross-origin request refused (Origin {origin!r} is not this server)",
                status=403, code="forbidden_origin",
            )
        host = self.headers.get("Host")
        if host is not None and api._loopback and _hostname(host) not in api._local_names:
            raise RequestError(
                f"Host {host!r} refused: this server answers to localhost only",
                status=403, code="forbidden_host",
            )

    def _require_json(self) -> None:
        """POST bodies must be declared JSON: a cross-site form or "simple" fetch cannot."""
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise RequestError(
                "POST requests need 'Content-Type: application/json'"
                + (f" (got {ctype!r})" if ctype else ""),
                status=415, code="unsupported_media_type",
            )

    # --- routes ---------------------------------------------------------------------------

    def _models(self, body: bytes, path: str) -> None:
        self._send_json(200, {"object": "list", "data": [self.server.api._model_card()]})

    def _model(self, body: bytes, path: str) -> None:
        model_id = path[len(_MODEL_PREFIX) :]
        card = self.server.api._model_card()
        if model_id != card["id"]:
            raise RequestError(
                f"the model '{model_id}' does not exist", "model", 404, "model_not_found"
            )
        self._send_json(200, card)

    def _health(self, body: bytes, path: str) -> None:
        engine = self.server.api.engine
        if engine is None:  # still starting: answered at once, as "not ready yet"
            self._send_json(503, {"ok": False, "status": "starting"})
            return
        try:
            report = engine.health()
        except Exception:
            log.exception("engine.health() failed")
            self._send_json(503, {"ok": False, "error": "health check failed"})
            return
        self._send_json(200 if health_ok(report) else 503, report)

    def _metrics(self, body: bytes, path: str) -> None:
        text = self.server.api.engine.metrics_text()
        if text and not text.endswith("\n"):
            text += "\n"
        text += self.server.api._metrics_text()
        self._send_bytes(200, text.encode(), _METRICS_CONTENT_TYPE)

    def _workers(self, body: bytes, path: str) -> None:
        self._send_json(200, list(self.server.api.engine.workers()))

    def _routing(self, body: bytes, path: str) -> None:
        routing = getattr(self.server.api.engine, "routing", None)
        self._send_json(200, {"routing": routing() if routing is not None else None})

    def _reschedule(self, body: bytes, path: str) -> None:
        result = self.server.api.engine.reschedule(self._json_object(body, empty_ok=True))
        self._send_json(200, result)

    def _completions(self, body: bytes, path: str) -> None:
        api = self.server.api
        payload = self._json_object(body)
        request = CompletionRequest.from_json(
            payload, max_prompt_chars=api.max_prompt_chars, max_tokens_limit=api.max_tokens_limit
        )
        self._serve(request, include_usage(payload, request.stream), TEXT)

    def _chat_completions(self, body: bytes, path: str) -> None:
        api = self.server.api
        payload = self._json_object(body)
        prompt = render_chat(api.engine, chat_messages(payload))
        request = CompletionRequest.from_chat_json(
            payload, prompt, max_prompt_chars=api.max_prompt_chars,
            max_tokens_limit=api.max_tokens_limit,
            default_max_tokens=lambda: chat_max_tokens(api.engine, prompt, api.max_tokens_limit),
        )
        self._serve(request, include_usage(payload, request.stream), CHAT)

    def _serve(self, request: CompletionRequest, include_usage: bool, shape: AnswerShape) -> None:
        """Submits a validated request and answers it (JSON, or SSE for a stream)."""
        api = self.server.api
        if request.model is not None and request.model != api.engine.model_name:
            raise RequestError(
                f"the model '{request.model}' does not exist", "model", 404, "model_not_found"
            )
        if api._closed:
            raise _shutting_down()
        handle = api.engine.submit(request)
        inflight = _Inflight(handle, request.request_id)
        watcher = _DisconnectWatcher(self.connection, inflight.disconnected)
        self._inflight = inflight  # _dispatch takes it off once the answer is out
        api._inflight_changed(inflight, add=True)
        try:
            watcher.start()
            if request.stream:
                self._stream(request, inflight, include_usage, shape)
            else:
                self._complete(request, inflight, shape)
        except Exception as e:
            if inflight.client_gone and not isinstance(e, _ClientGone):
                log.debug("%s ended after its client left: %r", request.request_id, e)
                raise _ClientGone() from e
            raise
        finally:
            watcher.stop()
            inflight.cancel()  # no-op when it finished normally

    def _events(self, inflight: _Inflight) -> Iterator[TokenEvent]:
        """The handle's events; engine timeouts become 504, a departed client ends them, and a
        request the server's shutdown cancelled gets a 503 (never a cut-off "success")."""
        events: Iterator[TokenEvent] | None = None
        while True:
            try:
                if events is None:  # inside the try: events() itself may raise
                    events = iter(inflight.handle.events(timeout=self.server.api.request_timeout))
                event = next(events)
            except StopIteration:
                event = None
            except (TimeoutError, queue.Empty):
                if not inflight.shut_down:
                    raise RequestError(
                        "timed out waiting for the engine", status=504, code="timeout"
                    ) from None
                event = None
            except Exception:
                if not inflight.shut_down:
                    raise
                event = None
            finally:
                if inflight.client_gone:
                    raise _ClientGone()
            if inflight.shut_down:
                raise _shutting_down()
            if event is None:
                return
            yield event

    def _complete(self, request: CompletionRequest, inflight: _Inflight, shape: AnswerShape) -> None:
        texts: list[str] = []
        finish_reason = None
        stops = StopMatcher(request.stop)
        for event in self._events(inflight):
            texts.append(stops.feed(event.text))
            if stops.hit:  # a stop string: end here, and stop generating
                inflight.cancel(completed=True)
                finish_reason = "stop"
                break
            if event.finish_reason:
                finish_reason = event.finish_reason
                break
        texts.append(stops.flush())
        inflight.finish()
        if finish_reason is None:
            log.warning("%s: engine ended without a finish_reason", request.request_id)
            finish_reason = "stop"
        usage = inflight.handle.usage()
        api = self.server.api
        self._send_json(
            200,
            {
                "id": request.request_id,
                "object": shape.object,
                "created": int(time.time()),
                "model": api.engine.model_name,
                "choices": [shape.choice("".join(texts), finish_reason)],
                "usage": usage_dict(usage),
            },
            (("x-request-id", request.request_id),),
        )

    def _stream(
        self, request: CompletionRequest, inflight: _Inflight, include_usage: bool, shape: AnswerShape
    ) -> None:
        events = self._events(inflight)
        # The first event is awaited before the 200 goes out, so that a request the engine
        # rejects late (or an engine failure) still gets a proper error status.
        first = next(events, None)

        self._status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        # HTTP/1.0 has no chunked encoding: the end of the stream is the end of the connection.
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.send_header("x-request-id", request.request_id)
        self._headers_sent = True
        try:
            self.end_headers()
        except OSError as e:
            raise _ClientGone() from e

        created = int(time.time())
        model = self.server.api.engine.model_name

        def chunk(choice: dict | None) -> dict:
            out = {
                "id": request.request_id,
                "object": shape.chunk_object,
                "created": created,
                "model": model,
                "choices": [choice] if choice is not None else [],
            }
            if include_usage:
                out["usage"] = None
            return out

        stops = StopMatcher(request.stop)
        try:
            if shape.opening is not None:
                self._sse(_dumps(chunk(shape.opening)))
            event = first
            while event is not None:
                text, finish = stops.feed(event.text), event.finish_reason
                if stops.hit:  # a stop string: end here, and stop generating
                    inflight.cancel(completed=True)
                    finish = "stop"
                elif finish:
                    text += stops.flush()
                if finish:
                    inflight.finish()  # from here on a disconnect no longer cancels
                if text or finish:
                    self._sse(_dumps(chunk(shape.delta(text, finish))))
                if finish:
                    break
                event = next(events, None)
            else:
                inflight.finish()
                log.warning("%s: engine ended without a finish_reason", request.request_id)
                self._sse(_dumps(chunk(shape.delta(stops.flush(), "stop"))))
            if include_usage:
                final = chunk(None)
                final["usage"] = usage_dict(inflight.handle.usage())
                self._sse(_dumps(final))
        except _ClientGone:
            raise
        except Exception as e:  # the status line is out: report in-band, as OpenAI does
            inflight.cancel()
            if isinstance(e, RequestError):
                status, message, param, code = e.status, e.message, e.param, e.code
            else:
                log.exception("%s failed mid-stream", request.request_id)
                status, message, param, code = 500, "internal server error", None, None
            self._sse(_dumps(_error_body(status, message, param, code)))
        self._sse(b"[DONE]")
        if self._chunked:
            self._write(b"0\r\n\r\n")

    def _sse(self, data: bytes) -> None:
        payload = b"data: " + data + b"\n\n"
        if self._chunked:
            payload = b"%x\r\n%b\r\n" % (len(payload), payload)
        self._write(payload)


class ApiServer:
    """The HTTP server: binds on construction, serves from a daemon thread after start().

    ``engine`` may be None at first (bind the port before starting the engine's workers, so a
    port in use fails at once) and set later (``server.engine = engine``). Started without
    one, the server answers at once while the engine starts: ``/health`` with 503
    ``{"ok": false, "status": "starting"}``, everything else with an OpenAI-style 503
    (code ``server_starting``).

    :meth:`close` (shutdown) cancels in-flight requests: a non-streamed one gets a 503
    ``server_error`` ("server shutting down", code ``server_shutting_down``), a stream the same
    error in-band (as any mid-stream failure), never a cut-off answer passed off as complete.

    ``max_prompt_chars`` bounds a prompt's length (characters, or ids for a token list) before
    it reaches the engine; ``max_tokens_limit`` bounds ``max_tokens``; ``request_timeout`` is
    the longest wait for the engine's next event (passed to ``RequestHandle.events``; a timeout
    gives 504 and cancels the request).
    """

    def __init__(
        self,
        engine: Engine | None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_prompt_chars: int = 100_000,
        max_tokens_limit: int = 4096,
        request_timeout: float = 300,
    ) -> None:
        self.engine = engine
        self.max_prompt_chars = max_prompt_chars
        self.max_tokens_limit = max_tokens_limit
        self.request_timeout = request_timeout
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as in-flight requests end
        self._connections: set[socket.socket] = set()
        self._inflight: set[_Inflight] = set()
        self._counts: dict[tuple[str, int], int] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._httpd = _Server((host, port), self)
        self._loopback = is_loopback(self.host)
        self._local_names = _LOCAL_NAMES | {self.host.lower()}

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> ApiServer:
        if self._closed:
            raise RuntimeError("ApiServer is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="thunderkv-http",
                daemon=True,
            )
            self._thread.start()
            log.info("serving %s on %s", getattr(self.engine, "model_name", "(starting)"),
                     self.url)
        return self

    def close(self) -> None:
        """Stops serving, cancels in-flight requests (their clients get a 503, see the class
        doc; up to ``_SHUTDOWN_GRACE`` seconds to send it) and drops open connections."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()
        with self._lock:
            inflight = list(self._inflight)
        for item in inflight:
            item.cancel(shutdown=True)
        deadline = time.monotonic() + _SHUTDOWN_GRACE
        with self._idle:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- bookkeeping used by the handler ------------------------------------------------------

    def _connections_changed(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _inflight_changed(self, item: _Inflight, *, add: bool) -> None:
        with self._lock:
            if add:
                self._inflight.add(item)
            else:
                self._inflight.discard(item)
                self._idle.notify_all()
            closed = self._closed
        if add and closed:  # submitted while close() was cancelling the others
            item.cancel(shutdown=True)

    def _count(self, route: str, status: int) -> None:
        with self._lock:
            key = (route, status)
            self._counts[key] = self._counts.get(key, 0) + 1

    def _local_origin(self, origin: str) -> bool:
        """Whether ``origin`` is this server reached as localhost (http(s)://host:port)."""
        try:
            parts = urlsplit(origin.strip())
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return False
        return (
            parts.scheme in ("http", "https")
            and (parts.hostname or "").rstrip(".") in _LOCAL_NAMES
            and port == self.port
        )

    def _model_card(self) -> dict:
        return {
            "id": self.engine.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "thunderkv",
        }

    def _metrics_text(self) -> str:
        with self._lock:
            counts = sorted(self._counts.items())
            inflight = len(self._inflight)
        lines = [
            "# HELP thunderkv_http_requests_total HTTP requests answered, by route and status.",
            "# TYPE thunderkv_http_requests_total counter",
        ]
        for (route, status), n in counts:
            lines.append(f'thunderkv_http_requests_total{{route="{route}",code="{status}"}} {n}')
        lines += [
            "# HELP thunderkv_http_inflight_requests Completion requests in flight.",
            "# TYPE thunderkv_http_inflight_requests gauge",
            f"thunderkv_http_inflight_requests {inflight}",
        ]
        return "\n".join(lines) + "\n"


__all__ = ["MAX_BODY_BYTES", "ApiServer", "is_loopback"]
