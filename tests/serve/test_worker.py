"""A worker's KV bookkeeping, driven in-process (tiny model, real KVReceiver / KVSender over
loopback, the router played by the test): cancelled and timed-out requests leave nothing in the
decode worker's receive pool, a cancelled prefill stops sending, and a connection that failed
is replaced instead of failing every later request."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from thunderkv.serve import protocol as P
from thunderkv.serve import worker as W

from thunderkv.transfer import KVReceiver, TransferError, auth, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"UCX transfer unavailable: {unavailable_reason()}")
POOL = 1 << 20
PROMPT = list(range(1, 40))


class FakeConn:
    """The worker's pipe to the router: records what the worker emits."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self._cond = threading.Condition()

    def send(self, msg: dict) -> None:
        with self._cond:
            self.sent.append(msg)
            self._cond.notify_all()

    def wait_for(self, pred, timeout: float = 20.0) -> dict:
        with self._cond:
            assert self._cond.wait_for(lambda: any(pred(m) for m in self.sent), timeout), \
                f"no such event within {timeout} s; got {self.sent}"
            return next(m for m in self.sent if pred(m))

    def events(self, rid: str) -> list[str]:
        with self._cond:
            return [m["ev"] for m in self.sent if m.get("rid") == rid]


def outcome(worker: W.Worker, rid: str) -> dict:
    """The KV_SENT or ERROR the prefill worker reports for ``rid``'s KV."""
    return worker.conn.wait_for(lambda m: m.get("rid") == rid and m["ev"] in (P.KV_SENT, P.ERROR))


def prefill_job(rid: str, kv_id: int, rx: KVReceiver, attempt: int = 1) -> dict:
    return {"op": P.PREFILL, "rid": rid, "attempt": attempt, "kv_id": kv_id,
            "tokens": list(PROMPT), "target": {"worker": 9, "host": rx.host, "port": rx.port},
            "kv_bits": 16, "kv_group": 32, "kv_sink_tokens": 0, "max_tokens": 4,
            "sampling": {"temperature": 0}}


def decode_job(rid: str, kv_id: int, attempt: int = 1) -> dict:
    return {"op": P.DECODE, "rid": rid, "attempt": attempt, "kv_id": kv_id, "first_token": 5,
            "max_tokens": 4, "sampling": {"temperature": 0}}


@pytest.fixture
def token() -> str:
    return auth.new_token()


@pytest.fixture
def make_worker(monkeypatch, token):
    monkeypatch.setattr(W, "RECV_POOL_BYTES", POOL)
    monkeypatch.setattr(W, "SEND_POOL_BYTES", POOL)
    made: list[W.Worker] = []

    def make(role: str) -> W.Worker:
        made.append(W.Worker(FakeConn(), len(made), "tiny", role, 0, token))
        return made[-1]

    yield make
    for w in made:
        w.close()


@pytest.fixture
def receiver(token):
    """A bare decode-side receiver (its own timeout), for the prefill worker to send to."""
    made: list[KVReceiver] = []

    def make(timeout: float = 5.0) -> KVReceiver:
        made.append(KVReceiver(POOL, token=token, timeout=timeout))
        return made[-1]

    yield make
    for rx in made:
        rx.close()


def on_layer(worker: W.Worker, job: dict, layer: int, action) -> list[int]:
    """Calls ``action()`` in ``job``'s prefill right after its layer ``layer`` went through the
    worker's KV sink (other prefills run as usual); returns the layers of ``job`` that did."""
    run, reached = worker.runner.prefill, []

    def prefill(tokens, kv_sink=None):
        if tokens is not job["tokens"]:
            return run(tokens, kv_sink=kv_sink)

        def sink(i, k, v):
            kv_sink(i, k, v)
            reached.append(i)
            if i == layer:
                action()

        return run(tokens, kv_sink=sink)

    worker.runner.prefill = prefill
    return reached


def test_cancel_discards_kv_that_arrived_or_is_yet_to_come(make_worker):
    """A client gone during prefill: the KV arrives, its DECODE never comes; the CANCEL (with
    the KV id) frees it. A CANCEL first: the KV is refused or dropped when it comes."""
    pre, dec = make_worker("prefill"), make_worker("decode")
    full = dec.rx.pool.free_bytes()
    pre.prefill(prefill_job("gone", 11, dec.rx))
    assert outcome(pre, "gone")["ev"] == P.KV_SENT
    assert dec.rx.pool.free_bytes() < full  # delivered, nobody will decode it
    dec.handle({"op": P.CANCEL, "rid": "gone", "attempt": 1, "kv_id": 11})
    assert dec.rx.pool.free_bytes() == full

    dec.handle({"op": P.CANCEL, "rid": "early", "attempt": 1, "kv_id": 12})
    pre.prefill(prefill_job("early", 12, dec.rx))
    outcome(pre, "early")  # refused by the receiver
    assert dec.rx.pool.free_bytes() == full
    pre.prefill(prefill_job("fine", 13, dec.rx))  # the connection still works
    assert outcome(pre, "fine")["ev"] == P.KV_SENT


