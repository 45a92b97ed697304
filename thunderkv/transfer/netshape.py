"""A rate-limited virtual link between two network namespaces, for transfer tests.

``ShapedLink`` builds two throwaway network namespaces joined by a veth pair and shapes both
directions with a ``tbf`` qdisc, so a server and a client started inside them talk over a link
of known bandwidth (optionally with extra one-way delay via ``netem``). Nothing is done to the
host's own interfaces or routes: the veth pair is created directly inside the namespaces, and
deleting a namespace removes its end of the pair (and with it the peer).

Needs root (or CAP_NET_ADMIN) and the iproute2 ``ip`` and ``tc`` binaries;
``shaping_unavailable_reason()`` says why it cannot work on a given machine. Stdlib only.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator

__all__ = ["ShapedLink", "parse_rate", "shaping_unavailable_reason", "signal_unwinds",
           "sigterm_unwinds"]

_CAP_NET_ADMIN = 12
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kmgt]?)(bit|bps)?\s*$", re.I)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}

_counter = itertools.count()
_live_namespaces: set[str] = set()  # created and not yet deleted; swept at interpreter exit


@contextlib.contextmanager
def signal_unwinds(*signums: int) -> Iterator[None]:
    """Inside: each of ``signums`` raises ``SystemExit(128 + signum)`` in the main thread
    instead of killing the process on the spot, so ``with ShapedLink`` and ``finally`` blocks
    still delete the namespaces, stop child processes and remove temporary files. No-op off
    the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, _exit) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def sigterm_unwinds() -> contextlib.AbstractContextManager[None]:
    """:func:`signal_unwinds` for SIGTERM (``SystemExit(143)``)."""
    return signal_unwinds(signal.SIGTERM)


def _tool(name: str) -> str | None:
    """Full path of an iproute2 binary, also looking in sbin dirs missing from a user's PATH."""
    return shutil.which(name, path=_SBIN_PATH)


