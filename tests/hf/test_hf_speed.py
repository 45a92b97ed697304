"""Decode-speed measurement (thunderkv eval speed) on the tiny model: shape of the result."""

from __future__ import annotations

import pytest
import transformers.utils
from conftest import prompt

from thunderkv.hf.speed import decode_speed


def test_decode_speed_rows_and_same_run_baseline(tiny):
    _, model = tiny
    ids = prompt(1, 200)
    rows = decode_speed(model, ids, ["fp", "thunderkv4"], [64, 160], steps=3, group_size=32,
                        residual_length=32)
    assert [(r["context"], r["cache"]) for r in rows] == [
        (64, "fp"), (64, "thunderkv4"), (160, "fp"), (160, "thunderkv4")]
    for r in rows:
        assert r["status"] == "ok" and r["decode_tok_s"] > 0 and r["steps"] == 3
    assert all(r["speed_vs_fp"] == 1.0 for r in rows if r["cache"] == "fp")
    fp160, tk160 = rows[2], rows[3]
    assert tk160["cache_bytes"] < fp160["cache_bytes"] / 2  # 4-bit history + 32-token window


def test_decode_speed_rejects_short_text(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="fewer than context"):
        decode_speed(model, prompt(1, 10), ["fp"], [64])


def test_a_cache_whose_package_is_missing_is_a_row(tiny, monkeypatch):
    """`thunderkv eval speed` lists hf-quanto4 by default: without optimum-quanto it must say
    so in its row, as `eval quality` does, not end the run with a traceback."""
    _, model = tiny
    monkeypatch.setattr(transformers.utils, "is_hqq_available", lambda: False)
    rows = decode_speed(model, prompt(1, 40), ["fp", "hf-hqq4"], [16], steps=2, group_size=32)
    assert [r["cache"] for r in rows] == ["fp", "hf-hqq4"] and rows[0]["status"] == "ok"
    assert rows[1] == {"context": 16, "cache": "hf-hqq4",
                       "status": "unavailable: hf-hqq4 needs `pip install hqq`"}
