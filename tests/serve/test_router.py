"""The router's bookkeeping (serve/engine.py) with stand-in workers: the test plays the worker
processes' part, feeding events and reading what the router sent them. No model, no UCX."""

from __future__ import annotations

import threading
import time

import pytest
from thunderkv.serve import protocol as P
from thunderkv.serve.api_types import CompletionRequest, RequestError
from thunderkv.serve.engine import Engine, ServeConfig, WorkerState


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, msg: dict) -> None:
        self.sent.append(msg)

    def ops(self, op: str, rid: str | None = None) -> list[dict]:
        return [m for m in self.sent if m["op"] == op and rid in (None, m.get("rid"))]


class FakeProcess:
    def join(self, timeout=None) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:
        pass


class RouterOnly(Engine):
    """The router without processes: workers are FakeConns, ready at once."""

    def _spawn(self, worker_id: int, role: str) -> None:
        self.procs.append(WorkerState(worker_id, role, FakeProcess(), FakeConn()))

    def _wait_ready(self) -> None:
        for w in self.procs:
            self._on_event(w, {"ev": P.READY, "pid": 100 + w.id, "host": "127.0.0.1",
                               "port": 9000 + w.id, "load_s": 0.0, "max_positions": 4096})

    def event(self, sender: int, **msg) -> None:
        self._on_event(self.procs[sender], msg)

    def conn(self, worker: int) -> FakeConn:
        return self.procs[worker].conn

    def complete(self, handle, attempt: int, prefill: int = 0, decode: int = 1) -> None:
        """The workers' side of a request that goes well: prefill, KV arrived, one token."""
        rid = handle.request_id
        self.event(prefill, ev=P.PREFILLED, rid=rid, attempt=attempt, worker=prefill,
                   first_token=65, seconds=0.01, tokens=3)
        self.event(decode, ev=P.DECODING, rid=rid, attempt=attempt, worker=decode)
        self.event(decode, ev=P.TOKENS, worker=decode, items=[(rid, attempt, 66, "length")],
                   batch=1, seconds=0.01)


def request() -> CompletionRequest:
    return CompletionRequest(prompt=[1, 2, 3], max_tokens=2, temperature=0)


@pytest.fixture
def engine():
    with RouterOnly(ServeConfig(model="tiny", prefill=1, decode=1)) as engine:
        yield engine


def queues(engine: Engine) -> list[tuple[int, int]]:
    return [(w["outstanding_prefills"], w["decoding"]) for w in engine.workers()]


def test_queue_lengths_return_to_zero_after_cancels_and_restarts(engine):
    cancelled, restarted = engine.submit(request()), engine.submit(request())
    assert queues(engine) == [(2, 0), (0, 2)]
    cancelled.cancel()
    engine.event(0, ev=P.PREFILLED, rid=cancelled.request_id, attempt=1, worker=0,
                 first_token=65, seconds=0.01, tokens=3)  # the prefill finished anyway
    rid = restarted.request_id
    engine.event(0, ev=P.ERROR, rid=rid, attempt=1, where="transfer",
                 message="TransferError: peer closed the connection")
    engine.event(0, ev=P.PREFILLED, rid=rid, attempt=1, worker=0, first_token=65,
                 seconds=0.01, tokens=3)  # the superseded attempt reports late
    assert queues(engine) == [(1, 0), (0, 1)]  # only the restart is outstanding
    engine.complete(restarted, attempt=2)
    assert restarted.text(timeout=1) == "AB"
    assert queues(engine) == [(0, 0), (0, 0)]
    assert 'thunderkv_queue_length{worker="0",kind="prefill"} 0' in engine.metrics_text()


