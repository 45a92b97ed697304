"""Tests for thunderkv.transfer.ucxtools (UCX tools from the libucx wheel).

The parser tests run on output captured from UCX 1.22 (libucx-cu13) on a 2-core VM; the live
tests start real ``ucx_info`` / ``ucx_perftest`` processes and need the ``libucx`` package.
"""

from __future__ import annotations

import math
import os
import socket

import pytest

from thunderkv.transfer import ucxtools

# `ucx_info -d` excerpt (the tcp memory domain + connection manager, then the cma domain;
# trailing spaces after the empty "memory types:" values stripped).
UCX_INFO_D_SAMPLE = """\
# Memory domain: tcp
#     Component: tcp
#         memory types:
#
#      Transport: tcp
#         Device: eth0
#           Type: network
#  System device: <unknown>
#
#      capabilities:
#            bandwidth: 11.27/ppn + 0.00 MB/sec
#              latency: 10960 nsec
#             overhead: 50000 nsec
#            put_zcopy: <= 18446744073709551590, up to 6 iov
#  put_opt_zcopy_align: <= 1
#        put_align_mtu: <= 0
#             am_short: <= 8K
#             am_bcopy: <= 8K
#             am_zcopy: <= 64K, up to 6 iov
#   am_opt_zcopy_align: <= 1
#         am_align_mtu: <= 0
#            am header: <= 8037
#           connection: to ep, to iface
#      device priority: 0
#     device num paths: 1
#              max eps: 256
#       device address: 6 bytes
#        iface address: 2 bytes
#           ep address: 10 bytes
#       error handling: peer failure, ep_check, keepalive
#
#      Transport: tcp
#         Device: lo
#           Type: network
#  System device: <unknown>
#
#      capabilities:
#            bandwidth: 11.91/ppn + 0.00 MB/sec
#              latency: 10960 nsec
#             overhead: 50000 nsec
#            put_zcopy: <= 18446744073709551590, up to 6 iov
#  put_opt_zcopy_align: <= 1
#        put_align_mtu: <= 0
#             am_short: <= 8K
#             am_bcopy: <= 8K
#             am_zcopy: <= 64K, up to 6 iov
#   am_opt_zcopy_align: <= 1
#         am_align_mtu: <= 0
#            am header: <= 8037
#           connection: to ep, to iface
#      device priority: 1
#     device num paths: 1
#              max eps: 256
#       device address: 14 bytes
#        iface address: 2 bytes
#           ep address: 10 bytes
#       error handling: peer failure, ep_check, keepalive
#
#
# Connection manager: tcp
#      max_conn_priv: 2064 bytes
#
# Memory domain: cma
#     Component: cma
#         memory types:
#
#      Transport: cma
#         Device: memory
#           Type: intra-node
#  System device: <unknown>
#
#      capabilities:
#            bandwidth: 0.00/ppn + 11145.00 MB/sec
#              latency: 80 nsec
#             overhead: 2000 nsec
#            put_zcopy: unlimited, up to 16 iov
#  put_opt_zcopy_align: <= 1
#        put_align_mtu: <= 1
#            get_zcopy: unlimited, up to 16 iov
#  get_opt_zcopy_align: <= 1
#        get_align_mtu: <= 1
#           connection: to iface
#      device priority: 0
#     device num paths: 1
#              max eps: inf
#       device address: 8 bytes
#        iface address: 4 bytes
#       error handling: peer failure, ep_check
#
"""

