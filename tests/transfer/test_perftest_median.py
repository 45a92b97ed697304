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
    with pytest.raises(ValueError, match="runs must be >= 1"):
        transfer.add_perftest(rows, lambda s: None, runs=0)


def test_interleaved_baseline_runs_between_send_blocks(monkeypatch):
    """Both roles here: each perftest run comes just before a block of the sends, so the two
    see the same machine state; every send still happens once."""
    from thunderkv.bench import transfer
    from thunderkv.transfer import ucxtools

    events: list = []
    figures = iter([5e9, 9e9, 6e9])

    def fake(n, timeout, memory=None, gpu=None):
        events.append(("perftest", n, memory, gpu))
        return {"bandwidth_bytes_per_s": next(figures), "transport_used": "cma"}

    def sends(n):
        events.append(("sends", n))
        return [object()] * n, 0.5 * n

    monkeypatch.setattr(ucxtools, "run_perftest_put_bw", fake)
    results, wall, out = transfer.interleave(sends, 10, 3, 1 << 20, "cuda:1")
    assert events == [("perftest", 1 << 20, "cuda", 1), ("sends", 4),
                      ("perftest", 1 << 20, "cuda", 1), ("sends", 3),
                      ("perftest", 1 << 20, "cuda", 1), ("sends", 3)]
    assert len(results) == 10 and wall == 5.0
    assert out == {"perftest_interleaved": True, "perftest_transport": "cma",
                   "perftest_runs_bytes_per_s": [5e9, 9e9, 6e9]}
    row = {"bits": 16, "put_bytes_per_s": 12e9, "wire_bytes_per_s": 3e9} | out
    transfer._perftest_ratios(row)
    assert row["perftest_put_bytes_per_s"] == 6e9 and row["e2e_vs_perftest"] == 0.5
    transfer.add_perftest([row], lambda s: None, runs=3)  # not measured again afterwards
    assert len(events) == 6

    # more runs than sends: every run still happens; no runs: one block, no perftest
    events.clear()
    figures = iter([5e9, 9e9, 6e9])
    assert len(transfer.interleave(sends, 2, 3, 64, "cpu")[0]) == 2
    assert [e[0] for e in events] == ["perftest", "sends", "perftest", "sends", "perftest"]
    assert events[0][2:] == (None, None)
    events.clear()
    assert transfer.interleave(sends, 4, 0, 64)[2] == {} and events == [("sends", 4)]


def test_interleaved_baseline_failure_sends_the_rest(monkeypatch):
    """A perftest that fails is recorded; the remaining sends still run, in one block."""
    from thunderkv.bench import transfer
    from thunderkv.transfer import ucxtools

    calls = []

    def fake(n, timeout, memory=None, gpu=None):
        calls.append(n)
        if len(calls) == 2:
            raise RuntimeError("ucx_perftest failed\nmore")
        return {"bandwidth_bytes_per_s": 7e9}

    blocks = []
    monkeypatch.setattr(ucxtools, "run_perftest_put_bw", fake)
    results, _, out = transfer.interleave(lambda n: (blocks.append(n) or [0] * n, 1.0), 9, 3, 8)
    assert blocks == [3, 6] and len(results) == 9
    assert out["perftest_error"] == "ucx_perftest failed"
    assert out["perftest_runs_bytes_per_s"] == [7e9]
