"""``thunderkv bench transfer``: per-request KV over thunderkv.transfer, raw (16-bit) vs 4-bit.

Roles, like ``ucx_perftest``: a *server* (a :class:`KVReceiver` that verifies and releases every
message) and a *client* (a :class:`KVSender` that builds realistic per-request KV for model
presets and token counts straight in its registered send buffer: 4-bit through
``quantize_into`` on views of that buffer, raw by writing the fp16 K/V there; then sends each
message ``reps`` times). Without ``--role`` both run on this machine as separate processes,
optionally across a rate-limited veth link (``--rate``), and on plain loopback UCX's own
``ucx_perftest`` put bandwidth is measured for the same message sizes in the same run.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .._spawn import module_argv
from ..transfer.wire import KVHeader, build_header, layer_views


@dataclass(frozen=True)
class KVGeometry:
    """What sizes one request's KV: layers x kv_heads x head_dim per token (fp16)."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int

    def raw_bytes(self, tokens: int) -> int:
        return 2 * self.layers * tokens * self.kv_heads * self.head_dim * 2


def known_models() -> list[str]:
    """Model names :func:`geometry` knows (besides a model .yaml)."""
    from ..scheduler.model import PRESETS as MODEL_PRESETS

    return ["smollm2-135m", *sorted(MODEL_PRESETS)]


