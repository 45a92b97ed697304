"""``--plot`` of bench quant / paged / attention: a PNG from rows as the benchmarks write them."""

from __future__ import annotations

import pytest

from thunderkv.cli import main

# matplotlib is in the [test] extra (pyproject.toml): no importorskip, a missing one must fail


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("what", ["quant", "paged"])
def test_bench_plots_against_the_copy(what, tmp_path, capsys):
    out = tmp_path / f"{what}.png"
    fast = ["--backend", "cpu"] + (["--reference-reps", "1"] if what == "quant" else [])
    assert main(["bench", what, "--quick", "--device", "cpu", "--reps", "2", *fast, "--plot",
                 str(out)]) == 0
    assert _png(out) and f"wrote {out}" in capsys.readouterr().out


def test_bench_attention_plots_time_against_context(tmp_path, capsys):
    from thunderkv.attention import fused_attention_available

    if not fused_attention_available()[0]:
        pytest.skip(fused_attention_available()[1])
    out = tmp_path / "attention.png"
    assert main(["bench", "attention", "--context", "64", "--context", "256", "--reps", "2",
                 "--plot", str(out)]) == 0
    assert _png(out)


def test_plot_vs_copy_keeps_graph_ratios_and_missing_cells(tmp_path):
    from thunderkv.bench.common import plot_vs_copy

    rows = [
        {"label": "a", "op": "copy", "backend": "torch", "ratio_to_copy": 1.0,
         "graph_ratio_to_copy": 1.0},
        {"label": "a", "op": "quantize", "backend": "cuda", "ratio_to_copy": 0.7,
         "graph_ratio_to_copy": 0.9},
        {"label": "b", "op": "quantize", "backend": "triton", "ratio_to_copy": 0.6},
    ]
    plot_vs_copy(rows, tmp_path / "x.png", "t", target=0.85)
    assert _png(tmp_path / "x.png")
