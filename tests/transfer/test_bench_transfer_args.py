"""`thunderkv bench transfer`: user errors end in one red line and an exit code, not a
traceback, and bad arguments are caught before any process starts (nothing here spawns the
benchmark's server or client: the ``no_spawn`` fixture fails a test that would)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from thunderkv.bench import transfer
from thunderkv.cli import main
from thunderkv.cli.bench import EXIT_SKIPPED, _report_transfer
from thunderkv.transfer import unavailable_reason

needs_ucx = pytest.mark.skipif(unavailable_reason() is not None,
                               reason=f"UCX transfer unavailable: {unavailable_reason()}")
TOKEN = "bench-args-token-0123456789abcdef"


REAL = {name: getattr(transfer, name) for name in ("run_pair", "serve", "run_client")}


class Spawned(Exception):
    """What the stubs raise instead of starting a server or a client."""


@pytest.fixture(autouse=True)
def no_spawn(monkeypatch):
    def spawned(*a, **kw):
        raise Spawned

    for name in ("run_pair", "serve", "run_client"):
        monkeypatch.setattr(transfer, name, spawned)
    monkeypatch.setenv("THUNDERKV_TRANSFER_TOKEN", TOKEN)


def bench(capsys, *argv: str) -> tuple[int, str]:
    code = main(["bench", "transfer", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out + err


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.endswith("\n"), text
    return text.strip()


@pytest.mark.parametrize("argv, says", [
    # 1: an unknown model names the flag and the known models
    (["--case", "nosuchmodel:64"], "--case nosuchmodel:64: unknown model 'nosuchmodel'; known: "
                                   "smollm2-135m, llama-13b, llama-30b, llama-70b, llama-7b"),
    (["--model", "nosuchmodel"], "--model nosuchmodel: unknown model 'nosuchmodel'"),
    (["--case", "llama-7b"], "--case llama-7b: expected MODEL:TOKENS"),
    (["--case", "llama-7b:many"], "--case llama-7b:many: expected MODEL:TOKENS"),
    # 2, 3: token counts (negative, zero, huge)
    (["--case", "llama-7b:-64"], "--case llama-7b:-64: prompt tokens must be >= 1, got -64"),
    (["--case", "llama-7b:0"], "--case llama-7b:0: prompt tokens must be >= 1, got 0"),
    (["--tokens", "0"], "--tokens 0: prompt tokens must be >= 1, got 0"),
    (["--tokens", "100000000"], "--tokens 100000000: 100000000 tokens is over the receiver's "
                                "limit of 16777216 tokens per message"),
    (["--case", "llama-70b:1000000"], "--case llama-70b:1000000: one raw message of llama-70b at "
                                      "1000000 tokens is 327.7 GB, over the receiver's cap"),
    # 3: group sizes: whole bytes, dividing head_dim of every case
    (["--group-size", "7"], "--group-size 7: not a format v1 group size for these cases: it "
                            "must divide head_dim 64 (smollm2-135m), 128 (llama-7b, llama-30b)"),
    (["--group-size", "128", "--case", "smollm2:64"], "valid here: 2, 4, 8, 16, 32, 64"),
    (["--group-size", "2", "--bits", "2", "--case", "smollm2:64"], "valid here: 4, 8, 16, 32"),
    (["--group-size", "0", "--quick"], "--group-size 0: not a format v1 group size"),
    # 4: the rate's syntax
    (["--rate", "bogus"], "--rate: invalid rate 'bogus': expected e.g. '100mbit'"),
    (["--rate", "0mbit"], "--rate: invalid rate '0mbit'"),
    (["--role", "server", "--rate", "1gbit"], "--rate shapes the link between the two sides"),
    # 6: timeouts and other numbers
    (["--timeout", "0"], "--timeout must be > 0 seconds, got 0"),
    (["--timeout", "-1"], "--timeout must be > 0 seconds, got -1"),
    (["--timeout", "nan"], "--timeout must be > 0 seconds, got nan"),
    (["--role", "server", "--timeout", "0"], "--timeout must be > 0 seconds"),
    (["--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["--role", "server", "--pool-bytes", "0"], "--pool-bytes must be >= 1, got 0"),
    (["--reps", "0"], "--inflight and --reps must be >= 1"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["--json", "/nonexistent-dir/rows.jsonl"], "--json /nonexistent-dir/rows.jsonl: no "
                                                "directory /nonexistent-dir"),
])
def test_bad_arguments_give_one_red_line_and_exit_2(capsys, argv, says):
    code, out = bench(capsys, *argv)
    assert code == 2
    assert says in one_line(out)


def test_unknown_model_does_not_blame_model_flag(capsys):
    code, out = bench(capsys, "--case", "nosuchmodel:64")
    assert code == 2 and "--model" not in out


def test_pools_larger_than_memory_are_refused_up_front(capsys, monkeypatch):
    monkeypatch.setattr(transfer, "available_bytes", lambda device: 1 << 30)
    # llama-7b: 512 KiB of raw KV per token, so 4096 tokens is a 2.1 GB message
    code, out = bench(capsys, "--case", "llama-7b:4096")
    assert code == 2
    assert one_line(out).startswith("the pools need 6.5 GB (receive pool 4.3 GB + send pools "
                                    "1 x 2.1 GB for llama-7b:4096) but there is only 1.1 GB")
    code, out = bench(capsys, "--role", "server", "--pool-bytes", str(4 << 30))
    assert code == 2 and "use a smaller --pool-bytes" in one_line(out)
    code, out = bench(capsys, "--role", "client", "--case", "llama-7b:4096", "--inflight", "2")
    assert code == 2 and "(send pools 2 x 2.1 GB for llama-7b:4096)" in one_line(out)


@pytest.mark.parametrize("role", ["server", "client"])
def test_one_side_without_a_token_says_so(capsys, monkeypatch, role):
    monkeypatch.delenv("THUNDERKV_TRANSFER_TOKEN")
    monkeypatch.delenv("THUNDERKV_TRANSFER_TOKEN_FILE", raising=False)
    code, out = bench(capsys, "--role", role, "--case", "smollm2:64")
    assert code == 2 and one_line(out).startswith("no transfer token: set $THUNDERKV_TRANSFER")
    monkeypatch.setenv("THUNDERKV_TRANSFER_TOKEN", "short")
    code, out = bench(capsys, "--role", role, "--case", "smollm2:64")
    assert code == 2 and "is 5 bytes; use at least 16" in one_line(out)


@needs_ucx
def test_valid_arguments_reach_the_spawn(capsys):
    """The checks above do not refuse what runs: raw-only messages need no group size."""
    for argv in (["--case", "smollm2:64"], ["--group-size", "7", "--bits", "16"],
                 ["--model", "llama-7b", "--tokens", "16"], ["--role", "server"],
                 ["--role", "client", "--case", "smollm2:64", "--group-size", "32"]):
        with pytest.raises(Spawned):
            main(["bench", "transfer", "--no-perftest", *argv])


@needs_ucx
def test_rate_without_shaping_fails_with_exit_3_unless_skips_are_allowed(
        capsys, monkeypatch, tmp_path):
    from thunderkv.transfer import netshape

    monkeypatch.setattr(netshape, "shaping_unavailable_reason", lambda: "no netns here")
    rows = tmp_path / "rows.jsonl"
    code, out = bench(capsys, "--rate", "100mbit", "--quick", "--json", str(rows))
    assert code == EXIT_SKIPPED == 3
    assert one_line(out) == ("--rate 100mbit: link shaping unavailable here: no netns here "
                             "(--allow-skip skips instead of failing)")
    assert not rows.exists()
    code, out = bench(capsys, "--rate", "100mbit", "--quick", "--allow-skip")
    assert code == 0 and one_line(out).startswith("skipping --rate 100mbit (--allow-skip)")
    code, out = bench(capsys, "--quick", "--allow-skip")  # nothing to skip: not silently ignored
    assert code == 2 and one_line(out) == ("--allow-skip applies to --rate (a shaped link that "
                                           "may be unavailable)")


# ---------------------------------------------------------------- 5: one side, real sockets
# The real server / client role, in this process: they fail before serving or sending.
@needs_ucx
def test_client_without_a_server_says_so(capsys, monkeypatch):
    monkeypatch.setattr(transfer, "run_client", REAL["run_client"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out = bench(capsys, "--role", "client", "--port", str(port), "--case", "smollm2:64")
    assert code == 2
    assert one_line(out).startswith(f"transfer failed: cannot connect to 127.0.0.1:{port}")
    assert "--role server` running there?" in out


@needs_ucx
def test_client_with_the_wrong_token_says_so(capsys, monkeypatch):
    from thunderkv.transfer import KVReceiver

    monkeypatch.setattr(transfer, "run_client", REAL["run_client"])
    with KVReceiver(1 << 20, token="another-token-0123456789abcdef") as rx:
        code, out = bench(capsys, "--role", "client", "--port", str(rx.port),
                          "--case", "smollm2:64")
    assert code == 2
    assert one_line(out).endswith("refused: authentication failed (both sides need the same "
                                  "$THUNDERKV_TRANSFER_TOKEN)")


@needs_ucx
def test_server_on_a_port_in_use_says_so(capsys, monkeypatch):
    import signal

    monkeypatch.setattr(transfer, "serve", REAL["serve"])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, out = bench(capsys, "--role", "server", "--port", str(port),
                          "--pool-bytes", str(1 << 20))
    assert code == 2
    assert one_line(out) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# ---------------------------------------------------------------- 2: a server that won't start
def test_a_server_that_cannot_start_shows_its_last_words():
    argv = [sys.executable, "-c", "import sys; print('starting'); "
            "sys.stderr.write('Traceback ...\\nValueError: pool size must be positive\\n'); "
            "sys.exit(1)"]
    with pytest.raises(transfer.PeerFailed) as got:
        transfer._run_pair(argv, ["never-run"], {}, None)
    text = str(got.value)
    assert text.startswith("the transfer server exited with code 1")
    assert "server: starting" in text and "server: ValueError: pool size must be positive" in text
    assert got.value.exit_code == 1


def test_a_silent_server_times_out_and_is_stopped():
    proc = transfer._spawn([sys.executable, "-c", "import time; time.sleep(60)"], None,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = transfer._Lines(proc.stdout), transfer._Lines(proc.stderr)
        with pytest.raises(transfer.PeerFailed, match="did not start within 0.5 s"):
            transfer._wait_listening(proc, out, err, 0.5)
    finally:
        transfer._stop(proc, 5)
    assert proc.returncode is not None


# ---------------------------------------------------------------- 8: the table's footer
def _rows(perftest: bool) -> list[dict]:
    row = {"model": "smollm2-135m", "tokens": 64, "bits": 16, "payload_bytes": 1_474_560,
           "kv_bytes": 1_474_560, "seconds_p50": 1e-3, "wire_bytes_per_s": 1.47e9,
           "put_bytes_per_s": 5e9, "effective_kv_bytes_per_s": 1.47e9, "transport": "cma/memory"}
    if perftest:
        row.update(perftest_runs_bytes_per_s=[4e9, 5e9, 6e9], perftest_put_bytes_per_s=5e9,
                   put_vs_perftest=1.0, e2e_vs_perftest=0.29)
    return [row]


@pytest.mark.parametrize("perftest", [False, True])
def test_perftest_footer_only_when_perftest_ran(capsys, perftest):
    from rich.console import Console

    args = argparse.Namespace(device="cpu", inflight=1, json=None, plot=None)
    assert _report_transfer(Console(), args, _rows(perftest), rate=None) == 0
    out = capsys.readouterr().out
    assert ("perftest: median (range) of its runs" in out) == perftest
    assert ("5.00 (4.0-6.0)" in out) == perftest


def test_a_drop_or_stall_mid_run_is_a_failure_not_a_usage_error():
    """Exit 2 is for a peer that cannot be reached; a connection that drops or stalls during
    the run (their causes are OSErrors too: TimeoutError, a reset) exits 1."""
    from thunderkv.cli.bench import _transfer_failed
    from thunderkv.transfer import ConnectionClosed, TransferError, TransferTimeout

    def raised(exc, cause):
        try:
            raise exc from cause
        except TransferError as e:
            return e

    assert _transfer_failed(raised(TransferError("cannot connect"),
                                   ConnectionRefusedError()))[1] == 2
    assert _transfer_failed(raised(TransferTimeout("no ACK"), TimeoutError()))[1] == 1
    assert _transfer_failed(raised(ConnectionClosed("reset"), ConnectionResetError()))[1] == 1
