"""Thin wrappers around the UCX command-line tools shipped in the ``libucx`` wheel.

The ``libucx`` PyPI package (e.g. ``libucx-cu13``) ships ``bin/ucx_info`` and
``bin/ucx_perftest`` next to ``lib/libucp.so.0``.  The binaries are not RPATH'd to that
directory, so they only run with ``LD_LIBRARY_PATH=<libucx>/lib``; :func:`ucx_env` builds that
environment (``libucx.load_library()`` only helps the current process, not subprocesses).

Everything here is stdlib-only and degrades gracefully: without UCX, :func:`ucx_info_devices`
returns ``[]`` and :func:`ucx_version` returns ``None``.

Numbers printed by ``ucx_perftest``: the "bandwidth (MB/s)" columns are in MiB/s (the source
divides by ``1024.0 * 1024.0``); "average" is the moment average over the last report interval
(about one second) and "overall" is the total average over the whole measured run.  Note that
the UCP perftest allocates its buffers with ``ucp_mem_map(UCP_MEM_MAP_ALLOCATE)`` and reuses one
buffer per side, so with ``posix``/``sysv`` in ``UCX_TLS`` the target buffer is shared memory and
a put becomes a plain ``memcpy`` (protocol "short"), which user-registered memory would not get.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

__all__ = [
    "MIB",
    "default_iterations",
    "parse_perftest_final",
    "parse_proto_info",
    "parse_ucx_info_devices",
    "parse_ucx_version",
    "run_perftest_put_bw",
    "ucx_binary",
    "ucx_env",
    "ucx_home",
    "ucx_info_devices",
    "ucx_version",
]

MIB = 1 << 20
"""ucx_perftest's "MB" (bytes per MB in its bandwidth columns)."""

_TAIL_CHARS = 4000


# --------------------------------------------------------------------------- locating UCX


def ucx_home() -> Path | None:
    """Return the directory of the installed ``libucx`` package, or None if it is missing."""
    try:
        spec = importlib.util.find_spec("libucx")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


def ucx_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return a copy of ``base`` (default: ``os.environ``) that lets the shipped binaries run.

    ``<libucx>/lib`` is prepended to ``LD_LIBRARY_PATH`` (unless already present).  Without
    ``libucx`` installed the copy is returned unchanged.
    """
    env = dict(os.environ if base is None else base)
    home = ucx_home()
    if home is None:
        return env
    lib = str(home / "lib")
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if lib not in parts:
        parts.insert(0, lib)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    return env


def ucx_binary(name: str) -> Path | None:
    """Path of a UCX tool (``ucx_info``, ``ucx_perftest``): the wheel's copy, else ``$PATH``."""
    home = ucx_home()
    if home is not None:
        cand = home / "bin" / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which(name)
    return Path(found) if found else None


def _tail(text: str, n: int = _TAIL_CHARS) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _run_tool(args: list[str], timeout: float) -> str:
    """Run a UCX tool and return stdout; RuntimeError (with stderr) on failure or timeout."""
    try:
        proc = subprocess.run(
            args, env=ucx_env(), capture_output=True, text=True, errors="replace", timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise RuntimeError(
            f"{' '.join(args)} timed out after {timeout}s: {_tail(err or '')}"
        ) from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed with exit code {proc.returncode}:\n"
            f"{_tail(proc.stderr or proc.stdout)}"
        )
    return proc.stdout


# --------------------------------------------------------------------------- ucx_info

_INFO_KEY_RE = re.compile(
    r"^#?\s*(Memory domain|Component|Connection manager|Transport|Device|Type|System device):"
    r"\s*(.*?)\s*$"
)