def geometry(name: str) -> KVGeometry:
    """KV geometry of a planner model preset, or of SmolLM2-135M (the serving loop's model),
    or of a model .yaml. ValueError (naming the known models) for anything else."""
    if name in ("smollm2", "smollm2-135m"):
        return KVGeometry("smollm2-135m", 30, 3, 64)
    from ..scheduler.errors import UnknownModel
    from ..scheduler.model import load_model

    try:
        m = load_model(name)
    except UnknownModel:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())} "
                         "(or a model .yaml)") from None
    return KVGeometry(m.name, m.layers, m.kv_heads, m.hidden // m.heads)


# ---------------------------------------------------------------------- argument checks
# Each returns why its arguments cannot run (a one-line message without the flag's name, which
# the caller prefixes), or None; they start nothing, so the CLI runs them before any process.
def parse_case(text: str) -> tuple[str, int]:
    """``MODEL:TOKENS`` -> (model, tokens); ValueError on any other shape (tokens unchecked)."""
    model, sep, tokens = text.rpartition(":")
    try:
        if not sep or not model:
            raise ValueError
        return model, int(tokens)
    except ValueError:
        raise ValueError("expected MODEL:TOKENS, e.g. llama-7b:1024") from None


def tokens_problem(tokens: int, geo: KVGeometry | None = None) -> str | None:
    """Why ``tokens`` prompt tokens (of model ``geo``, if given) cannot be one request's
    message (None when they can): under 1, or over the receiver's default limits."""
    from ..transfer.wire import DEFAULT_LIMITS

    if tokens < 1:
        return f"prompt tokens must be >= 1, got {tokens}"
    if tokens > DEFAULT_LIMITS.max_tokens:
        return (f"{tokens} tokens is over the receiver's limit of {DEFAULT_LIMITS.max_tokens} "
                "tokens per message")
    if geo is not None and geo.raw_bytes(tokens) > DEFAULT_LIMITS.max_payload_bytes:
        return (f"one raw message of {geo.name} at {tokens} tokens is "
                f"{geo.raw_bytes(tokens) / 1e9:.1f} GB, over the receiver's cap of "
                f"{DEFAULT_LIMITS.max_payload_bytes / 1e9:.1f} GB per message")
    return None


def group_size_problem(group_size: int, bits: list[int], geos: list[KVGeometry]) -> str | None:
    """Why format v1 cannot quantize these models' KV at ``bits`` with ``group_size`` (groups run
    along head_dim, and must fill whole bytes); None when it can, or when every width is raw."""
    quantized = sorted({b for b in bits if b < 16})
    if not quantized:
        return None

    def fits(g: int) -> bool:
        return all(g * b % 8 == 0 for b in quantized) and all(x.head_dim % g == 0 for x in geos)

    if group_size >= 1 and fits(group_size):
        return None
    names: dict[int, list[str]] = {}
    for x in geos:
        if x.name not in names.setdefault(x.head_dim, []):
            names[x.head_dim].append(x.name)
    dims = ", ".join(f"{d} ({', '.join(n)})" for d, n in sorted(names.items()))
    valid = [g for g in range(1, min(x.head_dim for x in geos) + 1) if fits(g)]
    return (f"not a format v1 group size for these cases: it must divide head_dim {dims} and "
            f"fill whole bytes at {'/'.join(map(str, quantized))} bits; valid here: "
            f"{', '.join(map(str, valid)) or 'none'}")


def available_bytes(device: str) -> int | None:
    """Memory the pools can take on ``device``: the host's MemAvailable, or a GPU's total
    memory; None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            return int(torch.cuda.get_device_properties(index).total_memory)
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_problem(cases: list[tuple[str, int]], inflight: int = 1, device: str = "cpu", *,
                   server: bool = True, client: bool = True,
                   pool_bytes: int | None = None) -> str | None:
    """Why the pools of this run cannot fit on ``device`` (None when they can, or when
    :func:`available_bytes` is unknown). ``server``: the receive pool, ``pool_bytes`` or else
    :func:`pool_bytes_for`; ``client``: ``inflight`` send pools of the largest message."""
    need, parts = 0, []
    if cases:
        model, tokens = max(cases, key=lambda c: geometry(c[0]).raw_bytes(c[1]))
        largest = geometry(model).raw_bytes(tokens)
    if server:
        pool = pool_bytes if pool_bytes is not None else pool_bytes_for(cases, inflight)
        need += pool
        parts.append(f"receive pool {pool / 1e9:.1f} GB")
    if client and cases:
        need += inflight * largest
        parts.append(f"send pools {inflight} x {largest / 1e9:.1f} GB for {model}:{tokens}")
    have = available_bytes(device)
    if have is None or need <= have:
        return None
    where = ("host memory available" if torch.device(device).type == "cpu"
             else f"memory on {device}")
    fix = "a smaller --pool-bytes" if pool_bytes is not None else "fewer tokens or a smaller model"
    return (f"the pools need {need / 1e9:.1f} GB ({' + '.join(parts)}) but there is only "
            f"{have / 1e9:.1f} GB of {where}; use {fix}")


# (model, prompt tokens): one request's KV each. quick: < 40 s even over a 100 Mbit/s link.
PRESETS: dict[str, list[tuple[str, int]]] = {
    "quick": [("smollm2-135m", 1024), ("llama-7b", 64)],
    "default": [("smollm2-135m", 2048), ("llama-7b", 256), ("llama-7b", 1024),
                ("llama-30b", 256)],
}


def make_header(geo: KVGeometry, tokens: int, bits: int, group_size: int,
                request_id: int) -> KVHeader:
    if bits >= 16:
        return build_header(dtype=torch.float16, bits=16, layers=geo.layers, heads=geo.kv_heads,
                            head_dim=geo.head_dim, residual_tokens=tokens, request_id=request_id,
                            streamed=True)
    return build_header(dtype=torch.float16, bits=bits, layers=geo.layers, heads=geo.kv_heads,
                        head_dim=geo.head_dim, quant_tokens=tokens, group_size=group_size,
                        request_id=request_id, streamed=True)


def fill_payload(header: KVHeader, payload: torch.Tensor, gen: torch.Generator) -> None:
    """Write one request's KV into ``payload`` (a registered send-buffer slice), in place:
    random fp16 K/V (one draw, reused for every layer), quantized straight into the buffer."""
    from ..api import quantize_into

    shape = header.shape(header.tokens)
    kv = [torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.float16)
          .to(payload.device) for _ in range(2)]
    n = header.layer_nbytes()
    for layer in range(header.layers):
        views = layer_views(header, payload[layer * n:(layer + 1) * n])
        for name, x in zip(("key", "value"), kv):
            if header.raw:
                views[f"{name}_residual"].copy_(x)
            else:
                quantize_into(x, views[f"{name}_packed"], views[f"{name}_scale"],
                              views[f"{name}_min"], bits=header.bits,
                              group_size=header.group_size, axis=-1)


def run_client(host: str, port: int, cases: list[tuple[str, int]], *, bits: list[int],
               group_size: int, reps: int, timeout: float, device: str = "cpu",
               inflight: int = 1, perftest_runs: int = 0,
               progress: Callable[[str], object] = lambda msg: None) -> list[dict]:
    """Send every (case, bits) ``reps`` times per connection (after warm-up sends); one row
    per (case, bits). ``device``: where the send pools live (the KV is quantized into them
    there). ``inflight``: connections sending at once (each its own registered copy of the
    message), so one request's handshake and check overlap another's PUT; the row's
    ``throughput_bytes_per_s`` is all timed bytes over the wall time of the timed sends.

    ``perftest_runs`` > 0 (both roles on this machine): each raw message's sends are split into
    that many blocks, each after one ``ucx_perftest`` put run at the same size on loopback, so
    baseline and sends see the same machine state (:func:`interleave`) instead of the
    baseline running minutes later."""
    from ..transfer import KVSender

    if inflight < 1:
        raise ValueError("inflight must be >= 1")
    rows = []
    ids = itertools.count(1)
    senders: list = []
    try:
        for _ in range(inflight):  # inside the try: a failed connect closes the others
            senders.append(KVSender(host, port, timeout=timeout))
        for model, tokens in cases:
            geo = geometry(model)
            for b in bits:
                header = make_header(geo, tokens, b, group_size, 0)
                pools, payloads = [], []
                progress(f"{geo.name} {tokens} tokens {b}-bit: building KV in the send buffer")
                for tx in senders:
                    pools.append(tx.register(max(header.payload_length, 1), device))
                    payloads.append(pools[-1].allocate(header.payload_length).view)
                fill_payload(header, payloads[0], torch.Generator().manual_seed(0))
                for p in payloads[1:]:  # the other connections send the same message
                    p.copy_(payloads[0])
                progress(f"{geo.name} {tokens} tokens {b}-bit: {reps} sends x {inflight}")
                runs, nbytes = (perftest_runs if b >= 16 else 0), header.payload_length
                # After a pause (a perftest run) the first two sends run ~30 % slow here.
                sends = functools.partial(_timed_sends, senders, payloads, functools.partial(
                    make_header, geo, tokens, b, group_size), ids, warmup=3 if runs else 1)
                results, wall, baseline = interleave(
                    sends, reps, runs, nbytes, device,
                    lambda k, runs=runs, nbytes=nbytes: progress(
                        f"ucx_perftest put_bw at {nbytes} bytes ({k + 1}/{runs}, between "
                        "blocks of the sends)"))
                where = {"memory_type": pools[0].memory_type, "inflight": inflight,
                         "throughput_bytes_per_s": len(results) * header.payload_length / wall}
                for tx, pool in zip(senders, pools):
                    tx.unregister(pool)
                row = _row(geo, tokens, b, group_size, results, senders[0]) | where | baseline
                if baseline.get("perftest_runs_bytes_per_s"):
                    _perftest_ratios(row)
                rows.append(row)
    finally:
        for tx in senders:
            tx.close()
    return rows


def interleave(sends: Callable[[int], tuple[list, float]], reps: int, runs: int,
               message_bytes: int, device: str = "cpu",
               progress: Callable[[int], object] = lambda k: None) -> tuple[list, float, dict]:
    """``runs`` ``ucx_perftest`` put runs of ``message_bytes`` (buffers on ``device``'s memory
    type), each followed by its share of the ``reps`` timed sends: ``(results, wall seconds of
    the sends, perftest fields for the row)``. On this small shared machine the speed of both
    drifts by tens of percent within a minute, so a baseline measured in one go before or
    after the sends compares different machine states. A perftest failure is recorded
    (``perftest_error``) and the remaining sends follow at once. ``runs`` = 0: the sends in one
    block, no perftest."""
    if runs <= 0:
        results, wall = sends(reps)
        return results, wall, {}
    memory, gpu = perftest_memory(device)
    results, wall, out = [], 0.0, {"perftest_interleaved": True}
    left = reps
    for k in range(runs):
        progress(k)
        ok = _perftest_run(out, message_bytes, memory, gpu)
        n = reps // runs + (k < reps % runs) if ok else left
        if n:
            got, w = sends(n)
            results += got
            wall += w
            left -= n
        if not ok:
            break
    return results, wall, out


def _perftest_run(fields: dict, message_bytes: int, memory: str | None, gpu: int | None) -> bool:
    """One ``ucx_perftest`` put run into ``fields``: its bandwidth appended to
    ``perftest_runs_bytes_per_s`` and ``perftest_transport`` set, or ``perftest_error`` (the
    first line of why it failed). Returns whether it ran."""
    from ..transfer import ucxtools

    try:
        p = ucxtools.run_perftest_put_bw(message_bytes, timeout=120, memory=memory, gpu=gpu)
    except RuntimeError as exc:
        fields["perftest_error"] = str(exc).splitlines()[0]
        return False
    fields.setdefault("perftest_runs_bytes_per_s", []).append(p["bandwidth_bytes_per_s"])
    fields["perftest_transport"] = p.get("transport_used")
    return True


def perftest_memory(device: str) -> tuple[str | None, int | None]:
    """``ucx_perftest``'s buffer memory type and CUDA device index for pools on ``device``:
    (None, None) for host memory, ("cuda", index) for a GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "cuda", dev.index or 0
    return None, None


def _timed_sends(senders: list, payloads: list[torch.Tensor], header_for: Callable[[int], KVHeader],
                 ids: Iterator[int], reps: int, warmup: int = 1) -> tuple[list, float]:
    """``warmup`` untimed sends per connection, then ``reps`` sends on every connection at
    once (one thread each; just this thread for one). Returns (the timed results, wall
    seconds)."""
    results: list = []
    errors: list[BaseException] = []

    def send(k: int, n: int, keep: bool) -> None:
        try:
            for _ in range(n):
                r = senders[k].send(header_for(next(ids)), payloads[k])
                if keep:
                    results.append(r)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    for k in range(len(senders)):
        send(k, warmup, False)
    t0 = time.perf_counter()
    if len(senders) == 1:
        send(0, reps, True)
    else:
        threads = [threading.Thread(target=send, args=(k, reps, True))
                   for k in range(len(senders))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return results, wall


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def _row(geo: KVGeometry, tokens: int, bits: int, group_size: int, results, tx) -> dict:
    seconds = _median([r.seconds for r in results])
    put_seconds = _median([r.put_seconds for r in results])
    r = results[0]
    return {
        "bench": "transfer", "model": geo.name, "tokens": tokens, "bits": bits,
        "group_size": group_size if bits < 16 else None, "layers": geo.layers,
        "payload_bytes": r.payload_bytes, "kv_bytes": r.kv_bytes, "reps": len(results),
        "seconds_p50": seconds, "seconds_min": min(x.seconds for x in results),
        "put_seconds_p50": put_seconds,
        "wire_bytes_per_s": r.payload_bytes / seconds,
        "put_bytes_per_s": r.payload_bytes / put_seconds if put_seconds else None,
        "effective_kv_bytes_per_s": r.kv_bytes / seconds,
        "transport": ",".join(r.transports), "lanes": ",".join(r.lanes), "peer": tx.peer,
        "verified": "crc32c per layer by the receiver",
    }


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_raw: effective KV throughput of each row over the raw row of its case."""
    raw = {(r["model"], r["tokens"]): r for r in rows if r["bits"] >= 16}
    for r in rows:
        base = raw.get((r["model"], r["tokens"]))
        if base is not None:
            r["speedup_vs_raw"] = r["effective_kv_bytes_per_s"] / base["effective_kv_bytes_per_s"]


def add_perftest(rows: list[dict], progress: Callable[[str], object], runs: int = 3,
                 memory: str | None = None, gpu: int | None = None) -> None:
    """UCX's own put bandwidth at each raw message size (same UCX, default transports), the
    median of ``runs`` separate perftest runs: on a small shared machine one run's figure swings
    by 2x with where its buffer lands in cache, so every run's figure is kept
    (``perftest_runs_bytes_per_s``) and the ratios use the median. ``memory``: perftest's
    buffer memory type (``"cuda"`` to compare GPU pools with GPU buffers, on torch's CUDA
    device index ``gpu``)."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for r in rows:
        if r["bits"] < 16 or r.get("perftest_interleaved"):
            continue  # 4-bit rows have no perftest twin; interleaved rows have their runs
        for k in range(runs):
            progress(f"ucx_perftest put_bw at {r['payload_bytes']} bytes ({k + 1}/{runs})")
            if not _perftest_run(r, r["payload_bytes"], memory, gpu):
                break
        if r.get("perftest_runs_bytes_per_s"):
            _perftest_ratios(r)


def _perftest_ratios(r: dict) -> None:
    """The row's baseline (median of its ``perftest_runs_bytes_per_s``) and its ratios to it."""
    median = float(statistics.median(r["perftest_runs_bytes_per_s"]))
    r["perftest_put_bytes_per_s"] = median
    r["put_vs_perftest"] = r["put_bytes_per_s"] / median if r["put_bytes_per_s"] else None
    r["e2e_vs_perftest"] = r["wire_bytes_per_s"] / median
    if r.get("throughput_bytes_per_s"):
        r["throughput_vs_perftest"] = r["throughput_bytes_per_s"] / median


# ---------------------------------------------------------------------- the server role
def serve(host: str, port: int, pool_bytes: int, timeout: float,
          max_requests: int | None = None, device: str = "cpu") -> int:
    """Receive, verify and release messages until SIGTERM/SIGINT (or ``max_requests``) into
    a receive pool on ``device``. The signal handlers are restored on return."""
    from ..transfer import KVReceiver, TransferTimeout

    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    count = 0
    with KVReceiver(pool_bytes, host=host, port=port, timeout=timeout, device=device) as rx:
        old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            print(f"LISTENING {rx.host} {rx.port}", flush=True)
            while not stop and (max_requests is None or count < max_requests):
                try:
                    got = rx.recv(timeout=0.5)
                except TransferTimeout:
                    continue
                got.release()
                count += 1
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    print(f"served {count} messages", flush=True)
    return 0


# ---------------------------------------------------------------------- both roles here
class PeerFailed(RuntimeError):
    """A spawned side (or the shaped link between them) failed; the message says why in one
    line (plus the server's last words when it did not start). ``exit_code``: what the CLI
    returns (2 where the side rejected its arguments, else 1)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Lines:
    """Reads a child's text stream on a daemon thread, keeping its last ``keep`` lines (and
    queueing every line on ``lines``, then None at the end); ``sink`` (a stream) also gets
    them while :meth:`forward` is on."""

    def __init__(self, stream, keep: int = 20, sink=None) -> None:
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._sink, self._forwarding = sink, False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                with self._lock:
                    self.tail.append(line.rstrip())
                    if self._forwarding:
                        self._write(line)
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self.lines.put(None)

    def _write(self, line: str) -> None:
        try:
            self._sink.write(line)
            self._sink.flush()
        except (OSError, ValueError):
            pass

    def forward(self, on: bool = True) -> None:
        """Start (the lines kept so far first) or stop forwarding."""
        if self._sink is None or on == self._forwarding:
            return
        with self._lock:
            if on:
                for line in self.tail:
                    self._write(line + "\n")
            self._forwarding = on

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)


def _wait_listening(proc: subprocess.Popen, out: _Lines, err: _Lines,
                    timeout: float) -> tuple[str, int]:
    """The server's ``LISTENING host port``; PeerFailed with why (its exit code, the last lines
    it wrote to stdout and stderr) when it exits or stays silent for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    why = f"did not start within {timeout:g} s"
    while True:
        try:
            line = out.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:  # stdout closed: it exited (or is about to)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            why = f"exited with code {proc.returncode}" if proc.returncode is not None else \
                "closed its output"
            break
        if line.startswith("LISTENING"):
            _, host, port = line.split()
            return host, int(port)
    err.join(1.0)
    said = [s for s in (*out.tail, *err.tail) if s.strip()]
    last = "".join(f"\n  server: {s}" for s in said[-12:])
    code = 2 if proc.returncode == 2 else 1
    raise PeerFailed(f"the transfer server {why}{last}", code)


