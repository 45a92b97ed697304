"""The router: spawns worker processes, routes requests prefill -> decode, survives deaths.

One :class:`Engine` owns N worker processes (:mod:`thunderkv.serve.worker`), each with a role
(prefill, decode or colocated) that can be changed live (:meth:`Engine.reschedule`, and
automatically when the last worker of a phase dies). A request goes to the prefill worker with
the fewest outstanding prefills, its KV to the decode worker with the fewest running sequences
(the prefill worker ships it there directly over thunderkv.transfer), and its tokens stream
back through the router, which detokenizes and hands them to the HTTP layer. When a worker dies
(any cause, SIGKILL included) its in-flight requests restart on survivors: re-prefill of the
prompt plus the tokens already produced, so no request is lost and greedy output continues
unchanged.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import protocol as P
from .api_types import CompletionRequest, RequestError, TokenEvent, Usage, unicode_problem
from .metrics import Metrics

log = logging.getLogger("thunderkv.serve")
MAX_ATTEMPTS = 5
# /health turns "degraded" (ok: false) when the last HEALTH_FAILED_IN_A_ROW requests to end
# within the last HEALTH_WINDOW_S seconds all failed (cancelled requests do not count).
HEALTH_WINDOW_S = 60.0
HEALTH_FAILED_IN_A_ROW = 3


@dataclass
class ServeConfig:
    """What to run: the model, how many workers of which phase, KV bits on the wire."""

    model: str = "smollm2"
    prefill: int = 1
    decode: int = 1
    colocated: int = 0  # > 0: that many colocated workers instead of prefill/decode ones
    kv_bits: int = 4
    kv_group_size: int = 32  # format v1 group of 4-bit KV messages (16: better agreement)
    kv_sink_tokens: int = 0  # first tokens of a 4-bit KV message sent exact (attention sink)
    threads: int = 1  # torch threads per worker
    host: str = "127.0.0.1"  # where workers listen for KV
    start_timeout: float = 300.0
    # Workers in network namespaces (see serve.netplace.Placement); None: local processes.
    placement: object | None = None
    # From a plan (one worker per group, worker id = group index): each worker's phase, and the
    # planned prefill -> decode request rates the router follows (serve.routing.PlanRouting).
    role_list: list[str] | None = None
    routing: list[dict] | None = None

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "colocated"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} workers must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        roles = self.roles()
        if not roles:
            raise ValueError("no workers to run")
        bad = sorted({str(r) for r in roles} - set(P.ROLES))
        if bad:
            raise ValueError(f"worker roles must be among {P.ROLES}, got {bad}")
        if "colocated" not in roles and not {"prefill", "decode"} <= set(roles):
            missing = "prefill" if "prefill" not in roles else "decode"
            raise ValueError(f"a phase-split server needs at least one prefill and one decode "
                             f"worker (no {missing} worker); use --colocated N for colocated "
                             "workers")
        if self.routing is not None:
            routing_table(self.routing, roles)  # raises ValueError for a plan that cannot run

    def roles(self) -> list[str]:
        if self.role_list is not None:
            return list(self.role_list)
        if self.colocated:
            return ["colocated"] * self.colocated
        return ["prefill"] * self.prefill + ["decode"] * self.decode


class _sigint_blocked:
    """SIGINT held off while this thread starts a worker process.

    The signal is blocked in this thread, and the child inherits the mask (across exec, so
    before the worker can set up anything): a Ctrl-C in the terminal, which reaches the whole
    process group, interrupts the router only -- which then stops the workers -- instead of
    printing a KeyboardInterrupt traceback from every worker.

    Blocking is not enough in the router itself: the kernel hands a process-wide SIGINT to any
    thread that does not block it (a listener, a native torch/OpenMP thread), and CPython then
    raises KeyboardInterrupt in the main thread anyway -- possibly inside ``Process.start()``
    while the new worker reads its start-up data, which then dies printing an EOFError
    traceback. So in the main thread the Python-level handler only records the signal while the
    worker starts, and KeyboardInterrupt is raised once ``start()`` has returned. A signal still
    pending at the OS level reaches the router when the mask is restored."""

    def __enter__(self) -> None:
        from multiprocessing import resource_tracker

        # Process.start() starts the tracker on first use, and unblocks SIGINT after that:
        # start it first, so that the mask holds while the worker itself is started.
        resource_tracker.ensure_running()
        self._got = False
        self._handler = None
        if threading.current_thread() is threading.main_thread():
            self._handler = signal.signal(signal.SIGINT, self._record)
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def _record(self, *_) -> None:
        self._got = True

    def __exit__(self, exc_type, *exc) -> None:
        if self._handler is not None:
            signal.signal(signal.SIGINT, self._handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
        if self._got and exc_type is None:
            raise KeyboardInterrupt


def routing_table(entries, roles: list[str]):
    """A :class:`~thunderkv.serve.routing.PlanRouting` over workers with ``roles``; ValueError
    when an entry names a worker that does not exist, when the plan routes nothing, or when a
    flow does not fit the workers' phases (the router could never follow it)."""
    from .routing import PlanRouting

    table = PlanRouting(entries)
    for i, j in table.flow:
        if max(i, j) >= len(roles):
            raise ValueError(f"routing names worker {max(i, j)} but there are {len(roles)}")
        if (problem := _flow_problem(i, j, roles)) is not None:
            raise ValueError(f"routing sends requests from worker {i} to worker {j}, but "
                             f"{problem}: is the plan for these workers?")
    return table


