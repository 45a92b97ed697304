"""A model worker process: prefill, decode or both, as the router says, switchable live.

Every worker loads the model once and owns a :class:`~thunderkv.transfer.KVReceiver` (so it
can become a decode worker without restarting) and, lazily, one
:class:`~thunderkv.transfer.KVSender` per decode peer. The router talks to it over a
``multiprocessing`` pipe (messages in :mod:`thunderkv.serve.protocol`).

Prefill streams the KV layer by layer: the runner hands each layer's K/V to a sink the moment
it exists; the sink quantizes it (``--kv-bits 4``) or copies it (16) straight into a slice of
the registered send buffer, and a sender thread PUTs finished layers while the model computes
the next ones. Decode imports received KV (dequantizing 4-bit straight from the receive pool)
and runs continuous batching: every step decodes all running sequences in one batch, and new
sequences join between steps.

Cancellation (a client left, a stop string matched, or the router restarted the request
elsewhere): a reader thread takes the router's messages as they come, so a CANCEL is seen even
while a prefill computes; the prefill then stops between layers, its KV stream is aborted (or
never started), and a decode worker discards the request's KV in its receive pool
(:meth:`~thunderkv.transfer.KVReceiver.discard`) whether it already arrived, is arriving or
is still to come. A decode job whose KV does not come within ``KV_WAIT_S`` discards it too, so
no KV nobody will decode stays in the pool. A connection to a decode peer that failed (a stall
past the receiver's timeout, the peer dropping an idle connection) is closed and replaced; a
request that finds its connection dead before anything was sent is retried once on a new one.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from . import protocol as P

log = logging.getLogger("thunderkv.serve.worker")
SEND_POOL_BYTES = 256 << 20
RECV_POOL_BYTES = 512 << 20
KV_WAIT_S = 60.0
KEEP_ALIVE_S = 1.0  # a KV stream waiting for its next layer tells the receiver this often
#                     (its timeout is 5 s: a slow prefill layer must not fail the request)
CANCEL_MEMORY = 4096  # cancelled requests remembered (the oldest are forgotten)


class _Cancelled(Exception):
    """The request was cancelled while its prefill or KV transfer was under way."""


@dataclass
class Running:
    """A sequence in the decode batch."""

    rid: str
    attempt: int
    kv: object  # SequenceKV
    last_token: int
    produced: int  # tokens generated so far (including the prefill's first token)
    max_tokens: int
    sampling: dict
    cancelled: bool = False


@dataclass
class WaitingKV:
    """A decode job whose KV is still arriving."""

    job: dict
    since: float = field(default_factory=time.monotonic)


class SendJob:
    """One prefill's KV on its way out: layers are queued as the model produces them. The
    payload is a slice (``piece``) of ``pool``; the sender thread picks the connection to
    ``peer`` when it sends."""

    def __init__(self, job: dict, header, payload, piece, pool, peer: tuple[str, int]) -> None:
        self.job, self.header, self.payload, self.piece, self.pool, self.peer = (
            job, header, payload, piece, pool, peer)
        self.layers: queue.Queue[int | None] = queue.Queue()
        self.started = time.perf_counter()


class Worker:
    def __init__(self, conn, worker_id: int, model: str, role: str, threads: int,
                 token: str, host: str = "127.0.0.1") -> None:
        self.conn, self.id, self.role = conn, worker_id, role
        self._send_lock = threading.Lock()
        if threads:
            torch.set_num_threads(threads)
        from thunderkv.transfer import KVReceiver

        from .runner import ModelRunner

        t0 = time.perf_counter()
        self.runner = ModelRunner.load(model)
        self.load_s = time.perf_counter() - t0
        self.token = token
        self.rx = KVReceiver(RECV_POOL_BYTES, host=host, token=token, timeout=5.0)
        # one connection per decode peer, replaced when it breaks; the send pool is registered
        # with the connection that first needed it (self._pool_owner)
        self._senders: dict[tuple[str, int], object] = {}
        self._senders_lock = threading.Lock()
        self._send_pool = None
        self._pool_owner = None
        self._cancelled: OrderedDict[str, int] = OrderedDict()  # rid -> last cancelled attempt
        self._cancel_lock = threading.Lock()
        self._inbox: queue.Queue[dict] = queue.Queue()
        self.prefills: deque[dict] = deque()
        self.waiting: deque[WaitingKV] = deque()
        self.running: dict[str, Running] = {}
        self._send_jobs: queue.Queue[SendJob | None] = queue.Queue()
        self._sender_thread = threading.Thread(target=self._send_loop, name="tkv-kv-send",
                                               daemon=True)
        self._sender_thread.start()

    # ------------------------------------------------------------------ plumbing
    def emit(self, msg: dict) -> None:
        with self._send_lock:
            try:
                self.conn.send(msg)
            except OSError as exc:  # the router is gone: stop (quietly; it owns the output)
                log.debug("router gone (%s); stopping", exc)
                self._inbox.put({"op": P.STOP})

    def run(self) -> None:
        self.emit({"ev": P.READY, "worker": self.id, "pid": os.getpid(), "host": self.rx.host,
                   "port": self.rx.port, "load_s": self.load_s, "role": self.role,
                   "layers": self.runner.num_layers,
                   "max_positions": self.runner.max_positions})
        threading.Thread(target=self._read_loop, name="tkv-router-read", daemon=True).start()
        while True:
            if self.prefills or self.running:
                wait = 0.0
            else:  # idle, or only KV on its way: poll for it without spinning a core
                wait = 0.001 if self.waiting else 0.05
            try:
                msg = self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
            except queue.Empty:
                msg = None
            if msg is not None:
                if msg["op"] == P.STOP:
                    return
                self.handle(msg)
                continue  # drain every pending message before computing
            if self.prefills:
                self.prefill(self.prefills.popleft())
            self.import_arrived_kv()
            if self.running:
                self.decode_step()

    def _read_loop(self) -> None:
        """The router's messages into the inbox as they arrive; a CANCEL takes effect at once
        (a prefill or KV transfer under way checks for it between layers)."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = {"op": P.STOP}  # the router is gone
            except Exception:
                log.exception("unreadable message from the router")
                msg = {"op": P.STOP}
            if msg.get("op") == P.CANCEL:
                self._note_cancel(msg["rid"], msg["attempt"])
            self._inbox.put(msg)
            if msg.get("op") == P.STOP:
                return

    def _note_cancel(self, rid: str, attempt: int) -> None:
        with self._cancel_lock:
            if self._cancelled.get(rid, 0) < attempt:
                self._cancelled[rid] = attempt
            self._cancelled.move_to_end(rid)
            while len(self._cancelled) > CANCEL_MEMORY:
                self._cancelled.popitem(last=False)

    def _is_cancelled(self, job: dict) -> bool:
        """Whether ``job``'s attempt (or a later one) of its request was cancelled."""
        with self._cancel_lock:
            return self._cancelled.get(job["rid"], 0) >= job["attempt"]

    def handle(self, msg: dict) -> None:
        op = msg["op"]
        if op == P.PREFILL:
            if not self._is_cancelled(msg):
                self.prefills.append(msg)
        elif op == P.DECODE:
            if self._is_cancelled(msg):
                self.rx.discard(msg["kv_id"])
            else:
                self.waiting.append(WaitingKV(msg))
        elif op == P.CANCEL:
            self.cancel(msg["rid"], msg["attempt"], msg.get("kv_id"))
        elif op == P.SET_ROLE:
            t0 = time.perf_counter()
            self.role = msg["role"]
            self.emit({"ev": P.ROLE, "worker": self.id, "role": self.role,
                       "seconds": time.perf_counter() - t0})
        else:
            log.error("unknown op %r", op)

    def cancel(self, rid: str, attempt: int, kv_id: int | None = None) -> None:
        """Drop attempts up to ``attempt`` of request ``rid``: queued prefills, decode jobs
        waiting for their KV and running sequences; discard the KV ``kv_id`` (and that of the
        dropped decode jobs) in the receive pool, arrived or not."""
        self._note_cancel(rid, attempt)
        seq = self.running.get(rid)
        if seq is not None and seq.attempt <= attempt:
            del self.running[rid]
        self.prefills = deque(j for j in self.prefills
                              if not (j["rid"] == rid and j["attempt"] <= attempt))
        keep: deque[WaitingKV] = deque()
        for w in self.waiting:
            if w.job["rid"] == rid and w.job["attempt"] <= attempt:
                self.rx.discard(w.job["kv_id"])
            else:
                keep.append(w)
        self.waiting = keep
        if kv_id is not None:
            self.rx.discard(kv_id)

    # ------------------------------------------------------------------ prefill
    def prefill(self, job: dict) -> None:
        if self._is_cancelled(job):
            return
        t0 = time.perf_counter()
        target = job.get("target")
        send = None
        try:
            sink = None
            if target is not None:
                send = self._start_send(job)
                sink = self._sink(send)
            else:
                sink = self._cancel_check(job)
            logits, kv = self.runner.prefill(job["tokens"], kv_sink=sink)
            if send is not None:
                send.layers.put(None)  # all layers queued
            if self._is_cancelled(job):
                raise _Cancelled()
            first = _sample(logits[None], job["sampling"], 0)
        except _Cancelled:
            log.debug("prefill of %s attempt %d cancelled", job["rid"], job["attempt"])
            if send is not None:
                send.layers.put(None)  # the sender thread aborts (or never starts) the stream
            return
        except Exception as exc:  # reported; the router re-routes the request
            log.exception("prefill of %s failed", job["rid"])
            if send is not None:
                send.layers.put(None)
            self.emit({"ev": P.ERROR, "rid": job["rid"], "attempt": job["attempt"],
                       "where": "prefill", "message": f"{type(exc).__name__}: {exc}"})
            return
        seconds = time.perf_counter() - t0
        self.emit({"ev": P.PREFILLED, "rid": job["rid"], "attempt": job["attempt"],
                   "worker": self.id, "first_token": first, "seconds": seconds,
                   "tokens": len(job["tokens"])})
        if target is None:  # decode here (colocated)
            self.running[job["rid"]] = Running(
                job["rid"], job["attempt"], kv, first, 1, job["max_tokens"], job["sampling"])
            self._finish_if_done(self.running[job["rid"]], first, emit_token=True)

    def _start_send(self, job: dict) -> SendJob:
        from .kvwire import DEFAULT_SINK, geometry_of, message_header

        target = job["target"]
        peer = (target["host"], target["port"])
        header = message_header(geometry_of(self.runner), len(job["tokens"]), job["kv_bits"],
                                job["kv_id"], group_size=job.get("kv_group", 64),
                                sink=job.get("kv_sink_tokens", DEFAULT_SINK))
        with self._senders_lock:
            pool = self._send_pool
        if pool is None:
            # One registered pool for every peer, registered with the UCX worker of the
            # connection that first needs it (the others register each payload as they send
            # it). A new one replaces it if that connection breaks.
            sender = self._sender(peer)
            with self._senders_lock:
                if self._send_pool is None:
                    self._send_pool = sender.register(SEND_POOL_BYTES)
                    self._pool_owner = sender
                pool = self._send_pool
        piece = self._allocate(pool, header.payload_length)
        return SendJob(job, header, piece.view, piece, pool, peer)

    def _sender(self, peer: tuple[str, int]):
        """The connection to ``peer``: the cached one unless it broke, else a new one. The
        lock guards only the table: connecting (up to its timeout) happens outside it, so one
        slow peer holds up no prefill bound elsewhere."""
        from thunderkv.transfer import KVSender

        with self._senders_lock:
            sender = self._senders.get(peer)
        if sender is not None and sender.broken:
            self._drop_sender(peer, sender)
            sender = None
        if sender is not None:
            return sender
        new = KVSender(peer[0], peer[1], token=self.token, timeout=10.0)
        with self._senders_lock:
            sender = self._senders.setdefault(peer, new)
        if sender is not new:  # another thread connected first: keep one connection
            new.close()
        return sender

    def _drop_sender(self, peer: tuple[str, int], sender) -> None:
        """Forget and close a failed connection (closing, which may wait for a PUT in flight,
        happens outside the lock). If the send pool was registered with it, the pool is
        retired: payloads still in it stay valid (they are sent with a per-request
        registration) and the next prefill registers a new one."""
        with self._senders_lock:
            if self._senders.get(peer) is sender:
                del self._senders[peer]
            if sender is self._pool_owner:
                self._send_pool = self._pool_owner = None
        try:
            sender.close()
        except Exception as exc:
            log.debug("closing the connection to %s:%d failed: %s", *peer, exc)

    def _allocate(self, pool, nbytes: int):
        from thunderkv.transfer import PoolFull

        deadline = time.monotonic() + KV_WAIT_S
        while True:
            try:
                return pool.allocate(nbytes)
            except PoolFull:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)  # earlier transfers still in flight free their slices

    def _cancel_check(self, job: dict):
        """A KV sink that only stops a cancelled prefill (a colocated one sends nothing)."""
        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if self._is_cancelled(job):
                raise _Cancelled()

        return sink

    def _sink(self, send: SendJob):
        from .kvwire import write_layer

        self._send_jobs.put(send)

        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if self._is_cancelled(send.job):
                raise _Cancelled()
            write_layer(send.header, send.payload, layer, k, v)
            send.layers.put(layer)

        return sink

    def _send_loop(self) -> None:
        while True:
            send = self._send_jobs.get()
            if send is None:
                return
            job = send.job
            try:
                result = self._transfer(send)
                self.emit({"ev": P.KV_SENT, "rid": job["rid"], "attempt": job["attempt"],
                           "bytes": result.payload_bytes, "seconds": result.seconds,
                           "transports": list(result.transports)})
            except _Cancelled:
                log.debug("KV of %s attempt %d cancelled", job["rid"], job["attempt"])
            except Exception as exc:
                if self._is_cancelled(job):  # the decode side refused or dropped it: expected
                    log.debug("KV of cancelled %s attempt %d: %s", job["rid"], job["attempt"],
                              exc)
                    continue
                # INFO: the router warns about a failed attempt it still cares about (this one
                # may also be a cancelled attempt whose CANCEL has not reached us yet).
                log.info("KV transfer of %s failed: %s: %s", job["rid"], type(exc).__name__, exc)
                self.emit({"ev": P.ERROR, "rid": job["rid"], "attempt": job["attempt"],
                           "where": "transfer", "message": f"{type(exc).__name__}: {exc}"})
            finally:
                send.pool.release(send.piece)

    def _open_stream(self, send: SendJob):
        """A KV stream for ``send`` to its peer. A connection found dead before anything of
        this request went out (it broke on an earlier request, the peer dropped it while idle,
        a stall outlived the peer's timeout) is replaced and the request tried once more."""
        from thunderkv.transfer import ConnectionClosed

        for attempt in (1, 2):
            sender = self._sender(send.peer)
            try:
                return sender, sender.stream(send.header, send.payload)
            except ConnectionClosed as exc:  # the peer had closed it: nothing was granted
                self._drop_sender(send.peer, sender)
                if attempt == 2:
                    raise
                log.info("connection to %s:%d failed (%s: %s); reconnecting", *send.peer,
                         type(exc).__name__, exc)
        raise AssertionError("unreachable")

    @staticmethod
    def _next_layer(send: SendJob, stream) -> int | None:
        """The next layer the prefill produced (None: no more), keeping the stream alive
        while the prefill computes: the receiver fails a request silent for its timeout."""
        while True:
            try:
                return send.layers.get(timeout=KEEP_ALIVE_S)
            except queue.Empty:
                stream.keep_alive()

    def _transfer(self, send: SendJob):
        if self._is_cancelled(send.job):
            raise _Cancelled()  # the BEGIN never goes out
        sender, stream = self._open_stream(send)
        try:
            with stream:
                sent = 0
                while (layer := self._next_layer(send, stream)) is not None:
                    if self._is_cancelled(send.job):
                        break
                    stream.send_layer(layer)
                    sent += 1
                if self._is_cancelled(send.job):
                    stream.abort("request cancelled")  # the receiver frees its slice
                    raise _Cancelled()
                if sent != send.header.layers:
                    raise RuntimeError("prefill ended before every layer was produced")
                return stream.finish()
        finally:
            if sender.broken:  # failed mid-request: later requests get a new connection
                self._drop_sender(send.peer, sender)

    # ------------------------------------------------------------------ decode
    def import_arrived_kv(self) -> None:
        from thunderkv.transfer import TransferError, TransferTimeout

        from .kvwire import read_sequence

        for _ in range(len(self.waiting)):
            w = self.waiting.popleft()
            job = w.job
            try:
                got = self.rx.wait(job["kv_id"], timeout=0)
            except TransferTimeout:
                if time.monotonic() - w.since < KV_WAIT_S:
                    self.waiting.append(w)
                    continue
                self.rx.discard(job["kv_id"])  # should it come after all, it is dropped
                self.emit({"ev": P.ERROR, "rid": job["rid"], "attempt": job["attempt"],
                           "where": "decode",
                           "message": f"TransferTimeout: KV never arrived within {KV_WAIT_S:g} s"})
                continue
            except TransferError as exc:
                self.emit({"ev": P.ERROR, "rid": job["rid"], "attempt": job["attempt"],
                           "where": "transfer", "message": f"{type(exc).__name__}: {exc}"})
                continue
            try:
                kv = read_sequence(got, self.runner)
            finally:
                got.release()
            seq = Running(job["rid"], job["attempt"], kv, job["first_token"], 1,
                          job["max_tokens"], job["sampling"])
            self.running[job["rid"]] = seq
            self.emit({"ev": P.DECODING, "rid": job["rid"], "attempt": job["attempt"],
                       "worker": self.id})
            self._finish_if_done(seq, job["first_token"], emit_token=False)

    def decode_step(self) -> None:
        seqs = list(self.running.values())
        t0 = time.perf_counter()
        logits = self.runner.decode([s.kv for s in seqs], [s.last_token for s in seqs])
        items = []
        for i, s in enumerate(seqs):
            tok = _sample(logits[i:i + 1], s.sampling, s.produced)
            s.last_token, s.produced = tok, s.produced + 1
            items.append(self._finish_if_done(s, tok, emit_token=None))
        self.emit({"ev": P.TOKENS, "worker": self.id, "items": items, "batch": len(seqs),
                   "seconds": time.perf_counter() - t0})

    def close(self) -> None:
        """Stop the sender thread and close the connections and the receiver."""
        self._send_jobs.put(None)
        self._sender_thread.join(timeout=5)
        with self._senders_lock:
            senders = list(self._senders.items())
        for peer, sender in senders:
            self._drop_sender(peer, sender)
        try:
            self.rx.close()
        except Exception as exc:
            log.debug("closing the KV receiver failed: %s", exc)

    def _finish_if_done(self, s: Running, token: int, emit_token: bool | None):
        """The (rid, attempt, token, finish_reason) item for ``token``; drops finished ones.
        emit_token True sends it right away, None returns it for a batched TOKENS message."""
        finish = None
        if token == self.runner.eos_token_id and not s.sampling.get("ignore_eos"):
            finish = "stop"
        elif s.produced >= s.max_tokens:
            finish = "length"
        if finish is not None:
            self.running.pop(s.rid, None)
        item = (s.rid, s.attempt, token, finish)
        if emit_token:
            self.emit({"ev": P.TOKENS, "worker": self.id, "items": [item], "batch": 1,
                       "seconds": 0.0})
        elif emit_token is False and finish is not None:
            self.emit({"ev": P.TOKENS, "worker": self.id, "items": [(s.rid, s.attempt, None,
                                                                     finish)],
                       "batch": 0, "seconds": 0.0})
        return item


