"""HTTP front end (serve/http.py) against a small deterministic fake engine, through the official
openai client and plain urllib/sockets. No model, no GPU."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from thunderkv.serve.api_types import (  # noqa: E402
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    CompletionRequest,
    RequestError,
    TokenEvent,
    Usage,
)
from thunderkv.serve.http import MAX_BODY_BYTES, ApiServer  # noqa: E402

MODEL = "fake-model"


class FakeHandle:
    """'Generates' the prompt's characters back, one per token.

    Finishes with "stop" on a '.' or at the end of the prompt, "length" at max_tokens. Magic
    prompts: FOREVER (endless tokens until cancelled, then a "cancelled" event as the serving
    engine sends), BOOM-FIRST / BOOM-MID (engine failure
    before the first / after two tokens), LATE-REJECT (RequestError from events), STALL
    (TimeoutError from events), NOFINISH (ends without a finish_reason), UNAVAILABLE (a 503
    RequestError from events).
    """

    def __init__(self, engine: FakeEngine, request: CompletionRequest, chars: list[str]):
        self.engine = engine
        self.request = request
        self.chars = chars
        self.cancelled = threading.Event()
        self.cancel_calls = 0
        self.stop_calls = 0
        self.completion_tokens = 0
        self.timeout_seen: float | None = None

    def events(self, timeout=None):
        self.timeout_seen = timeout
        prompt = "".join(self.chars)
        if prompt == "BOOM-FIRST":
            raise RuntimeError("engine exploded: secret-detail")
        if prompt == "LATE-REJECT":
            raise RequestError("prompt too long after tokenization", "prompt")
        if prompt == "STALL":
            raise TimeoutError("no event")
        if prompt == "UNAVAILABLE":  # the engine gave up on the request, and says why
            raise RequestError("request failed 5 times; last error: PoolFull: no free slice",
                               status=503, code="request_failed")
        if prompt == "NOFINISH":  # an engine that forgets the finish_reason
            yield TokenEvent("a", 97)
            yield TokenEvent("b", 98)
            self.completion_tokens = 2
            return
        if prompt == "FOREVER":
            while not self.cancelled.is_set():
                time.sleep(0.01)
                self.completion_tokens += 1
                yield TokenEvent("x", ord("x"))
            yield TokenEvent("", None, "cancelled")  # what Engine's handle does
            return
        if self.engine.barrier is not None:
            self.engine.barrier.wait(timeout=10)
        for i, ch in enumerate(self.chars):
            if self.cancelled.is_set():
                return
            if prompt == "BOOM-MID" and i == 2:
                raise RuntimeError("engine exploded mid-stream: secret-detail")
            if self.engine.delay:
                time.sleep(self.engine.delay)
            self.completion_tokens += 1
            finish = None
            if ch == ".":
                finish = "stop"
            elif self.completion_tokens == self.request.max_tokens:
                finish = "length"
            elif i == len(self.chars) - 1:
                finish = "stop"
            yield TokenEvent(ch, ord(ch), finish)
            if finish:
                return

    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.chars), completion_tokens=self.completion_tokens)

    def cancel(self) -> None:
        self.cancel_calls += 1
        self.cancelled.set()

    def stop(self) -> None:  # a stop string matched: cancelled, but counted as completed
        self.stop_calls += 1
        self.cancelled.set()


class FakeEngine:
    model_name = MODEL

    def __init__(self) -> None:
        self.handles: list[FakeHandle] = []
        self.healthy = True
        self.barrier: threading.Barrier | None = None
        self.delay = 0.0
        self.max_prompt_tokens = 200
        self.reschedules: list[dict] = []
        self._lock = threading.Lock()

    def submit(self, request: CompletionRequest) -> FakeHandle:
        if isinstance(request.prompt, str):
            chars = list(request.prompt)
        else:
            chars = [chr(t) for t in request.prompt]
        if "".join(chars) == "BOOM-SUBMIT":
            raise RuntimeError("submit exploded: secret-detail")
        if len(chars) > self.max_prompt_tokens:
            raise RequestError("prompt is longer than the engine's context", "prompt")
        handle = FakeHandle(self, request, chars)
        with self._lock:
            self.handles.append(handle)
        return handle

    def health(self) -> dict:
        return {"ok": self.healthy, "workers": 2}

    def metrics_text(self) -> str:
        return "# TYPE fake_requests_total counter\nfake_requests_total 3\n"

    def workers(self) -> list[dict]:
        return [{"id": "gpu0", "role": "prefill"}, {"id": "gpu1", "role": "decode"}]

    def routing(self) -> list[dict]:
        return [{"prefill": 0, "decode": 1, "req_per_s": 2.0, "routed": 5}]

    def reschedule(self, body: dict) -> dict:
        if "bad" in body:
            raise RequestError("unknown worker 'bad'", "bad")
        self.reschedules.append(body)
        return {"accepted": True, "body": body}

    def wait_handle(self, n: int = 1, timeout: float = 5.0) -> FakeHandle:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.handles) >= n:
                    return self.handles[n - 1]
            time.sleep(0.01)
        raise AssertionError("the engine never got the request")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine):
    with ApiServer(engine, max_prompt_chars=1000, max_tokens_limit=64, request_timeout=30) as s:
        yield s


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=10)
    yield c
    c.close()


def http(server, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, headers, body) of one request through urllib."""
    req = urllib.request.Request(server.url + path, data=body, method=method)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