def parse_ucx_info_devices(text: str) -> list[dict[str, str | None]]:
    """Parse ``ucx_info -d`` output into one dict per (transport, device) pair.

    Each entry has ``transport``, ``device``, ``component``, ``memory_domain``, ``type``
    (e.g. ``network``, ``intra-node``, ``loopback``) and ``system_device``; fields the output
    does not give are None.  "Memory domain"/"Component" headers apply to the transports that
    follow them; "Connection manager" blocks (no transports) are skipped.
    """
    entries: list[dict[str, str | None]] = []
    md: str | None = None
    component: str | None = None
    cur: dict[str, str | None] | None = None
    for line in text.splitlines():
        m = _INFO_KEY_RE.match(line)
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        if key == "Memory domain":
            md, cur = value, None
        elif key == "Component":
            component = value
        elif key == "Connection manager":
            md = component = cur = None
        elif key == "Transport":
            cur = {
                "transport": value,
                "device": None,
                "component": component,
                "memory_domain": md,
                "type": None,
                "system_device": None,
            }
            entries.append(cur)
        elif cur is not None:
            field = {"Device": "device", "Type": "type", "System device": "system_device"}[key]
            if cur[field] is None:
                cur[field] = value
    return entries


def ucx_info_devices(timeout: float = 20) -> list[dict[str, str | None]]:
    """Run ``ucx_info -d`` and return :func:`parse_ucx_info_devices` of its output.

    Returns ``[]`` when UCX is not installed; raises RuntimeError (with stderr) when the
    binary fails or times out.
    """
    exe = ucx_binary("ucx_info")
    if exe is None:
        return []
    return parse_ucx_info_devices(_run_tool([str(exe), "-d"], timeout))


def parse_ucx_version(text: str) -> str | None:
    """Extract the version from ``ucx_info -v`` output (``# Library version: 1.22.0``)."""
    for pat in (r"Library version:\s*(\S+)", r"UC[TPS] version\s*=\s*(\S+)"):
        m = re.search(pat, text)
        if m:
            return m.group(1)
    return None


def ucx_version(timeout: float = 20) -> str | None:
    """Return the UCX library version (``ucx_info -v``), or None when UCX is not installed."""
    exe = ucx_binary("ucx_info")
    if exe is None:
        return None
    return parse_ucx_version(_run_tool([str(exe), "-v"], timeout))


# --------------------------------------------------------------------------- perftest parsing