def _flow_problem(i: int, j: int, roles: list[str]) -> str | None:
    """Why the router cannot route along ``i -> j`` with these ``roles`` (None: it can): a
    colocated worker decodes its own prefills only (``i == j``), a prefill worker's KV goes
    to a decode worker."""
    if i == j:
        return None if roles[i] == "colocated" else f"worker {i} is {roles[i]}, not colocated"
    if roles[i] != "prefill":
        return f"worker {i} is {roles[i]}, not prefill"
    if roles[j] != "decode":
        return f"worker {j} is {roles[j]}, not decode"
    return None


def _how_it_ended(exitcode: int | None) -> str:
    """" (exit code 1)", " (killed by signal SIGKILL)", or "" when unknown."""
    if exitcode is None:
        return ""
    if exitcode < 0:
        try:
            return f" (killed by signal {signal.Signals(-exitcode).name})"
        except ValueError:
            return f" (killed by signal {-exitcode})"
    return f" (exit code {exitcode})"


@dataclass
class WorkerState:
    id: int
    role: str
    process: mp.process.BaseProcess
    conn: object
    state: str = "starting"
    pid: int | None = None
    host: str = ""
    port: int = 0
    load_s: float = 0.0
    prefills: int = 0  # outstanding prefill jobs
    decodes: int = 0  # sequences routed here for decode and not finished
    prefills_total: int = 0  # prefill jobs ever routed here (restarts included)
    decodes_total: int = 0  # decode jobs ever routed here
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, msg: dict) -> bool:
        with self.send_lock:
            try:
                self.conn.send(msg)
                return True
            except (OSError, ValueError, BrokenPipeError):
                return False

    @property
    def alive(self) -> bool:
        return self.state == "ready"


class RequestState:
    """One request: its tokens so far, where it runs, and the events for its client."""

    def __init__(self, request: CompletionRequest, prompt_ids: list[int]) -> None:
        self.request = request
        self.rid = request.request_id
        self.prompt_ids = prompt_ids
        self.generated: list[int] = []
        self.attempt = 0
        self.offset = 0  # tokens generated before the current attempt
        self.prefill_worker: int | None = None
        self.decode_worker: int | None = None
        self.first_token: int | None = None
        self.kv_id = 0
        self.prefill_pending = False  # the current attempt's prefill is counted on its worker
        self.last_error: str | None = None  # why the latest attempt failed (for the client)
        self.events: queue.Queue[TokenEvent | BaseException] = queue.Queue()
        self.text_sent = ""
        self.finished = False
        self.submitted = time.monotonic()
        self.first_at: float | None = None
        self.last_at: float | None = None  # when the latest token came
        self.finished_at: float | None = None

    def sampling(self) -> dict:
        r = self.request
        return {"temperature": r.temperature, "top_p": r.top_p, "seed": r.seed}