JSON = {"Content-Type": "application/json"}


def post_json(server, path: str, obj, headers=None) -> tuple:
    data = json.dumps(obj).encode()
    return http(server, "POST", path, data, {**JSON, **(headers or {})})


def assert_error_shape(body: bytes, *, type_: str, param=None) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    assert err["param"] == param
    assert "Traceback" not in err["message"] and "secret-detail" not in err["message"]
    return err


# --- completions through the openai client ------------------------------------------------------


def test_completion_stop_at_period(client, engine):
    out = client.completions.create(model=MODEL, prompt="Hello. World", max_tokens=16)
    assert out.object == "text_completion"
    assert out.id.startswith("cmpl-") and len(out.id) > 10
    assert out.model == MODEL
    assert isinstance(out.created, int) and abs(out.created - time.time()) < 60
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert (choice.text, choice.index, choice.logprobs, choice.finish_reason) == (
        "Hello.",
        0,
        None,
        "stop",
    )
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (12, 6)
    assert out.usage.total_tokens == 18
    assert engine.handles[0].cancel_calls == 0  # finished normally: nothing to cancel
    assert engine.handles[0].timeout_seen == 30


def test_completion_length_and_request_fields(client, engine):
    out = client.completions.create(
        model=MODEL, prompt="abcdef", max_tokens=3, temperature=0, top_p=0.5, seed=7, stop="\n"
    )
    assert out.choices[0].text == "abc"
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        6,
        3,
        9,
    )
    req = engine.handles[0].request
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.model) == (
        3,
        0.0,
        0.5,
        7,
        ["\n"],
        MODEL,
    )
    assert req.stream is False
    assert req.request_id == out.id


def test_completion_token_ids_and_batch_of_one(client):
    out = client.completions.create(model=MODEL, prompt=[72, 105, 33], max_tokens=8)
    assert out.choices[0].text == "Hi!"
    assert out.usage.prompt_tokens == 3
    out = client.completions.create(model=MODEL, prompt=["Yo."], max_tokens=8)
    assert out.choices[0].text == "Yo."


def test_completion_raw_response_headers(client):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="ab", max_tokens=4)
    assert raw.headers["content-type"] == "application/json"
    out = raw.parse()
    assert raw.headers["x-request-id"] == out.id