# Client output of:
#   UCX_PROTO_INFO=y ucx_perftest 127.0.0.1 -p 23456 -t ucp_put_bw -s 1048576 -n 2000 -w 20
# (server: UCX_PROTO_INFO=y ucx_perftest -p 23456), default UCX_TLS.
PERFTEST_DEFAULT_SAMPLE = """\
+--------------+--------------+------------------------------+---------------------+-----------------------+
|              |              |       overhead (usec)        |   bandwidth (MB/s)  |  message rate (msg/s) |
+--------------+--------------+----------+---------+---------+----------+----------+-----------+-----------+
|    Stage     | # iterations | 50.0%ile | average | overall |  average |  overall |  average  |  overall  |
+--------------+--------------+----------+---------+---------+----------+----------+-----------+-----------+
[1795820585.516308] [vm:24641:0]   +-----------+-------------+--------------------------------+
[1795820585.516308] [vm:24641:0]   | perftest intra-node cfg#0                                |
[1795820585.516308] [vm:24641:0]   | remote memory write by ucp_put* from host memory to host |
[1795820585.516308] [vm:24641:0]   +-----------+-------------+--------------------------------+
[1795820585.516308] [vm:24641:0]   |   Range   | Description |             Config             |
[1795820585.516308] [vm:24641:0]   +-----------+-------------+--------------------------------+
[1795820585.516308] [vm:24641:0]   |   0..4434 | short       | sysv/memory                    |
[1795820585.516308] [vm:24641:0]   | 4435..inf | zero-copy   | cma/memory                     |
[1795820585.516308] [vm:24641:0]   +-----------+-------------+--------------------------------+
[1795820585.516362] [vm:24641:0]   +------------+-------------+------------------------------------------------+
[1795820585.516362] [vm:24641:0]   | perftest intra-node cfg#0                                                 |
[1795820585.516362] [vm:24641:0]   | remote memory write by ucp_put*(fast-completion) from host memory to host |
[1795820585.516362] [vm:24641:0]   +------------+-------------+------------------------------------------------+
[1795820585.516362] [vm:24641:0]   |   Range    | Description |                     Config                     |
[1795820585.516362] [vm:24641:0]   +------------+-------------+------------------------------------------------+
[1795820585.516362] [vm:24641:0]   |   0..11447 | short       | sysv/memory                                    |
[1795820585.516362] [vm:24641:0]   | 11448..inf | zero-copy   | cma/memory                                     |
[1795820585.516362] [vm:24641:0]   +------------+-------------+------------------------------------------------+
[1795820585.516410] [vm:24641:0]   +-----------+-------------+---------------------------------------+
[1795820585.516410] [vm:24641:0]   | perftest intra-node cfg#0                                       |
[1795820585.516410] [vm:24641:0]   | remote memory write by ucp_put*(multi) from host memory to host |
[1795820585.516410] [vm:24641:0]   +-----------+-------------+---------------------------------------+
[1795820585.516410] [vm:24641:0]   |   Range   | Description |                Config                 |
[1795820585.516410] [vm:24641:0]   +-----------+-------------+---------------------------------------+
[1795820585.516410] [vm:24641:0]   |   0..3670 | short       | sysv/memory                           |
[1795820585.516410] [vm:24641:0]   | 3671..inf | zero-copy   | cma/memory                            |
[1795820585.516410] [vm:24641:0]   +-----------+-------------+---------------------------------------+
Final:                  2000     60.417    62.502    62.502    15999.48   15999.48       15999       15999
"""

# Same with UCX_TLS=cma,tcp and -n 40000 -w 5: a run over 1 s has a "[thread 0]" interim row.
PERFTEST_CMA_TCP_SAMPLE = """\
+--------------+--------------+------------------------------+---------------------+-----------------------+
|              |              |       overhead (usec)        |   bandwidth (MB/s)  |  message rate (msg/s) |
+--------------+--------------+----------+---------+---------+----------+----------+-----------+-----------+
|    Stage     | # iterations | 50.0%ile | average | overall |  average |  overall |  average  |  overall  |
+--------------+--------------+----------+---------+---------+----------+----------+-----------+-----------+
[1795820633.535573] [vm:25285:0]   +--------+-------------+-----------------------------------+
[1795820633.535573] [vm:25285:0]   | perftest intra-node cfg#0                                |
[1795820633.535573] [vm:25285:0]   | remote memory write by ucp_put* from host memory to host |
[1795820633.535573] [vm:25285:0]   +--------+-------------+-----------------------------------+
[1795820633.535573] [vm:25285:0]   | Range  | Description |              Config               |
[1795820633.535573] [vm:25285:0]   +--------+-------------+-----------------------------------+
[1795820633.535573] [vm:25285:0]   | 0..inf | zero-copy   | cma/memory                        |
[1795820633.535573] [vm:25285:0]   +--------+-------------+-----------------------------------+
[1795820633.620593] [vm:25285:0]   +--------+-------------+------------------------------------------+
[1795820633.620593] [vm:25285:0]   | perftest intra-node cfg#0                                       |
[1795820633.620593] [vm:25285:0]   | remote memory write by ucp_put*(multi) from host memory to host |
[1795820633.620593] [vm:25285:0]   +--------+-------------+------------------------------------------+
[1795820633.620593] [vm:25285:0]   | Range  | Description |                  Config                  |
[1795820633.620593] [vm:25285:0]   +--------+-------------+------------------------------------------+
[1795820633.620593] [vm:25285:0]   | 0..inf | zero-copy   | cma/memory                               |
[1795820633.620593] [vm:25285:0]   +--------+-------------+------------------------------------------+
[thread 0]             21850     44.459    45.768    45.768    21849.37   21849.37       21849       21849
Final:                 40000     44.273    45.553    45.670    21952.63   21896.10       21953       21896
"""