def run_pair(cli_args: list[str], *, pool_bytes: int, timeout: float, rate_bps: int | None,
             rows_path: Path, device: str = "cpu") -> None:
    """Spawn a server and a client process (inside a shaped veth link when ``rate_bps``),
    both with their pools on ``device``. Raises PeerFailed when either fails (or the link
    cannot be set up); on any exit, KeyboardInterrupt included, both are stopped first."""
    from ..transfer import auth
    from ..transfer.netshape import ShapedLink, signal_unwinds

    env = {**os.environ, "THUNDERKV_TRANSFER_TOKEN": auth.new_token()}
    base = module_argv("thunderkv.cli") + ["bench", "transfer"]
    server_argv = base + ["--role", "server", "--port", "0", "--pool-bytes", str(pool_bytes),
                          "--timeout", str(timeout), "--device", device]
    client_argv = base + cli_args + ["--rows-out", str(rows_path), "--device", device]
    # SIGTERM / SIGHUP (the terminal closed) unwind: the children, in their own process
    # groups, are still stopped and the namespaces deleted
    with signal_unwinds(signal.SIGTERM, signal.SIGHUP):
        if rate_bps is None:
            _run_pair(server_argv + ["--host", "127.0.0.1"], client_argv, env, None)
            return
        with contextlib.ExitStack() as stack:
            try:
                link = stack.enter_context(ShapedLink(rate_bps))
            except RuntimeError as exc:  # the link's own setup (it cleaned up)
                raise PeerFailed(f"cannot set up the shaped link: {str(exc).splitlines()[0]}") \
                    from None
            # Shared memory would bypass the link: force UCX onto TCP over the shaped veth.
            env.update(UCX_TLS="tcp")
            _run_pair(server_argv + ["--host", link.server_addr], client_argv, env, link)


