"""The router's bookkeeping (serve/engine.py) with stand-in workers: the test plays the worker
processes' part, feeding events and reading what the router sent them. No model, no UCX."""

from __future__ import annotations

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
