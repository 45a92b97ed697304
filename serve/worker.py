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
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from . import protocol as P

log = logging.getLogger("thunderkv.serve.worker")
SEND_POOL_BYTES = 256 << 20
RECV_POOL_BYTES = 512 << 20
KV_WAIT_S = 60.0


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
    """One prefill's KV on its way out: layers are queued as the model produces them."""

    def __init__(self, job: dict, header, payload, piece, sender) -> None:
        self.job, self.header, self.payload, self.piece, self.sender = (
            job, header, payload, piece, sender)
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
        self._senders: dict[tuple[str, int], object] = {}
        self._send_pool = None
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
            self.conn.send(msg)

    def run(self) -> None:
        self.emit({"ev": P.READY, "worker": self.id, "pid": os.getpid(), "host": self.rx.host,
                   "port": self.rx.port, "load_s": self.load_s, "role": self.role,
                   "layers": self.runner.num_layers,
                   "max_positions": self.runner.max_positions})
        while True:
            busy = bool(self.prefills or self.running or self.waiting)
            if self.conn.poll(0 if busy else 0.05):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    return  # the router is gone
                if msg["op"] == P.STOP:
                    return
                self.handle(msg)
                continue  # drain every pending message before computing
            if self.prefills:
                self.prefill(self.prefills.popleft())
            self.import_arrived_kv()
            if self.running:
                self.decode_step()

    def handle(self, msg: dict) -> None:
        op = msg["op"]
        if op == P.PREFILL:
            self.prefills.append(msg)
        elif op == P.DECODE:
            self.waiting.append(WaitingKV(msg))
        elif op == P.CANCEL:
            seq = self.running.get(msg["rid"])
            if seq is not None and seq.attempt == msg["attempt"]:
                del self.running[msg["rid"]]
            self.prefills = deque(j for j in self.prefills if j["rid"] != msg["rid"])
        elif op == P.SET_ROLE:
            t0 = time.perf_counter()
            self.role = msg["role"]
            self.emit({"ev": P.ROLE, "worker": self.id, "role": self.role,
                       "seconds": time.perf_counter() - t0})
        else:
            log.error("unknown op %r", op)

    # ------------------------------------------------------------------ prefill
    def prefill(self, job: dict) -> None:
        t0 = time.perf_counter()
        target = job.get("target")
        send = None
        try:
            sink = None
            if target is not None:
                send = self._start_send(job)
                sink = self._sink(send)
            logits, kv = self.runner.prefill(job["tokens"], kv_sink=sink)
            if send is not None:
                send.layers.put(None)  # all layers queued
            first = _sample(logits[None], job["sampling"], 0)
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
        from thunderkv.transfer import KVSender

        from .kvwire import DEFAULT_SINK, geometry_of, message_header

        target = job["target"]
        key = (target["host"], target["port"])
        if key not in self._senders:
            self._senders[key] = KVSender(target["host"], target["port"], token=self.token,
                                          timeout=10.0)
        sender = self._senders[key]
        header = message_header(geometry_of(self.runner), len(job["tokens"]), job["kv_bits"],
                                job["kv_id"], group_size=job.get("kv_group", 64),
                                sink=job.get("kv_sink_tokens", DEFAULT_SINK))
        if self._send_pool is None:
            # one registered pool serves every peer: registered with the first sender's worker
            self._send_pool = sender.register(SEND_POOL_BYTES)
        piece = self._allocate(header.payload_length)
        return SendJob(job, header, piece.view, piece, sender)

    def _allocate(self, nbytes: int):
        from thunderkv.transfer import PoolFull

        deadline = time.monotonic() + KV_WAIT_S
        while True:
            try:
                return self._send_pool.allocate(nbytes)
            except PoolFull:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)  # earlier transfers still in flight free their slices

    def _sink(self, send: SendJob):
        from .kvwire import write_layer

        self._send_jobs.put(send)

        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
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
                with send.sender.stream(send.header, send.payload) as stream:
                    while (layer := send.layers.get()) is not None:
                        stream.send_layer(layer)
                    if stream._next_layer != send.header.layers:
                        raise RuntimeError("prefill ended before every layer was produced")
                    result = stream.finish()
                self.emit({"ev": P.KV_SENT, "rid": job["rid"], "attempt": job["attempt"],
                           "bytes": result.payload_bytes, "seconds": result.seconds,
                           "transports": list(result.transports)})
            except Exception as exc:
                log.warning("KV transfer of %s failed: %s", job["rid"], exc)
                self.emit({"ev": P.ERROR, "rid": job["rid"], "attempt": job["attempt"],
                           "where": "transfer", "message": f"{type(exc).__name__}: {exc}"})
            finally:
                self._send_pool.release(send.piece)

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
                self.emit({"ev": P.ERROR, "rid": job["rid"], "attempt": job["attempt"],
                           "where": "decode", "message": "KV never arrived"})
                continue
            except TransferError as exc:
                self.emit({"ev": P.ERROR, "rid": job["rid"], "attempt": job["attempt"],
                           "where": "transfer", "message": str(exc)})
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
    logging.basicConfig(level=os.environ.get("THUNDERKV_LOG", "WARNING"),
                        format=f"[worker {worker_id}] %(levelname)s %(message)s")
    try:
        worker = Worker(conn, worker_id, model, role, threads, token, host)
    except Exception as exc:
        conn.send({"ev": P.FAILED, "worker": worker_id, "message": f"{type(exc).__name__}: {exc}"})
        raise
    worker.run()


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