def test_parse_ucx_info_devices_sample():
    devs = ucxtools.parse_ucx_info_devices(UCX_INFO_D_SAMPLE)
    assert [(d["transport"], d["device"]) for d in devs] == [
        ("tcp", "eth0"),
        ("tcp", "lo"),
        ("cma", "memory"),
    ]
    lo = devs[1]
    assert lo == {
        "transport": "tcp",
        "device": "lo",
        "component": "tcp",
        "memory_domain": "tcp",
        "type": "network",
        "system_device": "<unknown>",
    }
    assert devs[2]["component"] == "cma" and devs[2]["type"] == "intra-node"


def test_parse_ucx_version():
    text = (
        "# Library version: 1.22.0\n# Library path: /x/libucs.so.0\n# API headers version: 1.22.0\n"
    )
    assert ucxtools.parse_ucx_version(text) == "1.22.0"
    assert ucxtools.parse_ucx_version("# UCT version=1.9.0 revision 1d0a420\n") == "1.9.0"
    assert ucxtools.parse_ucx_version("garbage") is None


def test_parse_perftest_final_sample():
    r = ucxtools.parse_perftest_final(PERFTEST_DEFAULT_SAMPLE)
    assert r["iterations"] == 2000
    assert r["overhead_us_p50"] == pytest.approx(60.417)
    assert r["bandwidth_mib_s_avg"] == pytest.approx(15999.48)
    assert r["bandwidth_mib_s_overall"] == pytest.approx(15999.48)
    assert r["bandwidth_bytes_per_s"] == pytest.approx(15999.48 * 2**20)
    # ucx_perftest's "MB" is 2**20 bytes: msg/s * 1 MiB messages == MB/s.
    assert r["msg_rate_overall"] == pytest.approx(r["bandwidth_mib_s_overall"], rel=1e-4)

    # With an interim "[thread 0]" row the last "Final:" row wins; "overall" covers the run.
    r = ucxtools.parse_perftest_final(PERFTEST_CMA_TCP_SAMPLE)
    assert r["iterations"] == 40000
    assert r["bandwidth_mib_s_avg"] == pytest.approx(21952.63)
    assert r["bandwidth_mib_s_overall"] == pytest.approx(21896.10)
    assert r["bandwidth_bytes_per_s"] == pytest.approx(21896.10 * 2**20)

    with pytest.raises(ValueError, match="no 'Final:' result row"):
        ucxtools.parse_perftest_final("Waiting for connection...\n")


def test_parse_proto_info_sample():
    rows = ucxtools.parse_proto_info(PERFTEST_DEFAULT_SAMPLE)
    assert len(rows) == 6
    first = rows[0]
    assert first["operation"] == "remote memory write by ucp_put* from host memory to host"
    assert (first["min_bytes"], first["max_bytes"]) == (0, 4434)
    assert first["description"] == "short" and first["transports"] == ["sysv/memory"]
    assert rows[1]["min_bytes"] == 4435 and math.isinf(rows[1]["max_bytes"])
    assert rows[1]["description"] == "zero-copy" and rows[1]["config"] == "cma/memory"
    assert "(multi)" in rows[-1]["operation"]

    assert ucxtools._put_selection(PERFTEST_DEFAULT_SAMPLE, 1 << 20)[0] == "cma"
    assert ucxtools._put_selection(PERFTEST_DEFAULT_SAMPLE, 1024)[0] == "sysv"
    assert ucxtools._put_selection(PERFTEST_CMA_TCP_SAMPLE, 8)[0] == "cma"
    assert ucxtools._put_selection("no tables here", 8) == (None, [])
    # Size suffixes as UCX prints them ("4G..inf").
    (row,) = ucxtools.parse_proto_info(
        "[1.2] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |\n"
        "[1.2] [vm:1:0]   |       4G..inf | software emulation | posix/memory        |\n"
    )
    assert row["min_bytes"] == 4 << 30 and row["description"] == "software emulation"