def test_streaming(client, engine):
    stream = client.completions.create(
        model=MODEL, prompt="Stream me. Not this", max_tokens=32, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "Stream me."
    assert len(chunks) == len("Stream me.")  # one chunk per engine event
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert {c.id for c in chunks} == {engine.handles[0].request.request_id}
    assert all(c.object == "text_completion" and c.model == MODEL for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert engine.handles[0].request.stream is True
    assert engine.handles[0].cancel_calls == 0


def test_streaming_length_and_include_usage(client):
    stream = client.completions.create(
        model=MODEL,
        prompt="abcdefgh",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *text_chunks, last = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == "abcde"
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        8,
        5,
        13,
    )


def test_streaming_wire_format(server):
    """The raw bytes: SSE over chunked encoding, ending with data: [DONE]."""
    body = json.dumps({"model": MODEL, "prompt": "ok.", "max_tokens": 4, "stream": True})
    status, headers, raw = http(
        server, "POST", "/v1/completions", body.encode(), {"Content-Type": "application/json"}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Transfer-Encoding"] == "chunked"
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert [p["choices"][0]["text"] for p in payloads] == ["o", "k", "."]
    for p in payloads:
        assert set(p) == {"id", "object", "created", "model", "choices"}
        assert set(p["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}


def test_async_client_reuses_connection_after_stream(server):
    """AsyncOpenAI drains the body after [DONE] (HTTP/1.1) and reuses the connection."""
    import asyncio

    async def main() -> list:
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        out = []
        for i in range(3):
            stream = await c.completions.create(model=MODEL, prompt=f"s{i}.", stream=True)
            out.append("".join([chunk.choices[0].text async for chunk in stream]))
            done = await c.completions.create(model=MODEL, prompt=f"n{i}.")
            out.append(done.choices[0].text)
        await c.close()
        return out

    assert asyncio.run(main()) == ["s0.", "n0.", "s1.", "n1.", "s2.", "n2."]


def test_streaming_http10_without_chunking(server):
    body = json.dumps({"prompt": "ab.", "stream": True}).encode()
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        raw = b""
        while chunk := sock.recv(65536):  # the server closes the connection at the end
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head and b"chunked" not in head.lower()
    events = payload.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]] == ["a", "b", "."]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("other-model")
    assert e.value.code == "model_not_found"


def test_completion_for_another_model_is_404(client, server, engine):
    """Like GET /v1/models/<id>: a model this server does not serve is not silently swapped
    for the one it does. No model field at all stays fine."""
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="gpt-4", prompt="hi.", stream=stream)
        assert (e.value.code, e.value.param) == ("model_not_found", "model")
        assert "gpt-4" in e.value.message
    assert engine.handles == []  # never reached the engine
    status, _, body = post_json(server, "/v1/completions", {"prompt": "hi."})
    assert status == 200 and json.loads(body)["model"] == MODEL


# --- client errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 65}, "max_tokens"),  # over max_tokens_limit
        ({"prompt": "x" * 1001}, "prompt"),  # over max_prompt_chars
        ({"prompt": "hi", "n": 2}, "n"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "top_p": -0.1}, "top_p"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "logprobs": 2}, "logprobs"),
        ({"prompt": "x" * 201}, "prompt"),  # rejected by the engine's submit()
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_request(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, **kwargs)
    assert e.value.status_code == 400
    assert e.value.param == param
    assert e.value.type == "invalid_request_error"


def test_bad_request_streaming(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-5, stream=True)
    assert e.value.param == "max_tokens"
    # rejected by the engine after submit, before the first event: still a real 400
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="LATE-REJECT", stream=True)
    assert e.value.param == "prompt"


def test_missing_prompt_and_oversized_code(server):
    status, _, body = post_json(server, "/v1/completions", {"model": MODEL})
    assert status == 400
    assert assert_error_shape(body, type_="invalid_request_error", param="prompt")
    status, _, body = post_json(server, "/v1/completions", {"prompt": "y" * 1001})
    err = assert_error_shape(body, type_="invalid_request_error", param="prompt")
    assert (status, err["code"]) == (400, "context_length_exceeded")


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'"text"', b"\xff\xfe{"])
def test_malformed_json(server, body):
    status, headers, raw = http(server, "POST", "/v1/completions", body, JSON)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    assert_error_shape(raw, type_="invalid_request_error")


def test_not_found_and_method_not_allowed(server):
    status, _, body = http(server, "GET", "/v1/nothing")
    assert status == 404
    assert_error_shape(body, type_="invalid_request_error")
    status, _, body = post_json(server, "/v2/completions", {"prompt": "hi"})
    assert status == 404
    status, headers, body = http(server, "GET", "/v1/completions")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert_error_shape(body, type_="invalid_request_error")
    for method, path in [("DELETE", "/health"), ("PUT", "/admin/reschedule"), ("POST", "/metrics")]:
        status, _, body = http(server, method, path, b"{}" if method != "DELETE" else None)
        assert status == 405, (method, path)


