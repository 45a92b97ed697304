"""`thunderkv serve` as a real process: health, a completion over HTTP, clean SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serve_procs import processes_in_group, wait_group_empty

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
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "thunderkv.cli", "serve", "--model", "tiny",
                             "--port", str(port)], stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        poll_while_running(proc, lambda: healthy(port), 120, every=0.5)
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


# --- ordinary mistakes, startup and shutdown ----------------------------------------------------


def plan_file(tmp_path, routing) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": {"groups": [{"phase": "prefill"}, {"phase": "decode"}],
                                         "routing": routing}}))
    return str(path)


@pytest.fixture
def no_workers(monkeypatch):
    """Engine replaced: the test fails if `serve` gets as far as starting workers."""
    import thunderkv.serve.engine as engine_module

    def engine(*args, **kwargs):
        pytest.fail("serve started workers")

    monkeypatch.setattr(engine_module, "Engine", engine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,message", [
    (["--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["--port", "-5"], "--port must be in 0..65535, got -5"),
    (["--threads", "-3"], "threads must be >= 0"),
    (["--host", "no.such.host.invalid"], "cannot listen on no.such.host.invalid:0"),
    (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--plan", [{"prefill": 0, "decode": 5, "req_per_s": 1.0}]], "routing names worker 5"),
    (["--plan", [{"prefill": 0, "decode": 1, "req_per_s": 0}]], "routes no requests"),
    (["--plan", [{"prefill": 0, "decode": 1, "req_per_s": "inf"}]], "finite number >= 0"),
    (["--model", "EMPTY-DIR"], "is not a Hugging Face model directory (it has no config.json)"),
])
def test_ordinary_mistakes_are_one_line_before_any_worker_starts(argv, message, tmp_path,
                                                                 no_workers, capsys):
    from thunderkv.cli import main

    if argv[0] == "--plan":
        argv = ["--plan", plan_file(tmp_path, argv[1])]
    if argv[1] == "EMPTY-DIR":  # a directory, but no model in it (was a 33-line traceback)
        (tmp_path / "empty").mkdir()
        argv = ["--model", str(tmp_path / "empty")]
    code = main(["serve", "--model", "tiny", "--port", "0", *argv])
    out = capsys.readouterr()
    assert code == 2
    assert out.out.strip().splitlines() == [f"error: {out.out.strip()[7:]}"]  # one line
    assert message in out.out and "starting" not in out.out
    assert out.err == ""


def test_a_port_in_use_is_refused_before_any_worker_starts(no_workers, capsys):
    from thunderkv.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--model", "tiny", "--port", str(port)])
    out = capsys.readouterr().out
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out and "in use" in out
    assert "starting" not in out


def test_the_port_is_bound_before_the_workers_start_and_their_failure_is_one_line(
        monkeypatch, capsys):
    """The HTTP port is taken first (so a clash ends at once, not after minutes of loading);
    a non-loopback bind warns that nothing authenticates; a worker that fails to start ends
    the command with its reason, no traceback."""
    import thunderkv.serve.engine as engine_module

    from thunderkv.cli import main

    port, bound = free_port(), []

    def engine(config, progress=None, on_all_dead=None):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            bound.append(True)
        raise RuntimeError("a worker failed to start: OSError: no space left on device")

    monkeypatch.setattr(engine_module, "Engine", engine)
    code = main(["serve", "--model", "tiny", "--host", "0.0.0.0", "--port", str(port)])
    out = capsys.readouterr().out
    assert code == 1 and bound == [True]
    lines = out.strip().splitlines()
    assert lines[0].startswith("warning: listening on 0.0.0.0, not loopback: there is no "
                               "authentication")
    assert lines[1].startswith("starting prefill, decode workers for tiny")
    assert lines[2:] == ["error: a worker failed to start: OSError: no space left on device"]
    with socket.socket() as s:  # and the port was given back (SO_REUSEADDR: a connection
        # the server side closed first may sit in TIME_WAIT on it; a listener still fails)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def poll_while_running(proc: subprocess.Popen, ready, timeout: float, every: float = 0.02):
    """``ready()``'s first truthy value, polled every ``every`` s while ``proc`` runs; the test
    fails if ``proc`` ends or ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while not (got := ready()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(every)
    return got


def healthy(port: int) -> bool:
    """True once `thunderkv serve` on ``port`` answers /health ok (fails the test if it answers
    not ok); False while nothing answers yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            assert json.load(r)["ok"]
            return True
    except OSError:
        return False


def start_serve(port: int) -> subprocess.Popen:
    """`thunderkv serve` in a process group of its own, as a terminal runs it."""
    return subprocess.Popen([sys.executable, "-m", "thunderkv.cli", "serve", "--model", "tiny",
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.skipif(unavailable_reason() is not None, reason="UCX transfer unavailable")
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_ctrl_c_stops_quietly_and_leaves_no_process():
    port = free_port()
    proc = start_serve(port)
    try:
        poll_while_running(proc, lambda: healthy(port), 120, every=0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = out.strip().splitlines()
    assert lines[0] == "starting prefill, decode workers for tiny ..."
    assert sorted(line.split(":")[0].strip() for line in lines[1:3]) == [
        "worker 0 (prefill) ready", "worker 1 (decode) ready"]  # progress while loading
    assert lines[-1] == "stopping ..."
    assert wait_group_empty(proc.pid) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_ctrl_c_while_the_workers_load_stops_them_quietly():
    proc = start_serve(free_port())
    try:
        assert proc.stdout.readline().startswith("starting prefill, decode workers")
        # the router and its two workers
        poll_while_running(proc, lambda: len(processes_in_group(proc.pid)) >= 3, 30)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert out.strip().splitlines()[-1] == "interrupted while starting; stopped"
    assert wait_group_empty(proc.pid) == []


# --- regressions of the serving review ----------------------------------------------------------


def test_a_model_directory_whose_tokenizer_cannot_load_is_one_line(tmp_path, monkeypatch,
                                                                  capsys):
    """A config.json but no tokenizer: found when the router loads the tokenizer, before any
    worker starts; one `error:` line and exit code 2 (it was a traceback and exit code 1)."""
    import thunderkv.serve.engine as engine_module

    from thunderkv.cli import main

    def spawn(*args, **kwargs):
        pytest.fail("serve started workers")

    monkeypatch.setattr(engine_module.Engine, "_spawn", spawn)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code = main(["serve", "--model", str(tmp_path), "--port", "0"])
    out = capsys.readouterr()
    assert code == 2
    lines = out.out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("starting prefill, decode workers for")
    assert lines[1].startswith(f"error: cannot load a tokenizer from '{tmp_path}': ")
    assert "Traceback" not in out.err


class ServingEngine:
    """What `serve` needs of a started Engine, without workers."""

    model_name = "tiny"

    def health(self) -> dict:
        return {"ok": True, "status": "ok"}

    def close(self) -> None:
        pass


def serve_in_process(monkeypatch, argv: list[str], while_loading=None) -> int:
    """`thunderkv serve --model tiny ARGV` with a stand-in Engine: ``while_loading(url)`` runs
    as the workers would load, then the server serves until a SIGTERM 0.3 s later."""
    import os
    import threading

    import thunderkv.serve.engine as engine_module

    from thunderkv.cli import main

    port = free_port()

    def engine(config, progress=None, on_all_dead=None):
        if while_loading is not None:
            while_loading(f"http://127.0.0.1:{port}")
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return ServingEngine()

    monkeypatch.setattr(engine_module, "Engine", engine)
    return main(["serve", "--model", "tiny", "--port", str(port), *argv])


def get(url: str) -> tuple[int, dict]:
    req = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_while_the_workers_load_the_server_answers_503_at_once(monkeypatch, capsys):
    """The port is bound before the workers load; requests used to hang until they were ready
    (34 s for SmolLM2), now /health and completions get a 503 at once."""
    seen = []

    def probe(url: str) -> None:
        seen.append(get(url + "/health"))
        req = urllib.request.Request(url + "/v1/completions", b'{"prompt": "hi"}',
                                     {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=5)
        except urllib.error.HTTPError as e:
            seen.append((e.code, json.load(e)["error"]["code"]))

    code = serve_in_process(monkeypatch, [], probe)
    assert code == 0
    assert seen == [(503, {"ok": False, "status": "starting"}), (503, "server_starting")]
    assert capsys.readouterr().out.strip().splitlines()[-1] == "stopping ..."


@pytest.mark.parametrize("argv,kv", [([], " (KV 4-bit)"), (["--kv-bits", "16"], " (KV 16-bit)"),
                                     (["--colocated", "2"], "")])
def test_the_serving_line_names_a_kv_format_only_when_kv_moves(monkeypatch, capsys, argv, kv):
    """Colocated workers move no KV: no "(KV 4-bit)" for them."""
    code = serve_in_process(monkeypatch, argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    serving = next(line for line in lines if line.startswith("serving "))
    assert serving.startswith("serving tiny at http://127.0.0.1:")
    assert serving.split("/v1", 1)[1].startswith(f"{kv}; GET /health")


def worker_pids(pgid: int) -> list[int]:
    """Worker processes (multiprocessing spawn children) of process group ``pgid``."""
    pids = []
    for line in processes_in_group(pgid):
        pid = int(line.split()[0])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_worker_killed_while_loading_ends_startup_at_once():
    """`serve` used to wait out its 300 s start timeout, then say "workers not ready"."""
    proc = start_serve(free_port())
    try:
        assert proc.stdout.readline().startswith("starting prefill, decode workers")
        pids = poll_while_running(proc, lambda: worker_pids(proc.pid), 30)
        t0 = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)  # still importing torch: far from ready
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in err, err
    assert re.fullmatch(r"error: worker [01] \((prefill|decode)\) died while loading the model "
                        r"\(killed by signal SIGKILL\)", out.strip().splitlines()[-1]), out
    assert wait_group_empty(proc.pid) == []
