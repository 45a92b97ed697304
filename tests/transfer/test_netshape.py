"""ShapedLink: rate parsing, a real shaped transfer between namespaces, and cleanup on failure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from thunderkv.transfer import netshape
from thunderkv.transfer.netshape import ShapedLink, parse_rate, shaping_unavailable_reason

needs_shaping = pytest.mark.skipif(
    shaping_unavailable_reason() is not None, reason=str(shaping_unavailable_reason())
)

PAYLOAD = 4 * 1024 * 1024

# Prints its port, receives until EOF, then acknowledges with the byte count.
SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
s.settimeout(15)
c, _ = s.accept()
c.settimeout(15)
n = 0
while chunk := c.recv(1 << 16):
    n += len(chunk)
c.sendall(str(n).encode())
c.close()
"""

# Sends PAYLOAD bytes and prints the seconds from the first send to the server's ack.
CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
data = bytes(int(sys.argv[3]))
t0 = time.perf_counter()
c.sendall(data)
c.shutdown(socket.SHUT_WR)
ack = c.recv(64)
print(time.perf_counter() - t0, ack.decode())
"""


def _namespaces() -> set[str]:
    out = subprocess.run([netshape._tool("ip") or "ip", "netns", "list"],
                         capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("text, bps", [
    ("100mbit", 100_000_000),
    ("1gbit", 1_000_000_000),
    ("5Gbit", 5_000_000_000),
    ("500kbit", 500_000),
    ("2.5gbit", 2_500_000_000),
    ("1000000", 1_000_000),
    (" 10Mbit ", 10_000_000),
    ("1mbps", 8_000_000),  # tc: bps = bytes per second
])
def test_parse_rate(text: str, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["", "fast", "100 mbits", "mbit", "-5mbit", "0", "0kbit",
                                  "1.2.3mbit", "10xbit", "0.1"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(text)


def test_command_prefix() -> None:
    link = ShapedLink(parse_rate("10mbit"), name_prefix="tkvt")
    cmd = link.command("client", ["echo", "hi"])
    assert cmd[1:] == ["netns", "exec", link.client_ns, "echo", "hi"]
    assert link.server_ns != link.client_ns and link.server_ns.startswith("tkvt-")
    with pytest.raises(ValueError, match="role must be 'server' or 'client', got 'router'"):
        link.command("router", ["true"])
    with pytest.raises(ValueError, match="rate_bps must be positive, got 0"):
        ShapedLink(0)


@needs_shaping
def test_shaped_transfer_rate() -> None:
    rate = parse_rate("100mbit")
    procs: list[subprocess.Popen] = []
    try:
        with ShapedLink(rate, name_prefix="tkvt") as link:
            names = {link.server_ns, link.client_ns}
            assert names <= _namespaces()
            srv = subprocess.Popen(
                link.command("server", [sys.executable, "-c", SERVER, link.server_addr]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(srv)
            port = srv.stdout.readline().strip()
            assert port.isdigit(), srv.stderr.read() if srv.poll() is not None else port
            cli = subprocess.Popen(
                link.command("client", [sys.executable, "-c", CLIENT, link.server_addr, port,
                                        str(PAYLOAD)]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(cli)
            out, err = cli.communicate(timeout=20)
            assert cli.returncode == 0, err
            assert srv.wait(timeout=5) == 0, srv.stderr.read()
            seconds, received = out.split()
            assert int(received) == PAYLOAD
            achieved = PAYLOAD * 8 / float(seconds)
            print(f"configured {rate / 1e6:.0f} Mbit/s, achieved {achieved / 1e6:.1f} Mbit/s")
            assert 0.5 * rate <= achieved <= 1.1 * rate, f"{achieved / 1e6:.1f} Mbit/s"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
    assert not names & _namespaces()


@needs_shaping
def test_failed_setup_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = netshape._run

    def failing_run(argv: list[str], timeout: float = 10.0) -> None:
        if "qdisc" in argv:
            raise RuntimeError(f"{' '.join(argv)}: injected failure")
        real_run(argv, timeout)

    monkeypatch.setattr(netshape, "_run", failing_run)
    link = ShapedLink(parse_rate("10mbit"), name_prefix="tkvfail")
    with pytest.raises(RuntimeError, match="qdisc.*injected failure"):
        with link:
            pytest.fail("setup should have failed")
    assert not any(ns.startswith("tkvfail-") for ns in _namespaces())
    assert not {link.server_ns, link.client_ns} & netshape._live_namespaces


@needs_shaping
def test_delay_either_works_or_cleans_up() -> None:
    """netem may be missing from the kernel; then entering must fail cleanly."""
    link = ShapedLink(parse_rate("100mbit"), delay_ms=5, name_prefix="tkvdly")
    try:
        with link:
            assert {link.server_ns, link.client_ns} <= _namespaces()
    except RuntimeError as exc:
        assert "netem" in str(exc)
    assert not any(ns.startswith("tkvdly-") for ns in _namespaces())


# Enters a shaped link inside sigterm_unwinds, says so, then waits to be terminated.
TERMINATED = """
import sys, time
from thunderkv.transfer.netshape import ShapedLink, parse_rate, sigterm_unwinds
with sigterm_unwinds(), ShapedLink(parse_rate("10mbit"), name_prefix="tkvterm") as link:
    print(link.server_ns, link.client_ns, flush=True)
    time.sleep(60)
"""


@needs_shaping
def test_sigterm_still_deletes_the_namespaces() -> None:
    """A bench stopped with SIGTERM (a CI timeout, `kill`) used to leave its namespaces and
    veth pair behind; under sigterm_unwinds it exits 143 after ShapedLink cleaned up."""
    p = subprocess.Popen([sys.executable, "-c", TERMINATED], stdout=subprocess.PIPE, text=True)
    try:
        names = set(p.stdout.readline().split())
        assert len(names) == 2 and names <= _namespaces()
        p.terminate()
        assert p.wait(timeout=20) == 143
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
    assert not names & _namespaces()


def test_sigterm_unwinds_runs_finally_blocks(tmp_path) -> None:
    code = ("import pathlib, sys, time\n"
            "from thunderkv.transfer.netshape import sigterm_unwinds\n"
            f"done = pathlib.Path({str(tmp_path / 'done')!r})\n"
            "with sigterm_unwinds():\n"
            "    try:\n"
            "        print('ready', flush=True)\n"
            "        time.sleep(60)\n"
            "    finally:\n"
            "        done.write_text('cleaned')\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.terminate()
    assert p.wait(timeout=20) == 143
    assert (tmp_path / "done").read_text() == "cleaned"
