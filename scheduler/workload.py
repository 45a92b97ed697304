"""Workloads (request lengths + arrival times) and SLOs.

Sources: an Azure LLM inference trace CSV as published (columns ``TIMESTAMP, ContextTokens,
GeneratedTokens``; Patel et al., "Splitwise", ISCA 2024, CC-BY 4.0), replayed with its own
arrival times (optionally rescaled to a rate) or with Poisson arrivals; or synthetic lengths.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import InputError
from .yamlio import decode_utf8

REQUIRED_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MAX_REPLAY_REQUESTS = 2_000_000  # ~10x a 320-GPU plan's 800 s replay


@dataclass(slots=True)
class Workload:
    """Requests as parallel arrays: arrival seconds (sorted), prompt and output token counts.

    ``min_replay_s``: a replay at ``rate`` (:meth:`arrivals_at`) covers at least this many
    seconds of arrivals, cycling the requests when there are too few. A short replay hides
    overload: at a rate just above a plan's capacity the queue grows by only
    (rate - capacity) x span requests, and with long outputs a decode queue's wait is spread
    over hundreds of tokens' TPOT, so a 100 s replay passes rates that no longer meet the SLO
    in a steady state.
    """

    arrivals: np.ndarray
    prompts: np.ndarray
    outputs: np.ndarray
    name: str = "workload"
    min_replay_s: float = 0.0

    def __post_init__(self) -> None:
        self.arrivals = np.asarray(self.arrivals, dtype=np.float64)
        self.prompts = np.asarray(self.prompts, dtype=np.int64)
        self.outputs = np.asarray(self.outputs, dtype=np.int64)
        n = len(self.prompts)
        if not (len(self.arrivals) == n == len(self.outputs)):
            raise ValueError("arrivals, prompts and outputs must have the same length")
        if n == 0:
            raise ValueError("workload has no requests")
        if (self.prompts < 1).any() or (self.outputs < 1).any():
            raise ValueError("prompt and output lengths must be >= 1")
        if not np.isfinite(self.arrivals).all():
            raise ValueError("arrival times must be finite")
        if (np.diff(self.arrivals) < 0).any():
            raise ValueError("arrivals must be sorted")
        if not self.min_replay_s >= 0:
            raise ValueError(f"min_replay_s must be >= 0, got {self.min_replay_s}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def rate(self) -> float:
        """Mean arrival rate (req/s) of the current arrival times."""
        span = float(self.arrivals[-1] - self.arrivals[0])
        return (len(self) - 1) / span if span > 0 else float("inf")

    def _like(self, arrivals: np.ndarray, prompts: np.ndarray | None = None,
              outputs: np.ndarray | None = None) -> Workload:
        return Workload(arrivals, self.prompts if prompts is None else prompts,
                        self.outputs if outputs is None else outputs, self.name, self.min_replay_s)

    def head(self, n: int) -> Workload:
        return self._like(self.arrivals[:n], self.prompts[:n], self.outputs[:n])

    def cycled(self, n: int) -> Workload:
        """The requests repeated in order up to ``n`` (>= len) requests; each repeat's arrivals
        continue after the previous one's with the same gaps (its first gap: the mean gap)."""
        m = len(self)
        if n <= m:
            return self
        reps = -(-n // m)
        gaps = np.diff(self.arrivals, prepend=self.arrivals[0])
        gaps[0] = (self.arrivals[-1] - self.arrivals[0]) / max(m - 1, 1)
        arr = np.concatenate([[0.0], np.cumsum(np.tile(gaps, reps)[1:n])])
        return self._like(arr, np.tile(self.prompts, reps)[:n], np.tile(self.outputs, reps)[:n])

    def with_poisson(self, rate: float, seed: int = 0) -> Workload:
        """Same lengths, Poisson arrivals at ``rate`` req/s (seeded)."""
        if rate <= 0:
            raise ValueError("rate must be > 0")
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(self))
        arr = np.cumsum(gaps) - gaps[0]
        return self._like(arr)

    def with_rate(self, rate: float) -> Workload:
        """Same lengths and the trace's own inter-arrival pattern, time-scaled to ``rate``."""
        if rate <= 0:
            raise ValueError("rate must be > 0")
        base = self.arrivals - self.arrivals[0]
        self.check_arrivals("trace")
        own = self.rate
        return self._like(base * (own / rate))

    def check_arrivals(self, mode: str) -> None:
        """Raise ValueError unless replays with arrival ``mode`` are possible: ``"trace"``
        scales the trace's own pattern, which needs arrivals spread over some time."""
        if mode not in ("poisson", "trace"):
            raise ValueError(f"arrival mode must be 'poisson' or 'trace', got {mode!r}")
        if mode == "trace" and not np.isfinite(self.rate):
            raise ValueError(f"workload {self.name!r}: all {len(self)} arrival time(s) are the "
                             "same instant, so its own arrival pattern has no rate to scale; "
                             "use Poisson arrivals (--arrivals poisson)")

    def arrivals_at(self, rate: float, mode: str = "poisson", seed: int = 0) -> Workload:
        """The workload replayed at ``rate`` req/s: Poisson arrivals (seeded) or the trace's own
        pattern time-scaled; cycled (:meth:`cycled`) to span at least ``min_replay_s``, but to
        no more than :data:`MAX_REPLAY_REQUESTS` requests (a goodput search brackets upward by
        1.5x steps, and a replay's memory and time grow with its length)."""
        self.check_arrivals(mode)
        if rate <= 0:
            raise ValueError("rate must be > 0")
        want = min(rate * self.min_replay_s, MAX_REPLAY_REQUESTS - 1)
        wl = self.cycled(int(np.ceil(want)) + 1)
        return wl.with_poisson(rate, seed) if mode == "poisson" else wl.with_rate(rate)

    def stats(self) -> dict[str, float]:
        return {"requests": len(self), "prompt_mean": float(self.prompts.mean()),
                "output_mean": float(self.outputs.mean()), "rate": self.rate}