def test_body_too_large(server, engine):
    body = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    status, _, raw = http(server, "POST", "/v1/completions", body)
    assert status == 413
    assert_error_shape(raw, type_="invalid_request_error")
    assert engine.handles == []
    # the server is still fine afterwards
    status, _, _ = http(server, "GET", "/health")
    assert status == 200


def test_head_health(server):
    status, headers, body = http(server, "HEAD", "/health")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) > 0


# --- engine failures ----------------------------------------------------------------------------


def test_engine_exception_is_500_without_details(client, server, caplog):
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="BOOM-SUBMIT")
    assert e.value.status_code == 500
    assert e.value.type == "server_error"
    assert "secret-detail" not in str(e.value.body)
    assert "submit exploded" in caplog.text  # logged server-side
    status, _, body = post_json(server, "/v1/completions", {"prompt": "BOOM-FIRST"})
    assert status == 500
    assert_error_shape(body, type_="server_error")


def test_engine_failure_before_first_stream_event_is_500(client, engine):
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="BOOM-FIRST", stream=True)
    assert engine.handles[0].cancel_calls == 1


def test_engine_failure_mid_stream(client, engine):
    stream = client.completions.create(model=MODEL, prompt="BOOM-MID", stream=True)
    texts = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["B", "O"]
    assert e.value.type == "server_error"
    assert "secret-detail" not in e.value.message
    assert engine.handles[0].cancel_calls == 1


def test_engine_giving_up_is_503_with_its_reason(client, server):
    """The engine's reason (e.g. the last worker error) reaches the client, not a bare 500."""
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="UNAVAILABLE", stream=stream)
        assert e.value.status_code == 503 and e.value.code == "request_failed"
        assert "PoolFull: no free slice" in e.value.message


def test_engine_timeout_is_504(client, engine):
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="STALL")
    assert e.value.status_code == 504
    assert e.value.code == "timeout"
    assert engine.handles[0].timeout_seen == 30
    assert engine.handles[0].cancel_calls == 1


def test_engine_without_finish_reason(client, engine):
    out = client.completions.create(model=MODEL, prompt="NOFINISH")
    assert (out.choices[0].text, out.choices[0].finish_reason) == ("ab", "stop")
    chunks = list(client.completions.create(model=MODEL, prompt="NOFINISH", stream=True))
    assert [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks] == [
        ("a", None),
        ("b", None),
        ("", "stop"),
    ]
    assert [h.cancel_calls for h in engine.handles] == [0, 0]


# --- side routes --------------------------------------------------------------------------------


def test_health(server, engine):
    status, headers, body = http(server, "GET", "/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"ok": True, "workers": 2}
    engine.healthy = False
    status, _, body = http(server, "GET", "/health")
    assert status == 503
    assert json.loads(body) == {"ok": False, "workers": 2}


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="a.", max_tokens=2)
    status, headers, body = http(server, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "fake_requests_total 3\n" in text
    assert 'thunderkv_http_requests_total{route="/v1/completions",code="200"} 1' in text
    assert "thunderkv_http_inflight_requests 0" in text


def test_admin_routes(server, engine):
    status, _, body = http(server, "GET", "/admin/workers")
    assert status == 200
    assert json.loads(body) == engine.workers()
    status, _, body = http(server, "GET", "/admin/routing")
    assert status == 200 and json.loads(body) == {"routing": engine.routing()}
    status, _, body = post_json(server, "/admin/reschedule", {"fail": ["gpu1"]})
    assert status == 200
    assert json.loads(body) == {"accepted": True, "body": {"fail": ["gpu1"]}}
    assert engine.reschedules == [{"fail": ["gpu1"]}]
    status, _, body = post_json(server, "/admin/reschedule", {"bad": 1})
    assert status == 400
    assert assert_error_shape(body, type_="invalid_request_error", param="bad")
    status, _, body = post_json(server, "/admin/reschedule", ["not", "an", "object"])
    assert status == 400


# --- disconnects, concurrency, shutdown ---------------------------------------------------------


def test_disconnect_mid_stream_cancels(client, engine):
    stream = client.completions.create(model=MODEL, prompt="FOREVER", max_tokens=64, stream=True)
    it = iter(stream)
    assert next(it).choices[0].text == "x"
    assert next(it).choices[0].text == "x"
    stream.close()
    handle = engine.wait_handle()
    assert handle.cancelled.wait(5), "closing the stream did not cancel the request"
    time.sleep(0.1)
    assert handle.cancel_calls == 1


def test_disconnect_while_waiting_cancels(server, engine):
    """A non-streamed request whose client gives up is cancelled too (no write needed)."""
    body = json.dumps({"model": MODEL, "prompt": "FOREVER", "max_tokens": 64}).encode()
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    handle = engine.wait_handle()
    sock.close()
    assert handle.cancelled.wait(5), "the client's disconnect did not cancel the request"


def test_concurrent_streams(client, engine):
    n = 8
    engine.barrier = threading.Barrier(n)  # every generation waits until all 8 are in flight
    engine.delay = 0.002

    def run(i: int) -> tuple[str, str | None]:
        prompt = f"request {i} says hi. ignored"
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, stream=True)
        chunks = list(stream)
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(run, range(n)))
    assert results == [(f"request {i} says hi.", "stop") for i in range(n)]
    assert len(engine.handles) == n
    assert all(h.cancel_calls == 0 for h in engine.handles)


