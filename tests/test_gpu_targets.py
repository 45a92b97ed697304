"""benchmarks/gpu_targets.py: the issue's GPU targets read off a gpu_check run's rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_targets", ROOT / "benchmarks" / "gpu_targets.py")
gpu_targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_targets)


def _row(bench, op, backend, gbps, ratio, shape=(1, 32, 8192, 128), env=None, device="cuda:0"):
    return {"bench": bench, "op": op, "backend": backend, "gbps": gbps, "ratio_to_copy": ratio,
            "shape": list(shape), "dtype": "float16", "axis": -2, "label": "llama-7b 32x8192",
            "env": env or {}, "device": device}


def test_verdicts_check_each_target_and_name_the_kernel_variant(tmp_path, capsys):
    rows = [
        _row("quant", "copy", "torch", 3000, 1.0),
        _row("quant", "quantize", "cuda", 2700, 0.90),                      # >= 0.85: met
        _row("quant", "quantize", "cuda", 1500, 0.50, env={"THUNDERKV_CUDA_SCALAR": "1"}),
        _row("quant", "quantize", "cuda", 2800, 0.93, env={"THUNDERKV_CUDA_COLS": "regs"}),
        _row("quant", "quantize", "triton", 2300, 0.77),                    # 0.85x of CUDA
        _row("quant", "quantize", "cuda", 100, 0.1, shape=(1, 8, 256, 128)),  # < 64 MiB: skipped
        _row("paged", "write", "cuda", 2500, 0.83),
        _row("paged", "gather", "triton", 2000, 0.66),
    ]
    found = {v["check"]: v for v in gpu_targets.verdicts(rows)}
    q = "quantize axis -2 float16 llama-7b 32x8192"
    assert found[f"{q} [cuda] vs copy [eager]"]["met"]
    assert not found[f"{q} [cuda/scalar] vs copy [eager]"]["met"]
    assert found[f"{q} [cuda/regs] vs copy [eager]"]["met"]
    assert not found[f"{q} [triton] vs copy [eager]"]["met"]
    tv = found[f"{q} triton vs cuda [eager]"]
    assert abs(tv["ratio"] - 2300 / 2700) < 1e-9 and not tv["met"]
    assert found["paged write float16 llama-7b 32x8192 [cuda] vs copy [eager]"]["met"]
    assert not found["paged gather float16 llama-7b 32x8192 [triton] vs copy [eager]"]["met"]
    assert len(found) == 7  # the small case and the copy row are not checks
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_targets.main([str(path), "--json", str(tmp_path / "t.json")]) == 0
    assert "3 of 7 checks met" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "t.json").read_text())) == 7


def test_a_cpu_dry_run_checks_nothing(tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(_row("quant", "quantize", "cpu", 10, 0.2, device="cpu")) + "\n")
    gpu_targets.main([str(path)])
    assert "nothing checked" in capsys.readouterr().out


def test_graph_timings_decide_where_a_row_has_them(capsys):
    """Eager per-call times carry Python and a host sync (tens of us against a 64 MiB kernel's
    20-40 us); where the bench also replayed the op from a CUDA graph, that ratio decides and
    the eager one is kept beside it."""
    def graphed(row, gbps, ratio):
        return {**row, "graph_gbps": gbps, "graph_ratio_to_copy": ratio}

    rows = [
        graphed(_row("quant", "quantize", "cuda", 1500, 0.50), 2900, 0.95),
        graphed(_row("quant", "quantize", "triton", 1400, 0.47), 2500, 0.82),
        _row("paged", "gather", "cuda", 900, 0.30),  # capture failed: eager decides
        graphed(_row("paged", "write", "triton", 900, 0.30), 2000, 0.79),
        # graph-timed, but the copy was not (no graph ratio): eager decides
        {**_row("paged", "write", "cuda", 900, 0.30), "graph_gbps": 2500},
    ]
    found = {v["check"]: v for v in gpu_targets.verdicts(rows)}
    q = "quantize axis -2 float16 llama-7b 32x8192"
    cuda = found[f"{q} [cuda] vs copy [graph]"]
    assert cuda["met"] and cuda["ratio"] == 0.95 and cuda["eager_ratio"] == 0.50
    assert not found[f"{q} [triton] vs copy [graph]"]["met"]
    tv = found[f"{q} triton vs cuda [graph]"]
    assert abs(tv["ratio"] - 2500 / 2900) < 1e-9 and abs(tv["eager_ratio"] - 1400 / 1500) < 1e-9
    assert not tv["met"]
    assert not found["paged gather float16 llama-7b 32x8192 [cuda] vs copy [eager]"]["met"]
    assert not found["paged write float16 llama-7b 32x8192 [triton] vs copy [graph]"]["met"]
    assert found["paged write float16 llama-7b 32x8192 [cuda] vs copy [eager]"]["ratio"] == 0.30