def test_cancel_and_restart_tell_the_decode_worker_which_kv_to_discard(engine):
    h = engine.submit(request())
    kv_id = engine.conn(0).ops(P.PREFILL, h.request_id)[-1]["kv_id"]
    h.cancel()
    assert engine.conn(1).ops(P.CANCEL) == [
        {"op": P.CANCEL, "rid": h.request_id, "attempt": 1, "kv_id": kv_id}]
    assert engine.conn(0).ops(P.CANCEL) == [
        {"op": P.CANCEL, "rid": h.request_id, "attempt": 1}]  # stop computing and sending

    # a restart cancels the superseded attempt on its workers before starting the next one
    h = engine.submit(request())
    old = engine.conn(0).ops(P.PREFILL, h.request_id)[-1]["kv_id"]
    engine.event(1, ev=P.ERROR, rid=h.request_id, attempt=1, where="decode",
                 message="TransferTimeout: KV never arrived within 60 s")
    assert engine.conn(1).ops(P.CANCEL, h.request_id) == [
        {"op": P.CANCEL, "rid": h.request_id, "attempt": 1, "kv_id": old}]
    new = engine.conn(0).ops(P.PREFILL, h.request_id)
    assert [m["attempt"] for m in new] == [1, 2] and new[-1]["kv_id"] != old


def test_a_request_that_keeps_failing_says_why_and_health_turns_degraded(engine):
    assert engine.health()["ok"]
    reason = "PoolFull: receiver refused request 9: no free 7680-byte slice in the pool"
    for n in range(3):
        h = engine.submit(request())
        for attempt in range(1, 6):
            engine.event(0, ev=P.ERROR, rid=h.request_id, attempt=attempt, where="transfer",
                         message=reason)
        with pytest.raises(RequestError) as e:
            h.text(timeout=1)
        assert e.value.status == 503
        assert "failed 5 times" in e.value.message and reason in e.value.message
        health = engine.health()
        assert health["recent_failures"] == n + 1
        assert health["ok"] is (n < 2)  # degraded from the third failure in a row
    assert health["status"] == "degraded" and reason in health["last_error"]
    assert queues(engine) == [(0, 0), (0, 0)]
    h = engine.submit(request())  # one request that goes through: healthy again
    engine.complete(h, attempt=1)
    assert h.text(timeout=1) == "AB"
    assert engine.health()["ok"] and engine.health()["recent_failures"] == 3


def test_no_live_worker_is_a_503_with_the_reason(engine):
    engine.procs[1].state = "dead"
    with pytest.raises(RequestError, match="no live decode worker") as e:
        engine.submit(request()).text(timeout=1)
    assert e.value.status == 503


# --- regressions of the serving review ----------------------------------------------------------


def stream_tokens(engine: RouterOnly, handle, tokens: list[int]) -> None:
    """Prefill done, KV arrived, and ``tokens`` decoded (no finish yet)."""
    rid = handle.request_id
    engine.event(0, ev=P.PREFILLED, rid=rid, attempt=1, worker=0, first_token=65,
                 seconds=0.01, tokens=3)
    engine.event(1, ev=P.DECODING, rid=rid, attempt=1, worker=1)
    for t in tokens:
        time.sleep(0.002)  # a measurable time per output token
        engine.event(1, ev=P.TOKENS, worker=1, items=[(rid, 1, t, None)], batch=1, seconds=0.01)