def test_default_iterations():
    assert ucxtools.default_iterations(256 << 20) >= 5
    assert ucxtools.default_iterations(1 << 20) == 4096
    assert ucxtools.default_iterations(1) == 200_000


def test_ucx_env_extends_ld_library_path():
    env = ucxtools.ucx_env({"LD_LIBRARY_PATH": "/opt/x", "FOO": "1"})
    assert env["FOO"] == "1"
    home = ucxtools.ucx_home()
    if home is None:
        assert env["LD_LIBRARY_PATH"] == "/opt/x"
    else:
        parts = env["LD_LIBRARY_PATH"].split(os.pathsep)
        assert parts == [str(home / "lib"), "/opt/x"]
        # idempotent
        assert ucxtools.ucx_env(env)["LD_LIBRARY_PATH"] == env["LD_LIBRARY_PATH"]


# --------------------------------------------------------------------------- live (needs UCX)


@pytest.fixture(scope="module")
def devices():
    pytest.importorskip("libucx")
    if ucxtools.ucx_binary("ucx_perftest") is None or ucxtools.ucx_binary("ucx_info") is None:
        pytest.skip("libucx installed without its bin/ tools")
    return ucxtools.ucx_info_devices()


def test_ucx_info_devices_lists_tcp_lo(devices):
    assert devices, "ucx_info -d listed no transports"
    for d in devices:
        assert set(d) == {
            "transport", "device", "component", "memory_domain", "type", "system_device",
        }  # fmt: skip
        assert d["transport"] and d["device"] and d["component"]
    assert any(d["transport"] == "tcp" and d["device"] == "lo" for d in devices)
    assert ucxtools.ucx_version()


def _check(r: dict, size: int, tls: str | None) -> None:
    assert r["message_bytes"] == size
    assert r["iterations"] == ucxtools.default_iterations(size)
    assert r["bandwidth_bytes_per_s"] > 0 and math.isfinite(r["bandwidth_bytes_per_s"])
    assert r["transports_requested"] == tls
    assert "Final:" in r["raw_output_tail"]


def test_perftest_put_bw_default(devices):
    r = ucxtools.run_perftest_put_bw(1 << 20)
    _check(r, 1 << 20, None)
    assert r["transport_used"]  # UCX_PROTO_INFO=y is understood by UCX 1.22


def test_perftest_put_bw_tcp(devices):
    r = ucxtools.run_perftest_put_bw(1 << 20, transports="tcp")
    _check(r, 1 << 20, "tcp")
    assert r["transport_used"] == "tcp"


def test_perftest_put_bw_cma(devices):
    if not any(d["transport"] == "cma" for d in devices):
        pytest.skip("cma transport not available")
    # cma has no active messages, so UCP cannot wire up with it alone ...
    with pytest.raises(RuntimeError, match="active-message"):
        ucxtools.run_perftest_put_bw(1 << 20, transports="cma")
    # ... but with tcp for wire-up the 1 MiB puts themselves go over cma.
    r = ucxtools.run_perftest_put_bw(1 << 20, transports="cma,tcp")
    _check(r, 1 << 20, "cma,tcp")
    assert r["transport_used"] == "cma"


def _perftest_pids(port: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"ucx_perftest") for a in argv) and str(port).encode() in argv:
            pids.append(int(name))
    return pids


def test_perftest_timeout_kills_both(devices):
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    port = ucxtools._free_port()
    with pytest.raises(RuntimeError, match="timed out"):
        ucxtools.run_perftest_put_bw(
            1 << 20, transports="tcp", iterations=10**8, timeout=1.5, port=port
        )
    assert _perftest_pids(port) == []


def test_without_ucx_tools(monkeypatch):
    monkeypatch.setattr(ucxtools, "ucx_binary", lambda name: None)
    assert ucxtools.ucx_info_devices() == []
    assert ucxtools.ucx_version() is None
    with pytest.raises(RuntimeError, match="ucx_perftest not found"):
        ucxtools.run_perftest_put_bw(1 << 20)


def test_perftest_retries_taken_port(devices, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = iter([taken])
        real_free_port = ucxtools._free_port
        monkeypatch.setattr(ucxtools, "_free_port", lambda: next(ports, None) or real_free_port())
        r = ucxtools.run_perftest_put_bw(1 << 20, iterations=200)
        assert r["iterations"] == 200 and r["bandwidth_bytes_per_s"] > 0
        assert str(taken) not in r["command"]