def test_keep_alive_reuses_connection(server):
    """Two requests on one HTTP/1.1 connection (Content-Length framing, no close)."""
    import http.client

    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    for _ in range(2):
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["ok"] is True
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "ab", "max_tokens": 2}),
                 headers=JSON)
    resp = conn.getresponse()
    assert json.loads(resp.read())["choices"][0]["text"] == "ab"
    conn.close()


def test_close_cancels_inflight(engine):
    server = ApiServer(engine).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=10)
    stream = client.completions.create(model=MODEL, prompt="FOREVER", max_tokens=64, stream=True)
    next(iter(stream))
    server.close()
    assert engine.wait_handle().cancelled.wait(5)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    client.close()


def test_default_bind_is_loopback(engine):
    with ApiServer(engine) as server:
        assert server.host == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}"


# --- request parsing without HTTP ---------------------------------------------------------------


def parse(body: dict) -> CompletionRequest:
    return CompletionRequest.from_json(body, max_prompt_chars=10, max_tokens_limit=100)


def test_from_json_defaults_and_normalisation():
    r = parse({"prompt": "hi"})
    assert (r.prompt, r.max_tokens, r.temperature, r.top_p, r.seed, r.stream, r.stop) == (
        "hi",
        16,
        1.0,
        1.0,
        None,
        False,
        None,
    )
    assert r.request_id.startswith("cmpl-") and r.request_id != parse({"prompt": "hi"}).request_id
    nulls = {"max_tokens": None, "temperature": None, "top_p": None, "n": None, "stream": None}
    assert parse({"prompt": "hi", **nulls}).max_tokens == 16
    assert parse({"prompt": [[1, 2]]}).prompt == [1, 2]
    assert parse({"prompt": ["abc"]}).prompt == "abc"
    assert parse({"prompt": "a", "stop": ["x", "y"]}).stop == ["x", "y"]
    neutral = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0}
    assert parse({"prompt": "a", **neutral}).prompt == "a"  # "feature off" values are accepted


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": "x" * 11}, "prompt"),
        ({"prompt": list(range(11))}, "prompt"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 2.0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 101}, "max_tokens"),
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "seed": "1"}, "seed"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "stop": 3}, "stop"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),  # OpenAI's limit: 4
        ({"prompt": "a", "stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
        ({"prompt": "a", "stop": ["ok", "y" * 1_000_000]}, "stop"),
        ({"prompt": "a", "stop": ["\udc80"]}, "stop"),
        ({"prompt": "a\ud800b"}, "prompt"),  # a lone surrogate: no UTF-8 text, no tokens
        ({"prompt": ["\udfff"]}, "prompt"),
        ({"prompt": "a", "model": 3}, "model"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_from_json_rejects(body, param):
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.param == param
    assert e.value.status == 400


def test_stop_strings_up_to_the_limits_are_accepted():
    stops = ["s" * MAX_STOP_CHARS] * MAX_STOP_SEQUENCES
    assert parse({"prompt": "a", "stop": stops}).stop == stops
    assert parse({"prompt": "a", "stop": "\u00e9\U0001F600"}).stop == ["\u00e9\U0001F600"]


def test_from_json_rejects_non_object():
    with pytest.raises(RequestError):
        CompletionRequest.from_json([], max_prompt_chars=10, max_tokens_limit=10)  # type: ignore


def test_stop_strings_cut_the_completion_and_stop_generating(client, engine):
    """'stop' ends the text before the first stop string, also across tokens and when
    streaming, and cancels the rest of the generation."""
    out = client.completions.create(model=MODEL, prompt="abcdefgh", max_tokens=32, stop=["de"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == ("abc", "stop")
    # a normal completion for the engine (counted as completed), not a client's cancel
    assert (engine.handles[-1].stop_calls, engine.handles[-1].cancel_calls) == (1, 0)
    chunks = list(client.completions.create(model=MODEL, prompt="xyzxyq", max_tokens=32,
                                            stop=["yq", "zz"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "xyzx"
    assert (engine.handles[-1].stop_calls, engine.handles[-1].cancel_calls) == (1, 0)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    # a held-back prefix that never completes is returned at the end
    out = client.completions.create(model=MODEL, prompt="abcd", max_tokens=32, stop=["dz"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == ("abcd", "stop")
    chunks = list(client.completions.create(model=MODEL, prompt="abcd", max_tokens=3,
                                            stop=["cz"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "abc"
    assert chunks[-1].choices[0].finish_reason == "length"


# --- cross-site requests ------------------------------------------------------------------------


def raw_request(server, method: str, path: str, headers: dict, body: bytes = b"") -> tuple:
    """(status, body) of a request carrying exactly ``headers`` (no Host unless given)."""
    import http.client as httpclient

    conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


RESCHEDULE = json.dumps({"roles": {"0": "decode"}}).encode()
COMPLETION = json.dumps({"prompt": "hi.", "max_tokens": 4}).encode()


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_post_needs_a_json_content_type(server, engine, ctype):
    """What a cross-site HTML form or "simple" fetch can send is refused (415)."""
    headers = {"Host": f"127.0.0.1:{server.port}"} | ({"Content-Type": ctype} if ctype else {})
    for path, body in (("/admin/reschedule", RESCHEDULE), ("/v1/completions", COMPLETION)):
        status, raw = raw_request(server, "POST", path, headers, body)
        assert status == 415, (path, status, raw)
        err = assert_error_shape(raw, type_="invalid_request_error")
        assert "application/json" in err["message"]
    assert engine.reschedules == [] and engine.handles == []
    headers["Content-Type"] = "Application/JSON; charset=utf-8"
    assert raw_request(server, "POST", "/admin/reschedule", headers, RESCHEDULE)[0] == 200


def test_requests_from_other_origins_are_refused(server, engine):
    port = server.port
    json_headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
    for origin in ("http://evil.example", "null", f"http://evil.example:{port}",
                   f"http://localhost:{port % 65535 + 1}", f"file://localhost:{port}"):
        headers = json_headers | {"Origin": origin}
        status, raw = raw_request(server, "POST", "/admin/reschedule", headers, RESCHEDULE)
        assert status == 403, origin
        assert_error_shape(raw, type_="invalid_request_error")
        assert raw_request(server, "GET", "/admin/workers", headers)[0] == 403
    assert engine.reschedules == []
    for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}",
                   f"http://[::1]:{port}"):
        headers = json_headers | {"Origin": origin}
        assert raw_request(server, "POST", "/v1/completions", headers, COMPLETION)[0] == 200


def test_foreign_host_names_are_refused_on_a_loopback_bind(server):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1."""
    port = server.port
    for host in (f"evil.example:{port}", "evil.example", f"10.0.0.1:{port}"):
        status, raw = raw_request(server, "GET", "/health", {"Host": host})
        assert status == 403, host
        assert "Host" in json.loads(raw)["error"]["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert raw_request(server, "GET", "/health", {"Host": host})[0] == 200, host
    assert raw_request(server, "GET", "/health", {})[0] == 200  # HTTP/1.0 style: no Host


def test_a_non_loopback_bind_accepts_other_host_names(engine):
    with ApiServer(engine, "0.0.0.0") as server:
        assert raw_request(server, "GET", "/health", {"Host": f"gpu-box:{server.port}"})[0] == 200
        headers = {"Host": f"gpu-box:{server.port}", "Origin": "http://evil.example"}
        assert raw_request(server, "GET", "/health", headers)[0] == 403


# --- regressions of the serving review ----------------------------------------------------------


def test_unencodable_prompt_and_huge_stop_strings_are_400(server, engine):
    """A lone surrogate used to reach the tokenizer (500 and a traceback); a 1 MB stop string
    used to cost ~11 s of CPU per generated token."""
    body = b'{"prompt": "a\\ud800b", "max_tokens": 2}'  # valid JSON, not valid Unicode
    status, _, raw = http(server, "POST", "/v1/completions", body, JSON)
    err = assert_error_shape(raw, type_="invalid_request_error", param="prompt")
    assert status == 400 and "surrogate" in err["message"]
    status, _, raw = post_json(server, "/v1/completions",
                               {"prompt": "hi", "max_tokens": 8, "stop": ["x" * 200_000]})
    err = assert_error_shape(raw, type_="invalid_request_error", param="stop")
    assert status == 400 and f"at most {MAX_STOP_CHARS}" in err["message"]
    assert engine.handles == []


def test_shutdown_gives_an_in_flight_request_503_not_a_cut_off_success(server, engine):
    """Closing the server (SIGTERM, Ctrl-C) used to answer 200 with the text so far and
    finish_reason "cancelled"."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post_json, server, "/v1/completions",
                             {"prompt": "FOREVER", "max_tokens": 64})
        handle = engine.wait_handle()
        time.sleep(0.05)  # some tokens out
        server.close()
        status, _, raw = answer.result(timeout=10)
    err = assert_error_shape(raw, type_="server_error")
    assert (status, err["message"], err["code"]) == (503, "server shutting down",
                                                     "server_shutting_down")
    assert handle.cancel_calls == 1 and handle.stop_calls == 0


def test_shutdown_ends_a_stream_with_an_in_band_error(server, engine):
    """As any mid-stream failure: an error event, no "cancelled" chunk passed off as a finish."""
    body = json.dumps({"prompt": "FOREVER", "max_tokens": 64, "stream": True}).encode()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(http, server, "POST", "/v1/completions", body, JSON)
        engine.wait_handle()
        time.sleep(0.05)
        server.close()
        status, _, raw = answer.result(timeout=10)
    assert status == 200  # the status line went out with the first token
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    *chunks, last = payloads
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert last == {"error": {"message": "server shutting down", "type": "server_error",
                              "param": None, "code": "server_shutting_down"}}


def test_while_the_engine_starts_everything_answers_503_at_once(engine):
    """The port is bound (and served) before the workers have loaded the model: a liveness
    probe gets an answer instead of hanging until they are ready."""
    with ApiServer(None, max_prompt_chars=1000, max_tokens_limit=64) as server:
        status, _, raw = http(server, "GET", "/health")
        assert (status, json.loads(raw)) == (503, {"ok": False, "status": "starting"})
        status, _, raw = post_json(server, "/v1/completions", {"prompt": "hi.", "max_tokens": 2})
        err = assert_error_shape(raw, type_="server_error")
        assert (status, err["code"]) == (503, "server_starting")
        assert http(server, "GET", "/v1/models")[0] == 503
        assert http(server, "GET", "/v1/completions")[0] == 405  # routing errors as usual
        server.engine = engine  # the workers are ready
        assert http(server, "GET", "/health")[0] == 200
        status, _, raw = post_json(server, "/v1/completions", {"prompt": "hi.", "max_tokens": 4})
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == "hi."


def test_non_finite_numbers_never_go_out_as_invalid_json(server, engine):
    """/admin/routing used to answer 200 with `Infinity` in the body."""
    engine.routing = lambda: [{"prefill": 0, "decode": 1, "req_per_s": float("inf")}]

    def strict(text):
        raise ValueError(f"not JSON: {text}")

    status, _, raw = http(server, "GET", "/admin/routing")
    err = json.loads(raw, parse_constant=strict)["error"]
    assert (status, err["type"], err["message"]) == (500, "server_error", "internal server error")


# --- chat completions ---------------------------------------------------------------------------


def chatml(*turns: tuple[str, str]) -> str:
    """The ChatML prompt the server renders for a model without a chat template."""
    body = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)
    return body + "<|im_start|>assistant\n"


def test_chat_completion(client, engine):
    """/v1/chat/completions used to be a 404: the served SmolLM2 is an instruct model, and
    most OpenAI clients only speak chat. The fake engine echoes the rendered prompt."""
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Be brief"},
                               {"role": "user", "content": "hi. there"}])
    prompt = chatml(("system", "Be brief"), ("user", "hi. there"))
    req = engine.handles[0].request
    assert (req.prompt, req.max_tokens, req.stream) == (prompt, 64, False)  # 64: the limit
    assert out.object == "chat.completion" and out.model == MODEL
    assert out.id.startswith("chatcmpl-") and out.id == req.request_id
    (choice,) = out.choices
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "stop")
    assert choice.message.content == prompt[: prompt.index(".") + 1]
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.total_tokens == len(prompt) + out.usage.completion_tokens


def test_chat_streaming_with_usage_and_limits(client, engine):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}],
        max_completion_tokens=20, stream=True, stream_options={"include_usage": True})
    first, *chunks, last = list(stream)
    assert engine.handles[0].request.prompt == chatml(("user", "a\nb"))
    assert first.object == "chat.completion.chunk" and first.id.startswith("chatcmpl-")
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chatml(
        ("user", "a\nb"))[:20]
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "length"]
    assert all(c.usage is None for c in [first, *chunks])
    assert last.choices == [] and last.usage.completion_tokens == 20
    out = client.chat.completions.create(model=MODEL, max_tokens=3, stop=["|i"], messages=[
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None}])
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == ("<", "stop")
    assert engine.handles[1].request.prompt == chatml(("user", "x"), ("assistant", ""))


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]},
         "messages[0].role"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": "a\udc80"}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
         "messages[0].tool_calls"),
        ({"messages": [{"role": "user", "content": "x" * 1001}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
         "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
         "tools"),
        ({"messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {}},
         "stream_options"),
    ],
)
def test_chat_bad_requests_are_400(server, engine, body, param):
    status, _, raw = post_json(server, "/v1/chat/completions", body)
    assert status == 400, raw
    assert_error_shape(raw, type_="invalid_request_error", param=param)
    assert engine.handles == []


def test_chat_feature_off_values_and_other_models(client, server, engine):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "ok."}], n=1, logprobs=False,
        tool_choice="none", response_format={"type": "text"}, presence_penalty=0, user="me")
    assert out.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    assert http(server, "GET", "/v1/chat/completions")[0] == 405
    assert len(engine.handles) == 1


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"prompt": "hi", "max_token": 5}, "max_token"),
    ("/v1/completions", {"prompt": "hi", "top_k": 1}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "temprature": 0}, "temprature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt": "x"},
     "prompt"),
])
def test_an_unknown_field_is_a_400_naming_it(server, engine, path, body, field):
    """A misspelt 'max_token' used to be ignored and the default 16 tokens served, and another
    server's 'top_k' silently did nothing; OpenAI answers such requests with 400."""
    status, _, raw = post_json(server, path, body)
    assert status == 400, raw
    assert_error_shape(raw, type_="invalid_request_error", param=field)
    assert f"unrecognized request argument supplied: {field}" in json.loads(raw)["error"]["message"]
    assert engine.handles == []


def test_fields_that_change_nothing_are_accepted(client, engine):
    """End-user ids, metadata and storage hints (sent by many clients) are not errors."""
    client.completions.create(model=MODEL, prompt="ok.", user="me")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok."}],
                                   user="me", metadata={"k": "v"}, store=False,
                                   parallel_tool_calls=False)
    assert len(engine.handles) == 2


def test_top_p_zero_is_accepted_as_openai_does(client, engine):
    """top_p 0 is valid in OpenAI's API (clients send it for determinism); it was a 400."""
    client.completions.create(model=MODEL, prompt="ok.", top_p=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok."}],
                                   top_p=0)
    assert [h.request.top_p for h in engine.handles] == [0.0, 0.0]