class Handle:
    """What :meth:`Engine.submit` returns (the HTTP layer's RequestHandle)."""

    def __init__(self, engine: Engine, state: RequestState) -> None:
        self._engine, self._state = engine, state

    @property
    def request_id(self) -> str:
        return self._state.rid

    def events(self, timeout: float | None = None):
        while True:
            try:
                ev = self._state.events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no token within {timeout} s") from None
            if isinstance(ev, BaseException):
                raise ev
            yield ev
            if ev.finish_reason is not None:
                return

    def usage(self) -> Usage:
        return Usage(len(self._state.prompt_ids), len(self._state.generated))

    def cancel(self) -> None:
        self._engine._cancel(self._state)

    def stop(self) -> None:
        """Ends the generation because the client has what it asked for (a stop string
        matched): like :meth:`cancel`, but the request counts as completed."""
        self._engine._cancel(self._state, completed=True)

    def text(self, timeout: float | None = None) -> str:
        """Block until done; the whole completion text."""
        return "".join(ev.text for ev in self.events(timeout))


class Engine:
    """Router + worker processes. Use as a context manager (stops the workers)."""

    def __init__(self, config: ServeConfig,
                 progress: Callable[[str], None] | None = None,
                 on_all_dead: Callable[[], None] | None = None) -> None:
        """Start the workers and wait until every one has loaded the model. ``progress``, if
        given, is called (from a router thread) with a line as each worker becomes ready;
        ``on_all_dead``, once the last live worker died (nothing can serve any more: a
        server should exit so that its supervisor restarts it)."""
        from thunderkv.transfer import auth

        from .tokenizer import load_tokenizer

        self.config = config
        self._progress = progress
        self._on_all_dead = on_all_dead
        self.model_name = config.model
        self.tokenizer = load_tokenizer(config.model)
        self.metrics = Metrics()
        self._token = auth.new_token()
        self._lock = threading.RLock()
        self._requests: dict[str, RequestState] = {}
        self._kv_ids = itertools.count(1)
        self._ctx = mp.get_context("spawn")
        self.procs: list[WorkerState] = []
        self._closed = False
        self.max_positions = None
        self._plan = None
        # (monotonic time, completed?) of the latest requests to end, for health()
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque(maxlen=256)
        self._last_error: str | None = None
        roles = config.roles()  # validated by ServeConfig
        if config.routing is not None:
            self._plan = routing_table(config.routing, roles)
        try:
            for i, role in enumerate(roles):
                self._spawn(i, role)
            self._wait_ready()
        except BaseException:  # Ctrl-C or a failure while starting: stop what was started
            self.close()
            raise

    # ------------------------------------------------------------------ workers
    def _spawn(self, worker_id: int, role: str) -> None:
        from . import worker

        if self.config.placement is not None:
            proc, conn = self.config.placement.launch(worker_id, role, self.config, self._token)
        else:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=worker.main, name=f"tkv-worker-{worker_id}",
                args=(child, worker_id, self.config.model, role, self.config.threads,
                      self._token, self.config.host), daemon=True)
            with _sigint_blocked():  # Ctrl-C is the router's: it stops the workers itself
                proc.start()
            child.close()
            conn = parent
        w = WorkerState(worker_id, role, proc, conn)
        self.procs.append(w)
        threading.Thread(target=self._listen, args=(w,), name=f"tkv-router-{worker_id}",
                         daemon=True).start()

    def _wait_ready(self) -> None:
        """Until every worker is ready; RuntimeError at once when one reports a failure or dies
        while loading (the others are stopped), TimeoutError after ``start_timeout``."""
        deadline = time.monotonic() + self.config.start_timeout
        while time.monotonic() < deadline:
            with self._lock:
                lost = [w for w in self.procs if w.state in ("failed", "dead")]
                ready = all(w.state == "ready" for w in self.procs)
            if lost:
                reasons = "; ".join(self._startup_failure(w) for w in lost)
                self.close()
                raise RuntimeError(reasons)
            if ready:
                return
            time.sleep(0.05)
        self.close()
        raise TimeoutError(f"workers not ready within {self.config.start_timeout} s")

    @staticmethod
    def _startup_failure(w: WorkerState) -> str:
        """Why worker ``w`` never became ready: the error it reported, or how it died."""
        message = getattr(w, "message", None)
        if message:  # it reported the failure (it may have exited since)
            return f"worker {w.id} ({w.role}) failed to start: {' '.join(message.split())}"
        w.process.join(timeout=2.0)  # its pipe closed: it is exiting, if not already gone
        return f"worker {w.id} ({w.role}) died while loading the model" + _how_it_ended(
            getattr(w.process, "exitcode", None))

    def _listen(self, w: WorkerState) -> None:
        while True:
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                if not self._closed:  # the process is exiting: wait for how it ended
                    w.process.join(timeout=1.0)
                self._on_worker_death(w)
                return
            try:
                self._on_event(w, msg)
            except Exception:
                log.exception("router failed handling %r from worker %d", msg.get("ev"), w.id)

    # ------------------------------------------------------------------ requests
    def submit(self, request: CompletionRequest) -> Handle:
        if not isinstance(request.prompt, list) and (
                why := unicode_problem(request.prompt)) is not None:
            raise RequestError(f"'prompt' is not valid Unicode: {why}", "prompt")
        ids = (list(request.prompt) if isinstance(request.prompt, list)
               else self.tokenizer.encode(request.prompt))
        if not ids:
            raise RequestError("prompt is empty", "prompt")
        limit = self.max_positions or 1 << 30
        if len(ids) + request.max_tokens > limit:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) "
                               f"exceeds the model's {limit} positions", "prompt",
                               code="context_length_exceeded")
        if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
            raise RequestError("prompt token id outside the vocabulary", "prompt")
        state = RequestState(request, ids)
        with self._lock:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._requests[state.rid] = state
            self.metrics.requests.inc()
            self._dispatch(state)
        return Handle(self, state)

    def _pick(self, roles: tuple[str, ...], key) -> WorkerState | None:
        live = [w for w in self.procs if w.alive and w.role in roles]
        return min(live, key=key) if live else None

    def _pick_prefill(self) -> WorkerState | None:
        """Planned share first (see serve.routing), else the least-loaded live worker."""
        def load(w: WorkerState) -> tuple[int, int]:
            return w.prefills, w.decodes

        if self._plan is not None:
            live = [w.id for w in self.procs if w.alive and w.role in ("prefill", "colocated")]
            wid = self._plan.pick_prefill(live, lambda i: load(self.procs[i]))
            if wid is not None:
                return self.procs[wid]
        return self._pick(("prefill", "colocated"), load)

    def _pick_decode(self, prefill: WorkerState) -> WorkerState | None:
        if self._plan is not None:
            live = [w.id for w in self.procs if w.alive and w.role == "decode"]
            wid = self._plan.pick_decode(prefill.id, live, lambda i: self.procs[i].decodes)
            if wid is not None:
                return self.procs[wid]
        return self._pick(("decode",), lambda w: w.decodes)

    def _dispatch(self, state: RequestState) -> None:
        """(Re)start ``state``: prefill of prompt + tokens so far, on the chosen workers."""
        state.attempt += 1
        if state.attempt > MAX_ATTEMPTS:
            self._fail(state, RequestError(
                f"request failed {MAX_ATTEMPTS} times; last error: {state.last_error}",
                status=503, code="request_failed"))
            return
        prefill = self._pick_prefill()
        if prefill is None:
            self._fail(state, RequestError("no live prefill worker", status=503,
                                           code="no_live_worker"))
            return
        target = None
        if prefill.role != "colocated":
            decode = self._pick_decode(prefill)
            if decode is None:
                self._fail(state, RequestError("no live decode worker", status=503,
                                               code="no_live_worker"))
                return
            target = {"worker": decode.id, "host": decode.host, "port": decode.port}
            state.decode_worker = decode.id
        else:
            state.decode_worker = prefill.id
        state.prefill_worker = prefill.id
        state.kv_id = next(self._kv_ids)
        state.prefill_pending = True
        prefill.prefills += 1
        prefill.prefills_total += 1
        self.procs[state.decode_worker].decodes += 1
        self.procs[state.decode_worker].decodes_total += 1
        if self._plan is not None and prefill.role == "colocated":
            self._plan.record(prefill.id, prefill.id)
        done = state.offset = len(state.generated)  # tokens before this attempt
        ok = prefill.send({
            "op": P.PREFILL, "rid": state.rid, "attempt": state.attempt, "kv_id": state.kv_id,
            "tokens": state.prompt_ids + state.generated, "target": target,
            "kv_bits": self.config.kv_bits, "kv_group": self.config.kv_group_size,
            "kv_sink_tokens": self.config.kv_sink_tokens,
            "max_tokens": state.request.max_tokens - done,
            "sampling": {**state.sampling(), "offset": done}})
        if not ok:
            self._on_worker_death(prefill)

    def _on_event(self, w: WorkerState, msg: dict) -> None:
        ev = msg["ev"]
        with self._lock:
            if ev == P.READY:
                w.state, w.pid, w.host, w.port, w.load_s = ("ready", msg["pid"], msg["host"],
                                                            msg["port"], msg["load_s"])
                self.max_positions = min(self.max_positions or 1 << 62, msg["max_positions"])
                if self._progress is not None:
                    ready = sum(x.state == "ready" for x in self.procs)
                    self._progress(f"worker {w.id} ({w.role}) ready: model loaded in "
                                   f"{w.load_s:.1f} s [{ready}/{len(self.procs)}]")
                return
            if ev == P.FAILED:
                w.state, w.message = "failed", msg["message"]
                return
            if ev == P.ROLE:
                w.role = msg["role"]
                self.metrics.role_switch_seconds.observe(msg["seconds"])
                return
            if ev == P.TOKENS:
                for rid, attempt, token, finish in msg["items"]:
                    self._on_token(rid, attempt, token, finish)
                if msg["batch"]:
                    self.metrics.decode_step_seconds.observe(msg["seconds"])
                    self.metrics.decode_batch.set(msg["batch"])
                    self.metrics.decode_batches.observe(msg["batch"])
                return
            state = self._requests.get(msg.get("rid"))
            if state is None or msg.get("attempt") != state.attempt or state.finished:
                return  # a finished, cancelled or superseded attempt
            if ev == P.PREFILLED:
                if state.prefill_pending and state.prefill_worker == msg["worker"]:
                    state.prefill_pending = False
                    self.procs[msg["worker"]].prefills -= 1
                self.metrics.prefill_seconds.observe(msg["seconds"])
                state.first_token = msg["first_token"]
                if state.decode_worker != msg["worker"]:
                    self.procs[state.decode_worker].send({
                        "op": P.DECODE, "rid": state.rid, "attempt": state.attempt,
                        "kv_id": state.kv_id, "first_token": msg["first_token"],
                        "max_tokens": state.request.max_tokens - len(state.generated),
                        "sampling": {**state.sampling(), "offset": state.offset}})
            elif ev == P.DECODING:
                self._on_token(state.rid, state.attempt, state.first_token, None)
            elif ev == P.KV_SENT:
                self.metrics.kv_bytes.inc(msg["bytes"])
                self.metrics.kv_transfer_seconds.inc(msg["seconds"])
                self.metrics.transports.update(msg["transports"])
            elif ev == P.ERROR:
                log.warning("request %s attempt %d failed in %s on worker %d: %s", state.rid,
                            state.attempt, msg["where"], w.id, msg["message"])
                state.last_error = f"{msg['message']} ({msg['where']}, worker {w.id})"
                self.metrics.restarts.inc()
                self._end_attempt(state, cancel=True)
                self._dispatch(state)

    def _on_token(self, rid: str, attempt: int, token: int | None, finish: str | None) -> None:
        state = self._requests.get(rid)
        if state is None or attempt != state.attempt or state.finished:
            return
        now = time.monotonic()
        if token is not None:
            state.generated.append(token)
            state.last_at = now
            if state.first_at is None:
                state.first_at = now
                self.metrics.ttft_seconds.observe(now - state.submitted)
        text = self.tokenizer.decode(state.generated)
        if finish is None and text.endswith("\ufffd"):
            delta = ""  # an incomplete multi-byte character: wait for the next token
        else:
            delta, state.text_sent = text[len(state.text_sent):], text
        if finish is not None:
            state.finished, state.finished_at = True, now
            self._end_attempt(state, cancel=False)
            self._completed(state, now)
        state.events.put(TokenEvent(delta, token, finish))

    def _completed(self, state: RequestState, now: float) -> None:
        """Bookkeeping of a request that ended normally (its last token, or a stop string)."""
        self._outcomes.append((now, True))
        if len(state.generated) > 1:
            self.metrics.tpot_seconds.observe(
                (state.last_at - state.first_at) / (len(state.generated) - 1))
        self.metrics.completed.inc()
        self._requests.pop(state.rid, None)

    def _end_attempt(self, state: RequestState, cancel: bool) -> None:
        """The current attempt is over (finished, cancelled, failed or superseded): take it off
        its workers' queue counts; ``cancel``: also tell its live workers to drop it -- the
        prefill worker stops computing and sending its KV, the decode worker drops the job and
        discards the KV (``kv_id``) whether it already arrived, is arriving or is yet to come."""
        p, d = state.prefill_worker, state.decode_worker
        if cancel:
            msg = {"op": P.CANCEL, "rid": state.rid, "attempt": state.attempt}
            if d is not None and d != p and self.procs[d].alive:
                self.procs[d].send({**msg, "kv_id": state.kv_id})
            if p is not None and self.procs[p].alive:
                self.procs[p].send(msg)
        if state.prefill_pending:
            state.prefill_pending = False
            self.procs[p].prefills -= 1
        if d is not None:
            self.procs[d].decodes -= 1
            state.decode_worker = None

    def _fail(self, state: RequestState, error: BaseException) -> None:
        state.finished = True
        self._requests.pop(state.rid, None)
        self.metrics.failed.inc()
        self._outcomes.append((time.monotonic(), False))
        self._last_error = str(error)
        log.warning("request %s failed: %s", state.rid, error)
        state.events.put(error)

    def _cancel(self, state: RequestState, completed: bool = False) -> None:
        """Stops ``state`` on its workers. ``completed``: its client has a complete answer (a
        stop string matched), so it counts as completed (health, TPOT), not cancelled."""
        with self._lock:
            if state.finished:
                return
            now = time.monotonic()
            state.finished, state.finished_at = True, now
            self._requests.pop(state.rid, None)
            self._end_attempt(state, cancel=True)
            if completed:
                self._completed(state, now)
            else:
                self.metrics.cancelled.inc()
        # wakes a waiting reader
        state.events.put(TokenEvent("", None, "stop" if completed else "cancelled"))

    # ------------------------------------------------------------------ failures, roles
    def _on_worker_death(self, w: WorkerState) -> None:
        """``w`` is gone: flip a survivor if a phase lost its last worker, restart the requests
        ``w`` had on survivors, and log one line saying how it ended and what that changed."""
        with self._lock:
            if w.state == "dead" or self._closed:
                return
            was_ready = w.state == "ready"
            w.state = "dead"  # one that reported FAILED keeps its message (_wait_ready)
            self.metrics.worker_deaths.inc()
            died = (f"worker {w.id} ({w.role}, pid {w.pid or getattr(w.process, 'pid', None)})"
                    f" died{_how_it_ended(getattr(w.process, 'exitcode', None))}")
            if not was_ready:
                log.warning("%s while loading the model", died)
                return
            roles = {x.id: x.role for x in self.procs}
            self._rebalance_roles()
            hit = [state for state in self._requests.values()
                   if w.id in (state.prefill_worker, state.decode_worker) and not state.finished]
            log.warning("%s; %s", died, self._aftermath(roles, len(hit)))
            if self._on_all_dead is not None and not any(x.alive for x in self.procs):
                self._on_all_dead()
            for state in hit:
                self.metrics.restarts.inc()
                state.last_error = f"worker {w.id} ({w.role}) died"
                self._end_attempt(state, cancel=True)  # its surviving worker drops it
                self._dispatch(state)

    def _aftermath(self, roles_before: dict[int, str], restarted: int) -> str:
        """What a worker's death changed, for the log: the requests restarted elsewhere and
        the live workers whose role was flipped to cover a phase left without one."""
        flips = [f"worker {x.id} is now {x.role} (was {roles_before[x.id]})"
                 for x in self.procs if x.alive and x.role != roles_before[x.id]]
        live = sum(x.alive for x in self.procs)
        if not live:
            return f"no live worker left: {restarted} in-flight request(s) fail"
        return "; ".join([f"{restarted} in-flight request(s) restart on the {live} live "
                          "worker(s)", *flips])

    def _rebalance_roles(self) -> None:
        """After a death: if a phase has no live worker left, flip one from the other phase."""
        live = [w for w in self.procs if w.alive]
        roles = {w.role for w in live}
        if not live or "colocated" in roles:
            return
        for missing, donor in (("decode", "prefill"), ("prefill", "decode")):
            donors = [w for w in live if w.role == donor]
            if missing not in roles and len(donors) > 1:
                self._set_role(donors[-1], missing)
            elif missing not in roles and donors:
                self._set_role(donors[-1], "colocated")  # one worker left: it does both

    def _set_role(self, w: WorkerState, role: str) -> None:
        w.role = role  # routing changes now; the worker acknowledges with ROLE
        w.send({"op": P.SET_ROLE, "role": role})

    def reschedule(self, body: dict) -> dict:
        """Live phase reassignment: ``{"roles": {"<worker id>": "prefill"|"decode"|...}}``,
        optionally with the new plan's ``"routing"`` (entries as in ``thunderkv plan --json``)."""
        roles = body.get("roles")
        if not isinstance(roles, dict) or not roles:
            raise RequestError("body must be {\"roles\": {\"<worker id>\": role}}", "roles")
        routing = body.get("routing")
        if routing is not None and not isinstance(routing, list):
            raise RequestError("routing must be a list of plan routing entries", "routing")
        t0 = time.perf_counter()
        with self._lock:
            changes = {}
            for key, role in roles.items():
                # a worker id: digits only ("-1" would index the list from its end)
                if isinstance(key, int) and not isinstance(key, bool):  # from Python callers
                    wid = key
                else:
                    wid = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() \
                        else -1
                if not 0 <= wid < len(self.procs):
                    raise RequestError(f"no worker {key!r}", "roles")
                w = self.procs[wid]
                if role not in P.ROLES:
                    raise RequestError(f"role must be one of {P.ROLES}, got {role!r}", "roles")
                if not w.alive:
                    raise RequestError(f"worker {key} is {w.state}", "roles")
                changes[w.id] = role
            after = {w.id: changes.get(w.id, w.role) for w in self.procs if w.alive}
            if not any(r in ("prefill", "colocated") for r in after.values()) or not any(
                    r in ("decode", "colocated") for r in after.values()):
                raise RequestError("the new roles leave a phase without workers", "roles")
            table = None
            if routing is not None:  # checked against the roles it comes with
                try:
                    table = routing_table(routing, [changes.get(w.id, w.role)
                                                    for w in self.procs])
                except ValueError as exc:
                    raise RequestError(str(exc), "routing") from None
            for wid, role in changes.items():
                self._set_role(self.procs[wid], role)
            if table is not None:
                self._plan = table
        seconds = time.perf_counter() - t0
        self.metrics.reschedule_seconds.observe(seconds)
        return {"ok": True, "seconds": seconds, "roles": {str(k): v for k, v in after.items()}}

    # ------------------------------------------------------------------ introspection
    def health(self) -> dict:
        """``ok``: a prefill and a decode phase are live and requests are not all failing.
        ``status``: "ok", "unavailable" (a phase has no live worker) or "degraded" (the last
        HEALTH_FAILED_IN_A_ROW requests to end within HEALTH_WINDOW_S all failed);
        ``recent_failures`` / ``recent_requests``: failed / ended requests in that window."""
        with self._lock:
            live = [w for w in self.procs if w.alive]
            serving = any(w.role in ("prefill", "colocated") for w in live) and any(
                w.role in ("decode", "colocated") for w in live)
            since = time.monotonic() - HEALTH_WINDOW_S
            recent = [ok for t, ok in self._outcomes if t >= since]
            tail = recent[-HEALTH_FAILED_IN_A_ROW:]
            degraded = len(tail) == HEALTH_FAILED_IN_A_ROW and not any(tail)
            status = "unavailable" if not serving else "degraded" if degraded else "ok"
            report = {"ok": status == "ok", "status": status, "model": self.model_name,
                      "workers_live": len(live), "workers": len(self.procs),
                      "in_flight": len(self._requests), "recent_requests": len(recent),
                      "recent_failures": recent.count(False)}
            if recent.count(False):
                report["last_error"] = self._last_error
            return report

    def workers(self) -> list[dict]:
        """Role, pid and state of each worker (``GET /admin/workers``)."""
        with self._lock:
            return [{"id": w.id, "role": w.role, "pid": w.pid, "state": w.state,
                     "kv_port": w.port, "outstanding_prefills": w.prefills,
                     "decoding": w.decodes, "prefills_total": w.prefills_total,
                     "decodes_total": w.decodes_total, "load_seconds": round(w.load_s, 3)}
                    for w in self.procs]

    def routing(self) -> list[dict] | None:
        """The plan's flows and requests routed along each, or None (least-loaded routing)."""
        with self._lock:
            return None if self._plan is None else self._plan.to_dicts()

    def metrics_text(self) -> str:
        with self._lock:
            queues = {w.id: (w.prefills, w.decodes) for w in self.procs}
        return self.metrics.render(queues)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self.procs:
                w.send({"op": P.STOP})
        deadline = time.monotonic() + 5.0
        for w in self.procs:
            if w.state == "starting":  # still loading the model: it would not read STOP yet
                w.process.kill()
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
        if self.config.placement is not None:
            self.config.placement.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
