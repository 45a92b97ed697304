"""`thunderkv serve` as a real process: health, a completion over HTTP, clean SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from thunderkv.cli.serve import plan_for_serving
from thunderkv.transfer import unavailable_reason

PLAN = Path(__file__).resolve().parents[2] / "benchmarks/results/planner-2026-11-27-cpu/conv.json"


def test_roles_and_routing_from_a_planner_json(tmp_path):
    roles, routing = plan_for_serving(str(PLAN))
    plan = json.loads(PLAN.read_text())["plan"]
    assert roles == [g["phase"] for g in plan["groups"]]
    assert "prefill" in roles and "decode" in roles
    assert routing == plan["routing"]
    for entry in routing:  # every entry names a prefill group and a decode group
        assert roles[entry["prefill"]] in ("prefill", "colocated")
        assert roles[entry["decode"]] in ("decode", "colocated")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"plan": {"groups": [{"phase": "both"}]}}))
    with pytest.raises(ValueError, match="prefill/decode"):
        plan_for_serving(str(bad))
    bad.write_text(json.dumps({"plan": {"groups": [{"phase": "colocated"}]}}))
    with pytest.raises(ValueError, match="routing"):
        plan_for_serving(str(bad))


@pytest.mark.skipif(unavailable_reason() is not None, reason="UCX transfer unavailable")
def test_serve_command_end_to_end():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "thunderkv.cli", "serve", "--model", "tiny",
                             "--port", str(port)], stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    assert json.load(r)["ok"]
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        body = json.dumps({"prompt": "hi there", "max_tokens": 5, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            done = json.load(r)
        assert done["usage"]["completion_tokens"] == 5
        with urllib.request.urlopen(url + "/admin/workers", timeout=5) as r:
            roles = sorted(w["role"] for w in json.load(r))
        assert roles == ["decode", "prefill"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny", "--prefill", "0", "--decode", "1"], "no prefill worker"),
    (["--model", "/no/such/model/dir"], "unknown model '/no/such/model/dir'"),
])
def test_serve_refuses_at_startup_what_could_never_serve(argv, message):
    """Exit 2 with the reason before any worker starts (it used to serve, then fail every
    request, or print Hugging Face's repo-id error)."""
    out = subprocess.run([sys.executable, "-m", "thunderkv.cli", "serve", *argv, "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert message in " ".join(out.stdout.split())  # rich wraps long lines