def test_decode_job_that_gave_up_waiting_discards_kv_arriving_later(make_worker, monkeypatch):
    monkeypatch.setattr(W, "KV_WAIT_S", 0.2)
    pre, dec = make_worker("prefill"), make_worker("decode")
    full = dec.rx.pool.free_bytes()
    dec.handle(decode_job("late", 21))
    deadline = time.monotonic() + 10
    while P.ERROR not in dec.conn.events("late"):
        assert time.monotonic() < deadline, "the decode job never gave up"
        dec.import_arrived_kv()
        time.sleep(0.01)
    assert not dec.waiting
    pre.prefill(prefill_job("late", 21, dec.rx))  # the KV comes after all
    outcome(pre, "late")
    dec.import_arrived_kv()
    assert not dec.running
    assert dec.rx.pool.free_bytes() == full


def test_cancel_drops_a_decode_job_still_waiting_for_its_kv(make_worker):
    pre, dec = make_worker("prefill"), make_worker("decode")
    full = dec.rx.pool.free_bytes()
    dec.handle(decode_job("waiting", 31))
    dec.handle({"op": P.CANCEL, "rid": "waiting", "attempt": 1})  # no KV id: from the job
    assert not dec.waiting
    pre.prefill(prefill_job("waiting", 31, dec.rx))
    outcome(pre, "waiting")
    dec.import_arrived_kv()
    assert not dec.running and P.DECODING not in dec.conn.events("waiting")
    assert dec.rx.pool.free_bytes() == full


def test_cancel_during_prefill_stops_computing_and_sending(make_worker, receiver):
    pre, rx = make_worker("prefill"), receiver()
    full = rx.pool.free_bytes()
    job = prefill_job("cancelled", 41, rx)
    # The CANCEL arrives right after layer 0. (In a running worker a reader thread takes it
    # off the pipe and notes it at once; here the test hands it over in the prefill.)
    cancel = {"op": P.CANCEL, "rid": "cancelled", "attempt": 1}
    reached = on_layer(pre, job, 0, lambda: pre.handle(cancel))
    pre.prefill(job)
    assert reached == [0]  # layers 1 and 2 were never computed
    pre.prefill(prefill_job("next", 42, rx))
    assert outcome(pre, "next")["ev"] == P.KV_SENT  # sent after the cancelled one, in order
    assert pre.conn.events("cancelled") == []  # no PREFILLED, no KV_SENT, no ERROR
    with pytest.raises(TransferError):  # aborted or never begun: nothing was delivered
        rx.wait(41, timeout=0)
    rx.wait(42, timeout=5).release()
    assert rx.pool.free_bytes() == full
    assert pre._send_pool.free_bytes() == POOL  # the send slices came back too


def test_a_stall_past_the_receivers_timeout_breaks_one_request_only(make_worker, receiver,
                                                                    monkeypatch):
    """kill -STOP / -CONT of a prefill worker for longer than the decode side's timeout: that
    request fails, the next ones go over a new connection."""
    monkeypatch.setattr(W, "KEEP_ALIVE_S", 10.0)  # a stopped process keeps nothing alive
    pre, rx = make_worker("prefill"), receiver(timeout=0.5)
    job = prefill_job("stalled", 51, rx)
    on_layer(pre, job, 0, lambda: time.sleep(1.5))  # the stall itself, not a synchronisation
    pre.prefill(job)
    assert outcome(pre, "stalled")["ev"] == P.ERROR
    for i, rid in enumerate(["after", "after-2"]):
        pre.prefill(prefill_job(rid, 52 + i, rx))
        assert outcome(pre, rid)["ev"] == P.KV_SENT, pre.conn.sent
        rx.wait(52 + i, timeout=5).release()
    assert rx.pool.free_bytes() == POOL


def test_a_slow_prefill_layer_keeps_its_kv_stream_alive(make_worker, receiver, monkeypatch):
    """A layer that takes longer than the decode side's timeout to compute (a long prompt on
    a busy GPU) does not fail the request: the sender thread sends keep-alives meanwhile."""
    monkeypatch.setattr(W, "KEEP_ALIVE_S", 0.1)
    pre, rx = make_worker("prefill"), receiver(timeout=0.5)
    job = prefill_job("slow", 71, rx)
    on_layer(pre, job, 0, lambda: time.sleep(1.5))
    pre.prefill(job)
    assert outcome(pre, "slow")["ev"] == P.KV_SENT, pre.conn.sent
    rx.wait(71, timeout=5).release()
    assert rx.pool.free_bytes() == POOL


def test_a_connection_the_receiver_dropped_while_idle_is_replaced(make_worker, receiver):
    pre, rx = make_worker("prefill"), receiver()
    pre.prefill(prefill_job("first", 61, rx))
    assert outcome(pre, "first")["ev"] == P.KV_SENT
    rx.wait(61, timeout=5).release()
    # an idle connection is kept however long it idles; it can still go (a receiver restarted
    # behind a proxy, a network reset): cut it from the receiver's side
    for conn in list(rx._connections):
        conn.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + 10
    while rx._connections:
        assert time.monotonic() < deadline, "the receiver kept the cut connection"
        time.sleep(0.02)
    pre.prefill(prefill_job("second", 62, rx))
    assert outcome(pre, "second")["ev"] == P.KV_SENT, pre.conn.sent
    rx.wait(62, timeout=5).release()