def _generator(sampling: dict, position: int) -> torch.Generator | None:
    """The generator for output token ``position`` of a seeded sampled request.

    One generator per absolute position (``sampling["offset"]``: tokens generated before this
    attempt, + ``position`` within it), so a request restarted after a worker death draws the
    same random numbers for the tokens still to come as it would have without the restart."""
    if sampling.get("temperature", 0) == 0 or sampling.get("seed") is None:
        return None
    index = int(sampling.get("offset", 0)) + position
    mixed = (int(sampling["seed"]) * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def _sample(logits: torch.Tensor, sampling: dict, position: int) -> int:
    from .sampling import sample

    return sample(logits, [float(sampling.get("temperature", 0.0))],
                  [float(sampling.get("top_p", 1.0))], [_generator(sampling, position)])[0]


def main(conn, worker_id: int, model: str, role: str, threads: int, token: str,
         host: str = "127.0.0.1") -> None:
    """Entry point of a worker process (multiprocessing spawn target)."""
    # Ctrl-C in the terminal reaches the whole process group: the router stops the workers
    # (STOP, or the pipe closing), so a worker ignores it rather than print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("THUNDERKV_LOG", "WARNING").upper(),
                        format=f"%(asctime)s [worker {worker_id}] %(levelname)s %(message)s")
    try:
        worker = Worker(conn, worker_id, model, role, threads, token, host)
    except Exception as exc:
        log.debug("worker %d failed to start", worker_id, exc_info=True)
        try:
            conn.send({"ev": P.FAILED, "worker": worker_id,
                       "message": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass  # the router is gone
        return
    try:
        worker.run()
    finally:
        worker.close()


def _cli() -> None:
    """``python -m thunderkv.serve.worker --connect HOST:PORT ...``: a worker started by a
    router in another network namespace (the pipe becomes an authenticated socket; the authkey
    and the transfer token come from the environment)."""
    import argparse
    from multiprocessing.connection import Client

    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True)
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-host", default="127.0.0.1")
    a = p.parse_args()
    host, port = a.connect.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ["THUNDERKV_WORKER_AUTHKEY"]))
    conn.send({"hello": a.id})
    main(conn, a.id, a.model, a.role, a.threads, os.environ["THUNDERKV_TRANSFER_TOKEN"],
         a.kv_host)


if __name__ == "__main__":
    _cli()
