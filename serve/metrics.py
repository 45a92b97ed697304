"""Prometheus text exposition of the router's counters and histograms (no client library)."""

from __future__ import annotations

import bisect
import collections
import threading

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Raw observations a histogram keeps for benchmark percentiles: the latest this many (a
# benchmark run has far fewer; a server running for weeks must not grow without bound).
MAX_SAMPLES = 100_000


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help, self.value = name, help_text, 0.0
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter",
                f"{self.name} {self.value:g}"]


class Gauge(Counter):
    def set(self, value: float) -> None:
        self.value = value

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge",
                f"{self.name} {self.value:g}"]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets=_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        # the latest MAX_SAMPLES observations, for percentiles in benchmarks
        self.samples: collections.deque[float] = collections.deque(maxlen=MAX_SAMPLES)
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.samples.append(value)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip(self.buckets, self.counts):
            total += count
            out.append(f'{self.name}_bucket{{le="{bound:g}"}} {total}')
        total += self.counts[-1]
        out += [f'{self.name}_bucket{{le="+Inf"}} {total}', f"{self.name}_sum {self.sum:g}",
                f"{self.name}_count {total}"]
        return out


class Metrics:
    """Everything ``GET /metrics`` shows."""

    def __init__(self) -> None:
        p = "thunderkv_"
        self.ttft_seconds = Histogram(p + "ttft_seconds", "time to first token")
        self.tpot_seconds = Histogram(p + "tpot_seconds", "time per output token after the first")
        self.prefill_seconds = Histogram(p + "prefill_seconds", "prefill compute per request")
        self.decode_step_seconds = Histogram(p + "decode_step_seconds", "one batched decode step")
        self.reschedule_seconds = Histogram(p + "reschedule_seconds",
                                            "live role changes (one per /admin/reschedule)")
        self.role_switch_seconds = Histogram(p + "role_switch_seconds",
                                             "a worker's switch to its new role (one per worker)")
        self.requests = Counter(p + "requests_total", "requests accepted")
        self.completed = Counter(p + "requests_completed_total", "requests finished")
        self.failed = Counter(p + "requests_failed_total", "requests given up")
        self.cancelled = Counter(p + "requests_cancelled_total", "requests cancelled by clients")
        self.restarts = Counter(p + "request_restarts_total", "re-prefills after a failure")
        self.worker_deaths = Counter(p + "worker_deaths_total", "worker processes lost")
        self.kv_bytes = Counter(p + "kv_bytes_sent_total", "KV bytes moved prefill -> decode")
        self.kv_transfer_seconds = Counter(p + "kv_transfer_seconds_total",
                                           "seconds spent in KV transfers")
        self.decode_batch = Gauge(p + "decode_batch_size", "sequences in the last decode step")
        self.decode_batches = Histogram(p + "decode_batch_sizes", "sequences per decode step",
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.transports: set[str] = set()

    def render(self, queues: dict[int, tuple[int, int]]) -> str:
        lines: list[str] = []
        for m in (self.ttft_seconds, self.tpot_seconds, self.prefill_seconds,
                  self.decode_step_seconds, self.reschedule_seconds, self.role_switch_seconds,
                  self.requests,
                  self.completed, self.failed, self.cancelled, self.restarts,
                  self.worker_deaths, self.kv_bytes, self.kv_transfer_seconds,
                  self.decode_batch, self.decode_batches):
            lines += m.render()
        lines += ["# HELP thunderkv_queue_length outstanding work per worker",
                  "# TYPE thunderkv_queue_length gauge"]
        for wid, (prefills, decodes) in sorted(queues.items()):
            lines.append(f'thunderkv_queue_length{{worker="{wid}",kind="prefill"}} {prefills}')
            lines.append(f'thunderkv_queue_length{{worker="{wid}",kind="decode"}} {decodes}')
        lines += ["# HELP thunderkv_kv_transport UCX transports that carried KV",
                  "# TYPE thunderkv_kv_transport gauge"]
        lines += [f'thunderkv_kv_transport{{transport="{t}"}} 1' for t in sorted(self.transports)]
        return "\n".join(lines) + "\n"