def metric(engine: Engine, name: str) -> float:
    line = next(x for x in engine.metrics_text().splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_a_stop_string_match_counts_as_completed_not_cancelled(engine):
    """The HTTP layer ends a request whose stop string matched with handle.stop(): completed
    (with its TPOT and health outcome), where cancel() (a client leaving) stays cancelled."""
    stopped, left = engine.submit(request()), engine.submit(request())
    stream_tokens(engine, stopped, [66, 67])
    stopped.stop()
    assert [e.finish_reason for e in stopped.events(timeout=1)][-1] == "stop"
    left.cancel()
    assert metric(engine, "thunderkv_requests_completed_total") == 1
    assert metric(engine, "thunderkv_requests_cancelled_total") == 1
    assert metric(engine, "thunderkv_tpot_seconds_count") == 1
    assert metric(engine, "thunderkv_tpot_seconds_sum") > 0
    health = engine.health()
    assert (health["recent_requests"], health["recent_failures"], health["in_flight"]) == (1, 0, 0)
    assert queues(engine) == [(0, 0), (0, 0)]
    assert engine.conn(1).ops(P.CANCEL, stopped.request_id)  # and the workers dropped it


@pytest.mark.parametrize("key", ["-1", "-2", "2", "x", "1.0", " 1", "+1", "\u0661"])
def test_reschedule_refuses_worker_ids_that_do_not_exist(engine, key):
    """"-1" used to index the worker list from its end and change worker 1."""
    with pytest.raises(RequestError) as e:
        engine.reschedule({"roles": {key: "colocated"}})
    assert (e.value.status, e.value.param, e.value.message) == (400, "roles", f"no worker {key!r}")
    assert [w["role"] for w in engine.workers()] == ["prefill", "decode"]
    assert engine.conn(0).ops(P.SET_ROLE) == engine.conn(1).ops(P.SET_ROLE) == []


@pytest.mark.parametrize("rate", ["inf", float("inf"), float("nan"), -1.0, "-inf"])
def test_reschedule_refuses_non_finite_or_negative_rates(engine, rate):
    """An infinite rate used to be accepted and make GET /admin/routing emit `Infinity`."""
    with pytest.raises(RequestError, match="finite number >= 0|negative") as e:
        engine.reschedule({"roles": {"0": "prefill"}, "routing": [
            {"prefill": 0, "decode": 1, "req_per_s": rate}]})
    assert (e.value.status, e.value.param) == (400, "routing")
    assert engine.routing() is None


def test_prompt_problems_found_by_the_engine_are_client_errors(engine):
    with pytest.raises(RequestError) as e:  # over the model's positions: OpenAI's code for it
        engine.submit(CompletionRequest(prompt=[1] * 4000, max_tokens=200))
    assert (e.value.status, e.value.param, e.value.code) == (400, "prompt",
                                                             "context_length_exceeded")
    with pytest.raises(RequestError) as e:  # used to be a UnicodeEncodeError (500)
        engine.submit(CompletionRequest(prompt="a\ud800b", max_tokens=2))
    assert (e.value.status, e.value.param) == (400, "prompt") and "surrogate" in e.value.message


class PipeStub:
    """A worker's pipe as the router's listener reads it: the messages given, then EOF once the
    worker is gone (``closed``); until then it blocks, as a loading worker's pipe does."""

    def __init__(self, messages=()) -> None:
        self.messages = list(messages)
        self.closed = threading.Event()

    def recv(self) -> dict:
        if self.messages:
            return self.messages.pop(0)
        self.closed.wait(30)
        raise EOFError

    def send(self, msg: dict) -> None:
        pass


class LoadingProcess(FakeProcess):
    def __init__(self, conn: PipeStub, exitcode: int | None) -> None:
        self.conn, self.exitcode = conn, exitcode

    def kill(self) -> None:
        self.conn.closed.set()


class LoadingRouter(Engine):
    """The router with real listener threads over stub pipes: ``fates[i]`` is what worker i
    does while loading: "loads" (never finishes), ("dies", exitcode) or ("fails", message)."""

    fates: list = []

    def _spawn(self, worker_id: int, role: str) -> None:
        fate = self.fates[worker_id]
        conn = PipeStub()
        if fate != "loads":
            conn.closed.set()  # the pipe closes: the process is gone
        if fate[0] == "fails":  # it reports why, then exits
            conn.messages.append({"ev": P.FAILED, "worker": worker_id, "message": fate[1]})
        w = WorkerState(worker_id, role, LoadingProcess(conn, fate[1] if fate[0] == "dies"
                                                        else None), conn)
        self.procs.append(w)
        threading.Thread(target=self._listen, args=(w,), daemon=True).start()


@pytest.mark.parametrize("fates,message", [
    (["loads", ("dies", -9)],
     "worker 1 (decode) died while loading the model (killed by signal SIGKILL)"),
    ([("dies", 1), "loads"], "worker 0 (prefill) died while loading the model (exit code 1)"),
    (["loads", ("fails", "OSError: no space\nleft on device")],
     "worker 1 (decode) failed to start: OSError: no space left on device"),
])
def test_a_worker_lost_while_loading_ends_startup_at_once(monkeypatch, fates, message):
    """It used to wait out the whole start timeout (300 s), then say "workers not ready" (and a
    worker that reported its failure and exited at once was taken for dead the same way)."""
    monkeypatch.setattr(LoadingRouter, "fates", fates)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        LoadingRouter(ServeConfig(model="tiny", prefill=1, decode=1, start_timeout=20))
    assert str(e.value) == message
    assert time.monotonic() - t0 < 5
