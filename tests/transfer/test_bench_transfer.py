"""`thunderkv bench transfer`: both roles spawned here, loopback and a shaped veth link."""

from __future__ import annotations

import importlib.util
import json

import pytest

from thunderkv.cli import main
from thunderkv.transfer import unavailable_reason
from thunderkv.transfer.netshape import shaping_unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"UCX transfer unavailable: {unavailable_reason()}")


def run_bench(tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "rows.jsonl"
    assert main(["bench", "transfer", "--case", "smollm2:256", "--reps", "1",
                 "--perftest-runs", "2", "--json", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_loopback_raw_and_4bit_with_perftest_baseline(tmp_path):
    png = tmp_path / "transfer.png"
    rows = run_bench(tmp_path, "--plot", str(png))
    # --plot is optional: drawn where matplotlib is installed, a warning otherwise
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert png.exists() == has_mpl
    if has_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw, q4 = sorted(rows, key=lambda r: -r["bits"])
    assert (raw["bits"], q4["bits"]) == (16, 4)
    # 30 layers x 2 (K, V) x 256 tokens x 3 heads x 64 dims: 2 bytes raw, 0.5 + 2*2/64 at 4-bit
    assert raw["payload_bytes"] == raw["kv_bytes"] == 30 * 2 * 256 * 3 * 64 * 2
    assert q4["payload_bytes"] == 30 * 2 * 256 * 3 * (32 + 2 * 2)
    assert q4["kv_bytes"] == raw["kv_bytes"]
    assert raw["speedup_vs_raw"] == 1.0 and q4["speedup_vs_raw"] > 0
    assert raw["transport"] and raw["perftest_put_bytes_per_s"] > 0
    runs = raw["perftest_runs_bytes_per_s"]
    assert len(runs) == 2 and raw["perftest_put_bytes_per_s"] == pytest.approx(sum(runs) / 2)
    assert raw["perftest_interleaved"] and not q4.get("perftest_interleaved")  # with the sends
    assert raw["e2e_vs_perftest"] == pytest.approx(
        raw["wire_bytes_per_s"] / raw["perftest_put_bytes_per_s"])
    assert raw["link"] == "loopback" and "git_sha" in raw
    assert raw["pool_device"] == "cpu" and raw["memory_type"] == "host"


@pytest.mark.skipif(shaping_unavailable_reason() is not None,
                    reason=f"no shaped link here: {shaping_unavailable_reason()}")
def test_shaped_link_makes_4bit_faster(tmp_path):
    rows = run_bench(tmp_path, "--rate", "200mbit")
    raw, q4 = sorted(rows, key=lambda r: -r["bits"])
    assert raw["transport"].startswith("tcp/")  # shared memory would bypass the link
    assert raw["wire_bytes_per_s"] < 200e6 / 8 * 1.1  # the shaping applied
    assert q4["speedup_vs_raw"] > 2.0  # ~3.5x expected; loose against a noisy machine



def test_perftest_runs_must_be_positive(capsys):
    assert main(["bench", "transfer", "--case", "smollm2:256", "--perftest-runs", "0"]) == 2
    assert "--perftest-runs must be >= 1" in capsys.readouterr().out


def test_requests_in_flight_add_aggregate_throughput(tmp_path):
    rows = run_bench(tmp_path, "--inflight", "2", "--bits", "16")
    (raw,) = rows
    assert raw["inflight"] == 2 and raw["reps"] == 2  # --reps 1 on each of 2 connections
    assert raw["throughput_bytes_per_s"] > 0
    assert raw["throughput_vs_perftest"] == pytest.approx(
        raw["throughput_bytes_per_s"] / raw["perftest_put_bytes_per_s"])


def test_inflight_must_be_positive(capsys):
    assert main(["bench", "transfer", "--quick", "--inflight", "0"]) == 2
    assert "--inflight" in capsys.readouterr().out


@pytest.mark.parametrize("device, why", [
    ("tpu", "device type"),
    pytest.param("cuda", "no CUDA device", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="this machine has a GPU")),
    ("cpu:0:1", "device"),
])
def test_pool_device_is_checked_before_anything_starts(capsys, device, why):
    assert main(["bench", "transfer", "--quick", "--device", device]) == 2
    assert why in capsys.readouterr().out.replace("\n", " ")


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    import os

    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{d}/stat").read() if d.isdigit() else ""
        except OSError:
            continue
        if stat:
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_exits_quietly_and_leaves_no_processes():
    """Ctrl-C (SIGINT to the terminal's foreground group) while the client is sending: one
    line, exit code 130, no traceback, and the server and client processes are gone."""
    import os
    import signal
    import subprocess
    import time

    from thunderkv._spawn import module_argv

    proc = subprocess.Popen(
        module_argv("thunderkv.cli") + ["bench", "transfer", "--case", "smollm2:1024",
                                        "--reps", "100000", "--no-perftest"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            kids = _descendants(proc.pid)
            if len(kids) >= 2:  # the server and the client
                break
            time.sleep(0.2)
        time.sleep(3)  # the client is connected and sending
        kids = _descendants(proc.pid)
        assert len(kids) >= 2 and proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert out == "interrupted\n" and "Traceback" not in err, (out, err)
    assert not [k for k in kids if _alive(k)]