def _run(argv: list[str], timeout: float = 10.0) -> None:
    """Run one setup/teardown command; raise RuntimeError naming it and its stderr on failure."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise RuntimeError(f"{' '.join(argv)}: {err}")


def _delete_namespace(ns: str) -> None:
    """Delete a namespace we created (and so its veth end); never raises."""
    try:
        _run([_tool("ip") or "ip", "netns", "delete", ns])
    except RuntimeError:
        pass
    _live_namespaces.discard(ns)


@atexit.register
def _sweep_namespaces() -> None:
    for ns in list(_live_namespaces):
        _delete_namespace(ns)


def _has_net_admin() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


@functools.lru_cache(maxsize=1)
def shaping_unavailable_reason() -> str | None:
    """Why ``ShapedLink`` cannot work here, as one line; None when it can.

    Checks for root/CAP_NET_ADMIN and the ``ip``/``tc`` binaries, then really tries it: adds a
    uniquely named throwaway namespace, puts a veth pair with a ``tbf`` qdisc in it, and deletes
    it again. The answer is cached for the life of the process.
    """
    if not _has_net_admin():
        return "network shaping needs root or CAP_NET_ADMIN"
    for name in ("ip", "tc"):
        if _tool(name) is None:
            return f"iproute2 '{name}' binary not found"
    ip, tc = _tool("ip"), _tool("tc")
    probe = f"tkvprobe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _run([ip, "netns", "add", probe])
    except RuntimeError as exc:
        return f"network namespaces not permitted here ({_short(exc)})"
    try:
        _run([ip, "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        _run([tc, "-n", probe, "qdisc", "add", "dev", "p0", "root", "tbf",
              "rate", "1mbit", "burst", "32kb", "latency", "50ms"])
    except RuntimeError as exc:
        return f"veth/tbf not available in a namespace ({_short(exc)})"
    finally:
        _delete_namespace(probe)
    return None


def _short(exc: Exception) -> str:
    """'ip netns add: <error>' from a RuntimeError raised by _run (drops paths and args)."""
    cmd, _, err = str(exc).partition(": ")
    words = cmd.split()
    return f"{os.path.basename(words[0])} {' '.join(words[1:3])}: {err}" if words else str(exc)


def parse_rate(text: str) -> int:
    """Bits per second from a tc-style rate: "100mbit", "5Gbit", "2.5gbit", "500kbit", "1000000".

    Units are decimal (k = 1e3, m = 1e6, g = 1e9, t = 1e12) and case-insensitive; a bare number
    is bit/s; a trailing "bps" means *bytes* per second, as in tc. Raises ValueError on anything
    else or on a rate that is not positive.
    """
    m = _RATE_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"invalid rate {text!r}: expected e.g. '100mbit', '2.5gbit' or '1000000'")
    number, prefix, unit = m.groups()
    bps = float(number) * _UNITS[prefix.lower()] * (8 if (unit or "").lower() == "bps" else 1)
    if not bps >= 1:
        raise ValueError(f"invalid rate {text!r}: must be at least 1 bit/s")
    return round(bps)


class ShapedLink:
    """Two network namespaces joined by a veth pair shaped to ``rate_bps`` in both directions.

    Use as a context manager::

        with ShapedLink(parse_rate("100mbit")) as link:
            srv = subprocess.Popen(link.command("server", [sys.executable, "server.py"]))
            ...  # clients connect to link.server_addr from link.command("client", ...)

    Each direction's egress gets ``tbf rate <rate_bps>bit``. With ``delay_ms > 0`` each egress
    instead gets ``netem delay <delay_ms>ms`` at the root with the tbf as its child, so the
    round trip grows by about ``2 * delay_ms``; this needs the kernel's sch_netem, and without it
    entering raises RuntimeError (and cleans up). Both namespaces are deleted on exit, on an
    exception during setup, and as a last resort at interpreter exit.

    Attributes: ``server_ns``, ``client_ns`` (namespace names), ``server_addr``, ``client_addr``
    (IPv4 addresses on the shared /30), ``rate_bps``, ``delay_ms``.
    """

    def __init__(self, rate_bps: int, *, delay_ms: float = 0.0, name_prefix: str = "tkv",
                 control_link: bool = False) -> None:
        if int(rate_bps) <= 0:
            raise ValueError(f"rate_bps must be positive, got {rate_bps!r}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms!r}")
        self.rate_bps = int(rate_bps)
        self.delay_ms = float(delay_ms)
        n = next(_counter)
        tag = f"{name_prefix}-{os.getpid()}-{n}-{uuid.uuid4().hex[:6]}"
        self.server_ns = f"{tag}-s"
        self.client_ns = f"{tag}-c"
        # The namespaces are private, so addresses cannot clash with the host or with other
        # links; still, give concurrent links different /30s so logs and captures stay readable.
        x = (os.getpid() + n) % 256
        self.server_addr = f"10.213.{x}.1"
        self.client_addr = f"10.213.{x}.2"
        # control_link: a second, unshaped veth pair (tkc-s/tkc-c) for control traffic that
        # must not queue behind the bulk data on the shaped one (a serving router's messages).
        self.control_link = control_link
        self.server_control_addr = f"10.214.{x}.1" if control_link else None
        self.client_control_addr = f"10.214.{x}.2" if control_link else None
        self._created: list[str] = []

    def command(self, role: str, argv: list[str]) -> list[str]:
        """``argv`` prefixed with ``ip netns exec <ns>`` for role "server" or "client"."""
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', got {role!r}")
        ns = self.server_ns if role == "server" else self.client_ns
        return [_tool("ip") or "ip", "netns", "exec", ns, *argv]

    def __enter__(self) -> ShapedLink:
        reason = shaping_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the namespaces (and with them the veth pair); safe to call twice."""
        while self._created:
            _delete_namespace(self._created.pop())

    def _setup(self) -> None:
        ip, tc = _tool("ip"), _tool("tc")
        for ns in (self.server_ns, self.client_ns):
            _run([ip, "netns", "add", ns])
            self._created.append(ns)
            _live_namespaces.add(ns)
        # Create the pair inside the server namespace with its peer born in the client one,
        # so it never exists in (or clashes with names in) the host namespace.
        _run([ip, "-n", self.server_ns, "link", "add", "tkv-s", "type", "veth",
              "peer", "name", "tkv-c", "netns", self.client_ns])
        for ns, dev, addr in ((self.server_ns, "tkv-s", self.server_addr),
                              (self.client_ns, "tkv-c", self.client_addr)):
            _run([ip, "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            _run([ip, "-n", ns, "link", "set", "lo", "up"])
            _run([ip, "-n", ns, "link", "set", dev, "up"])
            self._shape(tc, ns, dev)
        if self.control_link:
            _run([ip, "-n", self.server_ns, "link", "add", "tkc-s", "type", "veth",
                  "peer", "name", "tkc-c", "netns", self.client_ns])
            for ns, dev, addr in ((self.server_ns, "tkc-s", self.server_control_addr),
                                  (self.client_ns, "tkc-c", self.client_control_addr)):
                _run([ip, "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
                _run([ip, "-n", ns, "link", "set", dev, "up"])

    def _shape(self, tc: str, ns: str, dev: str) -> None:
        # tc-tbf(8): the bucket must hold at least one timer tick of traffic (rate / HZ bytes)
        # or the rate cannot be reached. Size it for HZ=100, the coarsest common tick, i.e.
        # 10 ms of traffic, with a 64 KiB floor so a full-size GSO/TSO segment from veth still
        # fits in one go at low rates. Worst case the bucket lets that much pass at line rate.
        burst = max(self.rate_bps // 8 // 100, 64 * 1024)
        # 'latency' bounds how long a packet may queue (tbf derives its byte limit from it);
        # 50 ms of buffering is plenty for TCP to fill the link without huge bufferbloat.
        tbf = ["tbf", "rate", f"{self.rate_bps}bit", "burst", str(burst), "latency", "50ms"]
        base = [tc, "-n", ns, "qdisc", "add", "dev", dev]
        if self.delay_ms > 0:
            _run([*base, "root", "handle", "1:", "netem", "delay", f"{self.delay_ms}ms"])
            _run([*base, "parent", "1:1", "handle", "10:", *tbf])
        else:
            _run([*base, "root", *tbf])

    def __repr__(self) -> str:
        return (f"ShapedLink(rate_bps={self.rate_bps}, delay_ms={self.delay_ms}, "
                f"server={self.server_ns}:{self.server_addr}, "
                f"client={self.client_ns}:{self.client_addr})")
