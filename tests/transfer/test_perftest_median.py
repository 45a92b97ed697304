"""`thunderkv bench transfer`'s perftest baseline: the median of several runs (pure Python:
``ucx_perftest`` replaced by a stand-in, so it runs without UCX)."""

from __future__ import annotations

import pytest


def test_perftest_baseline_is_the_median_of_its_runs(monkeypatch):
    """Every run's figure is kept; the ratios use the median (one run swings ~2x here)."""
    from thunderkv.bench import transfer
    from thunderkv.transfer import ucxtools

    figures = iter([4e9, 10e9, 7e9])
    asked = []

    def fake(n, timeout, memory=None, gpu=None):
        asked.append((memory, gpu))
        return {"bandwidth_bytes_per_s": next(figures), "transport_used": "cma"}

    monkeypatch.setattr(ucxtools, "run_perftest_put_bw", fake)
    rows = [{"bits": 16, "payload_bytes": 1 << 20, "put_bytes_per_s": 14e9,
             "wire_bytes_per_s": 3.5e9}, {"bits": 4, "payload_bytes": 1 << 18}]
    transfer.add_perftest(rows, lambda s: None, runs=3, memory="cuda", gpu=1)
    assert asked == [("cuda", 1)] * 3  # GPU pools are compared with GPU buffers, same GPU
    assert rows[0]["perftest_runs_bytes_per_s"] == [4e9, 10e9, 7e9]
    assert rows[0]["perftest_put_bytes_per_s"] == 7e9
    assert rows[0]["put_vs_perftest"] == 2.0 and rows[0]["e2e_vs_perftest"] == 0.5
    assert "perftest_put_bytes_per_s" not in rows[1]  # 4-bit rows have no perftest twin
    with pytest.raises(ValueError):
        transfer.add_perftest(rows, lambda s: None, runs=0)