@dataclass(slots=True, frozen=True)
class SLO:
    """Deadlines: time to first token and time per output token, seconds."""

    ttft: float
    tpot: float

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tpot > 0):
            raise ValueError(f"SLO deadlines must be > 0, got ttft={self.ttft} tpot={self.tpot}")

    def scaled(self, k: float) -> SLO:
        return SLO(self.ttft * k, self.tpot * k)


_TIMESTAMP = re.compile(r"(?P<base>[^.]+?)(?:\.(?P<frac>\d+))?"
                        r"(?:(?P<utc>Z)|(?P<sign>[+-])(?P<hh>\d\d)(?::?(?P<mm>\d\d))?)?")


def _parse_ts(text: str) -> float:
    """Seconds since epoch of ``2023-11-16 18:15:46.6805900`` (any number of fractional
    digits; Python's datetime takes at most 6), optionally with a UTC offset (``Z``,
    ``+05:00``, ``+0500``, ``+05``). A time without an offset is read as UTC, not local time,
    so a trace never jumps at a daylight-saving change of the machine replaying it.
    ValueError if malformed."""
    text = text.strip()
    base, dot, frac = text.partition(".")
    if dot and frac.isdigit():  # the published form (no offset): the fast path
        when = datetime.fromisoformat(base)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp() + float("0." + frac)
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        raise ValueError(f"bad timestamp {text!r}")
    when = datetime.fromisoformat(m["base"])  # Python 3.10 parses neither Z nor +0500
    if when.tzinfo is None:
        hours, minutes = int(m["hh"] or 0), int(m["mm"] or 0)
        if hours > 23 or minutes > 59:
            raise ValueError(f"bad UTC offset in {text!r}")
        offset = timedelta(hours=hours, minutes=minutes)
        when = when.replace(tzinfo=timezone(-offset if m["sign"] == "-" else offset))
    elif m["utc"] or m["sign"]:
        raise ValueError(f"two UTC offsets in {text!r}")
    return when.timestamp() + (float("0." + m["frac"]) if m["frac"] else 0.0)


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")  # what open(newline="") splits on


def _text_lines(fh: BinaryIO, source: str) -> Iterator[str]:
    """The lines of a binary file as UTF-8 text (a spreadsheet's byte order mark dropped); an
    :class:`InputError` names the line of a byte that is not UTF-8. Lines end in \\n, \\r\\n
    or a lone \\r (old Mac files; binary reads split on \\n alone), nothing else (a form feed
    or U+2028 inside a field stays there, as csv reads it)."""
    line = 1
    for raw in fh:
        lines = _LINE.findall(decode_utf8(raw, source, line, bom=line == 1))
        yield from lines
        line += len(lines)


def load_azure_trace(path: str | Path, limit: int | None = None) -> Workload:
    """Read an Azure LLM inference trace CSV as published (header line + one request per line)."""
    src = str(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", source=src) from exc
    ts, pr, out = [], [], []
    with fh:
        reader = csv.reader(_text_lines(fh, src))
        header = next(reader, None)
        if header is None:
            raise InputError("file is empty", source=src, line=1)
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise InputError(f"missing column(s) {missing}; header is {header}", source=src,
                             line=1, field="header")
        idx = [header.index(c) for c in REQUIRED_COLUMNS]
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise InputError(f"expected {len(header)} columns, got {len(row)}", source=src,
                                 line=line)
            vals = [row[i] for i in idx]
            try:
                t = _parse_ts(vals[0])
                if t != t:
                    raise ValueError
            except ValueError:
                raise InputError(f"bad timestamp {vals[0]!r}", source=src, line=line,
                                 field="TIMESTAMP") from None
            for col, v, dst in ((REQUIRED_COLUMNS[1], vals[1], pr), (REQUIRED_COLUMNS[2], vals[2], out)):
                try:
                    n = int(v)
                except ValueError:
                    n = -1
                if n < 1:
                    raise InputError(f"expected a positive integer, got {v!r}", source=src,
                                     line=line, field=col)
                dst.append(n)
            ts.append(t)
            if limit is not None and len(ts) >= limit:
                break
    if not ts:
        raise InputError("no requests in trace", source=src, line=2)
    t = np.asarray(ts)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return Workload(t, np.asarray(pr)[order], np.asarray(out)[order], Path(src).stem)


def _lognormal_ints(rng: np.random.Generator, mean: float, sigma: float, n: int,
                    lo: int, hi: int) -> np.ndarray:
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(np.int64)


SYNTHETIC = {
    # name: (prompt mean, prompt sigma, output mean, output sigma, prompt max, output max)
    "coding": (2048, 0.5, 28, 0.8, 8192, 512),       # long prompts, short outputs
    "conversation": (1155, 0.8, 211, 1.0, 14050, 1000),  # matches the Azure conv trace means
}


def synthetic(kind: str, n: int = 2000, rate: float = 1.0, seed: int = 0) -> Workload:
    """Synthetic lognormal lengths (``coding`` or ``conversation``) with Poisson arrivals."""
    if kind not in SYNTHETIC:
        raise InputError(f"unknown synthetic workload {kind!r}; choose from {sorted(SYNTHETIC)}",
                         source="--workload")
    pm, ps, om, osg, pmax, omax = SYNTHETIC[kind]
    rng = np.random.default_rng(seed)
    prompts = _lognormal_ints(rng, pm, ps, n, 16, pmax)
    outputs = _lognormal_ints(rng, om, osg, n, 2, omax)
    return Workload(np.zeros(n), prompts, outputs, kind).with_poisson(rate, seed)
