"""`thunderkv serve` as an operator runs it: real processes, faults made by killing them.

Regressions of the operator review: a second SIGTERM during shutdown, a plan whose routing
does not fit its groups, worker ids that are not integers, what the log says when a worker
dies, and histograms that grew for as long as the server ran.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serve_procs import wait_group_empty
from thunderkv.serve import metrics as M

from thunderkv.transfer import unavailable_reason

needs_ucx = pytest.mark.skipif(unavailable_reason() is not None, reason="UCX transfer unavailable")
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


# --- helpers -----------------------------------------------------------------------------------


def serve(*argv: str) -> subprocess.Popen:
    """`thunderkv serve --model tiny --port 0 ARGV` in a process group of its own."""
    return subprocess.Popen([sys.executable, "-m", "thunderkv.cli", "serve", "--model", "tiny",
                             "--port", "0", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_serving(proc: subprocess.Popen, timeout: float = 180.0) -> str:
    """The server's base URL, from its "serving ... at URL/v1" line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"serve ended while starting: {proc.wait()} {proc.stderr.read()}")
        if found := re.match(r"serving \S+ at (http://\S+)/v1", line):
            return found.group(1)
    pytest.fail("serve did not start in time")


def call(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST of ``body``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def wait_until(check, timeout: float = 60.0, every: float = 0.1):
    """``check()``'s first truthy value; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)
    return got


def kill_group(proc: subprocess.Popen) -> None:
    """Whatever is left of the server's process group (a stopped worker included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def worker_pid(url: str, role: str) -> int:
    return next(w["pid"] for w in call(url + "/admin/workers")[1] if w["role"] == role)


# --- shutdown ----------------------------------------------------------------------------------


@needs_ucx
@needs_proc
def test_a_second_sigterm_does_not_cut_the_shutdown_short():
    """A second SIGTERM while stopping (an impatient operator, a supervisor repeating it) used to
    kill the router on the spot: clients in flight lost their connection without an answer,
    and the workers were never stopped (a hung one stayed behind for good)."""
    proc = serve()
    try:
        url = wait_serving(proc)
        os.kill(worker_pid(url, "prefill"), signal.SIGSTOP)  # hung: stopping waits for it
        answers = []
        client = threading.Thread(target=lambda: answers.append(
            call(url + "/v1/completions", {"prompt": "hi", "max_tokens": 4})))
        client.start()
        wait_until(lambda: call(url + "/health")[1].get("in_flight") == 1)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: proc.stdout.readline().strip() == "stopping ...", every=0)
        proc.send_signal(signal.SIGTERM)  # the shutdown is under way: it must go on
        code = proc.wait(60)
        client.join(30)
        left = wait_group_empty(proc.pid)
    finally:
        kill_group(proc)
    assert code == 0, proc.stderr.read()
    assert answers == [(503, {"error": {"message": "server shutting down", "type":
                                        "server_error", "param": None,
                                        "code": "server_shutting_down"}})]
    assert left == []  # no process of the server is left, the hung worker included


# --- a worker killed ---------------------------------------------------------------------------


@needs_ucx
def test_a_killed_worker_is_logged_with_its_cause_and_what_it_changed():
    """The log used to say only "worker 1 (decode, pid N) died": not that the kernel killed it
    (the OOM killer's SIGKILL looks like this), nor that the prefill worker now decodes too."""
    proc = serve()
    try:
        url = wait_serving(proc)
        victim = worker_pid(url, "decode")
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: call(url + "/health")[1]["workers_live"] == 1)
        status, done = call(url + "/v1/completions", {"prompt": "hi", "max_tokens": 4})
        roles = [w["role"] for w in call(url + "/admin/workers")[1]]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert (status, done["usage"]["completion_tokens"]) == (200, 4)  # it keeps serving
    assert roles == ["colocated", "decode"]
    line = (f"worker 1 (decode, pid {victim}) died (killed by signal SIGKILL); 0 in-flight "
            "request(s) restart on the 1 live worker(s); worker 0 is now colocated "
            "(was prefill)")
    stamped = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[router\] WARNING "
    assert any(re.fullmatch(stamped + re.escape(line), x) for x in err.splitlines()), err


@needs_ucx
def test_a_server_whose_every_worker_died_exits_1():
    """With every worker dead the server stayed up for good answering 503, so a supervisor
    (systemd, Kubernetes) never restarted it."""
    proc = serve()
    try:
        url = wait_serving(proc)
        victims = [worker_pid(url, "prefill"), worker_pid(url, "decode")]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        kill_group(proc)
    assert proc.returncode == 1, (out, err)
    assert "error: every worker died, so nothing could serve any more" in out
    assert "no live worker left" in err


# --- plans and routing -------------------------------------------------------------------------


def plan(tmp_path: Path, routing, groups=("prefill", "decode")) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": {"groups": [{"phase": g} for g in groups],
                                         "routing": routing}}))
    return str(path)