def _spawn(argv: list[str], env: dict, **kw) -> subprocess.Popen:
    """A child in its own process group (a session): the terminal's Ctrl-C reaches only this
    process, which then stops the child and everything it started (:func:`_stop`)."""
    return subprocess.Popen(argv, env=env, start_new_session=True, **kw)


def _stop(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``grace`` seconds; also kills what
    is left of the group (e.g. a ``ucx_perftest`` the child started) once ``proc`` exited."""
    if proc is None:
        return

    def signal_group(sig) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    if proc.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            proc.wait()
    signal_group(signal.SIGKILL)  # leftovers in its group, if any


def _run_pair(server_argv, client_argv, env, link) -> None:
    s_env = dict(env, UCX_NET_DEVICES="tkv-s") if link else env
    c_env = dict(env, UCX_NET_DEVICES="tkv-c") if link else env
    s_cmd = link.command("server", server_argv) if link else server_argv
    server = client = err = None
    try:
        server = _spawn(s_cmd, s_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = _Lines(server.stdout)
        err = _Lines(server.stderr, sink=sys.stderr)
        host, port = _wait_listening(server, out, err, 60)
        err.forward()  # warnings of a running server still reach the terminal
        c_cmd = client_argv + ["--role", "client", "--host", host, "--port", str(port)]
        if link:
            c_cmd = link.command("client", c_cmd)
        client = _spawn(c_cmd, c_env)
        code = client.wait()
        if code != 0:
            why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise PeerFailed(f"the transfer client {why} (its output is above)",
                             2 if code == 2 else 1)
    finally:
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a 2nd Ctrl-C
        try:
            if err is not None:  # not its complaints about the client stopped first
                err.forward(False)
            _stop(client, 5)
            _stop(server, 10)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)


def pool_bytes_for(cases: list[tuple[str, int]], inflight: int = 1) -> int:
    """A receive pool holding the largest raw message twice per request in flight (plus
    slack)."""
    largest = max(geometry(m).raw_bytes(t) for m, t in cases)
    return 2 * inflight * largest + (16 << 20)


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def temp_rows_path() -> Path:
    fd, name = tempfile.mkstemp(prefix="tkv-transfer-", suffix=".jsonl")
    os.close(fd)
    return Path(name)


def plot(rows: list[dict], path: str | Path) -> None:
    """PNG of one bench run: per case, effective KV throughput raw vs 4-bit (speed-up on top);
    and for raw messages, our end to end and PUT-only GB/s against ``ucx_perftest`` (its
    runs' median, range as a whisker) when the run measured it. Needs matplotlib."""
    from thunderkv.plotting import pyplot

    plt = pyplot()

    cases = list(dict.fromkeys((r["model"], r["tokens"]) for r in rows))
    names = [f"{m}\n{t} tok" for m, t in cases]
    by = {(r["model"], r["tokens"], r["bits"]): r for r in rows}
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    raw = [by.get((m, t, 16)) for m, t in cases]
    baseline = any(r and r.get("perftest_put_bytes_per_s") for r in raw)
    fig, axes = plt.subplots(1, 2 if baseline else 1, figsize=(12 if baseline else 6.5, 4),
                             squeeze=False)
    ax, width = axes[0][0], 0.8 / len(bits)
    for i, b in enumerate(bits):
        xs = [k + (i - (len(bits) - 1) / 2) * width for k in range(len(cases))]
        got = [by.get((m, t, b)) for m, t in cases]
        bars = ax.bar(xs, [r["effective_kv_bytes_per_s"] / 1e9 if r else 0 for r in got], width,
                      label="raw 16-bit" if b >= 16 else f"{b}-bit")
        for bar, r in zip(bars, got):
            if r and b < 16 and r.get("speedup_vs_raw"):
                ax.annotate(f"{r['speedup_vs_raw']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(cases)), names, fontsize=8)
    ax.set_ylabel("effective KV GB/s (uncompressed bytes / s)")
    ax.set_title("KV delivered per second, one request per message")
    ax.legend(fontsize=8)
    if baseline:
        ax = axes[0][1]
        xs = [k for k, r in enumerate(raw) if r and r.get("perftest_put_bytes_per_s")]
        sel = [raw[k] for k in xs]
        for off, key, label in ((-0.27, "wire_bytes_per_s", "ours, end to end"),
                                (0.0, "put_bytes_per_s", "ours, PUT only")):
            ax.bar([x + off for x in xs], [(r[key] or 0) / 1e9 for r in sel], 0.27, label=label)
        med = [r["perftest_put_bytes_per_s"] / 1e9 for r in sel]
        runs = [r.get("perftest_runs_bytes_per_s") or [r["perftest_put_bytes_per_s"]] for r in sel]
        ax.bar([x + 0.27 for x in xs], med, 0.27, label="ucx_perftest put (median)",
               yerr=[[m - min(v) / 1e9 for m, v in zip(med, runs)],
                     [max(v) / 1e9 - m for m, v in zip(med, runs)]], capsize=3)
        for x, r in zip(xs, sel):
            ax.annotate(f"{r['e2e_vs_perftest']:.2f}", (x - 0.27, r["wire_bytes_per_s"] / 1e9),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [f"{names[k]}\n{sel[i]['payload_bytes'] / 1e6:.0f} MB"
                           for i, k in enumerate(xs)], fontsize=8)
        ax.set_ylabel("GB/s (1e9 bytes)")
        ax.set_title("raw path vs ucx_perftest (e2e/perftest on the bars)")
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"thunderkv bench transfer: {r0.get('link', '')}, "
                 f"{r0.get('transport', '')}, {r0.get('device', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