_NUM = r"[-+]?(?:[\d,]+(?:\.\d*)?|\.\d+|inf|nan)"
_FINAL_RE = re.compile(rf"^\s*Final:\s+((?:{_NUM}\s*)+)$", re.IGNORECASE)
_LOG_PREFIX_RE = re.compile(r"^\s*\[[^\]]*\]\s*\[[^\]]*\]\s*")
_RANGE_RE = re.compile(r"^(\d+(?:\.\d+)?[KMGTP]?)\s*\.\.\s*(\d+(?:\.\d+)?[KMGTP]?|inf)$", re.I)
_TL_DEV_RE = re.compile(r"([A-Za-z][\w]*)/([\w:.\-]+)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_perftest_final(text: str) -> dict[str, float]:
    """Parse the last ``Final:`` row of a ucx_perftest bandwidth/overhead table.

    Columns (UCX 1.x): iterations, overhead 50%ile / average / overall (usec),
    bandwidth average / overall (MB/s, MB = 2**20 bytes), message rate average / overall.
    Returns ``iterations``, ``overhead_us_p50``, ``overhead_us_avg``, ``overhead_us_overall``,
    ``bandwidth_mib_s_avg``, ``bandwidth_mib_s_overall``, ``msg_rate_avg``,
    ``msg_rate_overall``, ``bandwidth_bytes_per_s`` (= overall column * 2**20).
    Raises ValueError when no well-formed ``Final:`` row is present.
    """
    rows = [m.group(1) for line in text.splitlines() if (m := _FINAL_RE.match(line))]
    if not rows:
        raise ValueError("no 'Final:' result row in ucx_perftest output")
    nums = [float(tok.replace(",", "")) for tok in rows[-1].split()]
    if len(nums) != 8:
        raise ValueError(f"unexpected 'Final:' row with {len(nums)} columns: {rows[-1]!r}")
    keys = (
        "iterations",
        "overhead_us_p50",
        "overhead_us_avg",
        "overhead_us_overall",
        "bandwidth_mib_s_avg",
        "bandwidth_mib_s_overall",
        "msg_rate_avg",
        "msg_rate_overall",
    )
    out = dict(zip(keys, nums))
    out["bandwidth_bytes_per_s"] = out["bandwidth_mib_s_overall"] * MIB
    return out


def _parse_size(tok: str) -> float:
    tok = tok.strip()
    if tok.lower() == "inf":
        return float("inf")
    unit = tok[-1].upper() if tok[-1].isalpha() else ""
    num = tok[:-1] if unit else tok
    return float(num) * _UNITS[unit]


def parse_proto_info(text: str) -> list[dict[str, Any]]:
    """Parse the ``UCX_PROTO_INFO=y`` protocol-selection tables from UCX log output.

    Each table looks like::

        | perftest intra-node cfg#0                                |
        | remote memory write by ucp_put* from host memory to host |
        |   Range   | Description |             Config             |
        |   0..4434 | short       | sysv/memory                    |
        | 4435..inf | zero-copy   | cma/memory                     |

    Returns one dict per row: ``operation`` (the title, e.g. "remote memory write by
    ucp_put*(multi) from host memory to host"), ``min_bytes``/``max_bytes`` (inclusive, max may
    be ``inf``), ``description`` (protocol, e.g. "zero-copy"), ``config`` (raw) and
    ``transports`` (list of ``tl/device`` strings found in the config).
    """
    rows: list[dict[str, Any]] = []
    title: str | None = None
    for raw in text.splitlines():
        line = _LOG_PREFIX_RE.sub("", raw).strip()
        if not (line.startswith("|") and line.endswith("|")) or len(line) < 2:
            continue
        cells = [c.strip() for c in line[1:-1].split("|")]
        if len(cells) == 1:
            if " by " in cells[0] or " from " in cells[0]:
                title = cells[0]
            continue
        if len(cells) < 3:
            continue
        m = _RANGE_RE.match(cells[0])
        if not m:
            continue
        config = cells[-1]
        rows.append(
            {
                "operation": title,
                "min_bytes": _parse_size(m.group(1)),
                "max_bytes": _parse_size(m.group(2)),
                "description": " ".join(cells[1:-1]),
                "config": config,
                "transports": [f"{a}/{b}" for a, b in _TL_DEV_RE.findall(config)],
            }
        )
    return rows


def _put_selection(text: str, message_bytes: int) -> tuple[str | None, list[dict[str, Any]]]:
    """Transport(s) UCX chose for a ``message_bytes`` put, and all matching protocol rows."""
    rows = [
        r
        for r in parse_proto_info(text)
        if r["operation"]
        and "ucp_put" in r["operation"]
        and r["min_bytes"] <= message_bytes <= r["max_bytes"]
    ]
    if not rows:
        return None, []

    # Bandwidth tests keep many puts in flight: prefer the "(multi)" table, then plain ucp_put*.
    def rank(r: dict[str, Any]) -> int:
        op = r["operation"]
        return 0 if "(multi)" in op else (1 if "ucp_put* " in op else 2)

    best = min(rows, key=rank)
    tls = list(dict.fromkeys(t.split("/", 1)[0] for t in best["transports"]))
    return (",".join(tls) or None), rows


# --------------------------------------------------------------------------- perftest runner


def default_iterations(message_bytes: int) -> int:
    """Iterations for about one second of puts: 4 GiB moved, clamped to [5, 200000]."""
    return int(max(5, min(200_000, (4 << 30) // max(1, message_bytes))))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _listening(port: int, pid: int | None = None) -> bool | None:
    """Whether a TCP socket listens on ``port`` (owned by ``pid`` if given), via /proc.

    Returns None where /proc/net/tcp is unavailable.  Ownership is checked by matching the
    socket inode against ``/proc/<pid>/fd`` (skipped if that directory cannot be read), so a
    foreign listener on the same port is not mistaken for our server.
    """
    inodes: set[str] = set()
    seen_file = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        seen_file = True
        for ln in lines:
            parts = ln.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not seen_file:
        return None
    if not inodes or pid is None:
        return bool(inodes)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _kill(proc: subprocess.Popen | None) -> None:
    """SIGKILL the process group started for ``proc`` (its own session) and reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _read(f: IO[bytes]) -> str:
    f.flush()
    f.seek(0)
    return f.read().decode(errors="replace")


def _spawn(args: list[str], env: dict[str, str], out: IO[bytes]) -> subprocess.Popen:
    # Line-buffer stdout when coreutils' stdbuf exists, so a killed process still leaves its
    # output behind for the error message (stdbuf execs the tool: same pid / process group).
    stdbuf = shutil.which("stdbuf")
    return subprocess.Popen(
        [stdbuf, "-oL", *args] if stdbuf else args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_perftest_put_bw(
    message_bytes: int,
    *,
    transports: str | None = None,
    iterations: int | None = None,
    timeout: float = 60,
    port: int | None = None,
    memory: str | None = None,
    gpu: int | None = None,
) -> dict[str, Any]:
    """Measure UCP put bandwidth between two ``ucx_perftest`` processes on 127.0.0.1.

    Starts ``ucx_perftest -p PORT`` (server) and ``ucx_perftest 127.0.0.1 -p PORT -t ucp_put_bw
    -s MESSAGE_BYTES -n ITERS -w WARMUP`` (client), both with ``UCX_PROTO_INFO=y`` (so the
    client logs which protocol/transport UCP selected) and ``UCX_TLS=transports`` if given.
    Note UCP needs an active-message capable transport to wire up, so ``transports="cma"``
    alone fails ("no active messages transport"); use e.g. ``"cma,tcp"`` or ``"cma,sysv"``.

    Args:
        message_bytes: size of each put.
        transports: value for ``UCX_TLS`` (None: UCX default selection).
        iterations: measured puts; default :func:`default_iterations` (about 1 s of traffic).
        timeout: wall-clock seconds for the whole run; both processes are killed after it.
        port: TCP port for the perftest rendezvous; default a free one (retried on clash).
        memory: UCX memory type of both buffers (``-m``, e.g. ``"cuda"``); default host.
        gpu: CUDA device index (as torch numbers them) for ``memory="cuda"``: perftest uses
            the first visible GPU, so both processes see only that one.

    Returns:
        dict with ``message_bytes``, ``iterations``, ``bandwidth_bytes_per_s`` (the "overall"
        bandwidth column, i.e. bytes over the whole measured run, MB = 2**20),
        ``transports_requested``, ``transport_used`` (comma-joined UCT transport names from
        the protocol table covering ``message_bytes``, or None if UCX printed none),
        ``protocols`` (matching :func:`parse_proto_info` rows), ``result`` (all
        :func:`parse_perftest_final` columns), ``command`` (client argv) and
        ``raw_output_tail`` (end of the client's output).

    Raises:
        RuntimeError: UCX missing, a process failed or timed out, or no result row; the message
            carries the tail of both processes' output.
    """
    if message_bytes <= 0:
        raise ValueError("message_bytes must be positive")
    exe = ucx_binary("ucx_perftest")
    if exe is None:
        raise RuntimeError(
            "ucx_perftest not found (install libucx, e.g. `pip install libucx-cu13`)"
        )
    iters = int(iterations) if iterations is not None else default_iterations(message_bytes)
    if iters <= 0:
        raise ValueError("iterations must be positive")
    warmup = max(2, min(iters // 10, 1000))

    env = ucx_env()
    env["UCX_PROTO_INFO"] = "y"
    if transports:
        env["UCX_TLS"] = transports
    else:
        env.pop("UCX_TLS", None)
    if gpu is not None:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if gpu < len(visible) else str(gpu)

    deadline = time.monotonic() + timeout
    attempts = 1 if port is not None else 3
    last_err = ""
    for _attempt in range(attempts):
        use_port = port if port is not None else _free_port()
        try:
            return _run_pair(exe, env, message_bytes, iters, warmup, use_port, deadline, transports,
                             memory)
        except _PortInUse as exc:
            last_err = str(exc)
            continue
    raise RuntimeError(last_err)


class _PortInUse(RuntimeError):
    pass


def _run_pair(
    exe: Path,
    env: dict[str, str],
    message_bytes: int,
    iters: int,
    warmup: int,
    port: int,
    deadline: float,
    transports: str | None,
    memory: str | None = None,
) -> dict[str, Any]:
    server_args = [str(exe), "-p", str(port)]
    client_args = [
        str(exe), "127.0.0.1", "-p", str(port), "-t", "ucp_put_bw",
        "-s", str(message_bytes), "-n", str(iters), "-w", str(warmup),
    ]  # fmt: skip
    if memory:
        client_args += ["-m", f"{memory},{memory}"]  # the server takes its test from the client
    server: subprocess.Popen | None = None
    client: subprocess.Popen | None = None
    with tempfile.TemporaryFile() as sout, tempfile.TemporaryFile() as cout:

        def fail(why: str, cls: type[RuntimeError] = RuntimeError) -> RuntimeError:
            _kill(client)
            _kill(server)
            return cls(
                f"ucx_perftest put_bw ({message_bytes} B, UCX_TLS={transports or '<default>'},"
                f" port {port}) {why}\n--- server: {' '.join(server_args)}\n"
                f"{_tail(_read(sout))}\n--- client: {' '.join(client_args)}\n"
                f"{_tail(_read(cout))}"
            )

        try:
            server = _spawn(server_args, env, sout)
            # The client does not retry connect(), so wait until the server listens.  Do not
            # probe by connecting: the server would take the probe as its peer.
            while True:
                if server.poll() is not None:
                    text = _read(sout)
                    cls = _PortInUse if "in use" in text.lower() else RuntimeError
                    raise fail(f"server exited early (rc={server.returncode})", cls)
                state = _listening(port, server.pid)
                if state is None:
                    time.sleep(0.5)
                    break
                if state:
                    break
                if time.monotonic() > deadline:
                    raise fail("timed out waiting for the server to listen")
                time.sleep(0.02)

            for _ in range(50):
                cout.seek(0)
                cout.truncate()
                client = _spawn(client_args, env, cout)
                try:
                    client.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise fail("timed out") from None
                ctext = _read(cout)
                if client.returncode != 0 and "connect() failed" in ctext:
                    if server.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.1)
                        continue
                break

            ctext = _read(cout)
            if client.returncode != 0:
                hint = ""
                if "no active messages transport" in ctext:
                    hint = (
                        " (UCX_TLS needs an active-message transport too, e.g. add"
                        " ',tcp', ',sysv' or ',posix')"
                    )
                raise fail(f"client failed (rc={client.returncode}){hint}")
            try:
                server.wait(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                _kill(server)  # the result is in; a lingering server is not an error
            try:
                final = parse_perftest_final(ctext)
            except ValueError as exc:
                raise fail(f"produced no result: {exc}") from None
        finally:
            _kill(client)
            _kill(server)

    used, protos = _put_selection(ctext, message_bytes)
    return {
        "message_bytes": message_bytes,
        "iterations": int(final["iterations"]),
        "bandwidth_bytes_per_s": final["bandwidth_bytes_per_s"],
        "transports_requested": transports,
        "transport_used": used,
        "protocols": protos,
        "result": final,
        "command": client_args,
        "raw_output_tail": _tail(ctext),
    }