def refused(*argv: str) -> str:
    """`serve ARGV` must end with exit code 2 and one `error:` line before any worker starts;
    that line."""
    try:
        out = subprocess.run([sys.executable, "-m", "thunderkv.cli", "serve", "--model", "tiny",
                              "--port", "0", *argv], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("serve started instead of refusing")
    assert (out.returncode, out.stderr) == (2, ""), out
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stdout
    return lines[0]


@pytest.mark.parametrize("routing,groups,message", [
    # a decode group as the prefill side: the router could never follow it (it used to serve
    # with the plan silently ignored, every request routed least-loaded)
    ([{"prefill": 1, "decode": 0, "req_per_s": 1.0}], ("prefill", "decode"),
     "routing sends requests from worker 1 to worker 0, but worker 1 is decode, not prefill"),
    ([{"prefill": 0, "decode": 1, "req_per_s": 1.0}], ("prefill", "colocated"),
     "but worker 1 is colocated, not decode"),
    ([{"prefill": 0, "decode": 0, "req_per_s": 1.0}, {"prefill": 0, "decode": 1, "req_per_s": 1}],
     ("prefill", "decode"), "but worker 0 is prefill, not colocated"),
    # worker ids that are not integers: 1e400 was a traceback, true and 0.7 quietly 1 and 0
    ([{"prefill": 1e400, "decode": 1, "req_per_s": 1.0}], ("prefill", "decode"),
     "worker inf is not an integer"),
    ([{"prefill": 0, "decode": True, "req_per_s": 1.0}], ("prefill", "decode"),
     "worker True is not an integer"),
    ([{"prefill": 0.7, "decode": 1, "req_per_s": 1.0}], ("prefill", "decode"),
     "worker 0.7 is not an integer"),
])
def test_a_plan_whose_routing_cannot_be_followed_is_refused(tmp_path, routing, groups, message):
    assert message in refused("--plan", plan(tmp_path, routing, groups))


@pytest.mark.parametrize("counts,named", [(["--colocated", "2"], "--colocated"),
                                          (["--prefill", "2", "--decode", "1"],
                                           "--prefill, --decode")])
def test_worker_counts_along_with_a_plan_are_refused(tmp_path, counts, named):
    """They were silently ignored: `--plan p.json --colocated 2` ran the plan's workers."""
    path = plan(tmp_path, [{"prefill": 0, "decode": 1, "req_per_s": 1.0}])
    assert refused("--plan", path, *counts) == (
        f"error: --plan starts one worker per planned group; {named} would be ignored (drop "
        "it, or drop --plan)")


def test_a_plan_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"plan": {"groups": [')
    assert refused("--plan", str(path)).startswith(
        f"error: cannot use the plan: {path}: not a planner JSON: Expecting value")


@needs_ucx
def test_reschedule_checks_the_routing_against_the_roles_it_comes_with():
    """`POST /admin/reschedule` answered 500 for a worker id of 1e400 and accepted routing that
    the new roles could not follow (the plan was then silently ignored)."""
    proc = serve()
    try:
        url = wait_serving(proc) + "/admin/reschedule"
        swap = {"0": "decode", "1": "prefill"}
        answers = [
            call(url, {"roles": {"0": "prefill"},
                       "routing": [{"prefill": 1e400, "decode": 1, "req_per_s": 1}]}),
            call(url, {"roles": {"0": "prefill"},
                       "routing": [{"prefill": 1, "decode": 0, "req_per_s": 1}]}),
            call(url, {"roles": swap, "routing": [{"prefill": 1, "decode": 0, "req_per_s": 1}]}),
        ]
        routing = call(url.replace("reschedule", "routing"))[1]
        counts = _switch_counts(url.replace("admin/reschedule", "metrics"), want_switches=2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        kill_group(proc)
    (s1, e1), (s2, e2), (s3, ok) = answers
    assert (s1, e1["error"]["param"]) == (400, "routing")
    assert "worker inf is not an integer" in e1["error"]["message"]
    assert (s2, e2["error"]["param"]) == (400, "routing")
    assert "worker 1 is decode, not prefill" in e2["error"]["message"]
    assert (s3, ok["roles"]) == (200, swap)  # the new roles fit it: accepted
    assert routing == {"routing": [{"prefill": 1, "decode": 0, "req_per_s": 1.0, "routed": 0}]}
    # one reschedule, two workers switched: reschedule_seconds counted it 1 + 2 times before
    assert counts == {"reschedule": 1, "switches": 2}


def _histogram_count(metrics_text: str, name: str) -> int:
    """``thunderkv_<name>_seconds_count`` in Prometheus text (-1 when absent)."""
    found = re.search(rf"^thunderkv_{name}_seconds_count (\d+)", metrics_text, re.M)
    return int(found.group(1)) if found else -1


def _switch_counts(metrics_url: str, want_switches: int, timeout: float = 30.0) -> dict:
    """reschedule_seconds and role_switch_seconds counts from /metrics, once the workers'
    acknowledgements (asynchronous) reached ``want_switches`` or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            text = r.read().decode()

        counts = {key: _histogram_count(text, name) for key, name in
                  (("reschedule", "reschedule"), ("switches", "role_switch"))}
        if counts["switches"] >= want_switches or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


# --- metrics -----------------------------------------------------------------------------------


def test_histograms_keep_a_bounded_number_of_samples():
    """Every observation was kept for benchmark percentiles, so a server's memory grew with
    every decode step for as long as it ran."""
    cap = getattr(M, "MAX_SAMPLES", 100_000)
    h = M.Histogram("x", "x")
    for i in range(cap + 500):
        h.observe(float(i))
    assert len(h.samples) == cap
    assert list(h.samples)[-1] == cap + 499  # the latest ones
    assert f"x_count {cap + 500}" in h.render()  # the exposition still counts them all
