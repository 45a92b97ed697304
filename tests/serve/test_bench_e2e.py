"""`thunderkv bench e2e` (tiny model): decode workers across a shaped veth link, output
identical to colocated, and the JSON a reader of the benchmark gets."""

from __future__ import annotations

import json

import pytest

from thunderkv.cli import main
from thunderkv.transfer import unavailable_reason
from thunderkv.transfer.netshape import shaping_unavailable_reason


@pytest.mark.skipif(unavailable_reason() is not None, reason="UCX transfer unavailable")
@pytest.mark.skipif(shaping_unavailable_reason() is not None,
                    reason=f"no shaped link here: {shaping_unavailable_reason()}")
def test_e2e_across_a_shaped_link(tmp_path):
    out = tmp_path / "e2e.jsonl"
    assert main(["bench", "e2e", "--model", "tiny", "--quick", "--mode", "colocated",
                 "--mode", "disagg-16", "--link-rate", "50mbit", "--json", str(out)]) == 0
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    colo, disagg = rows["colocated"], rows["disagg-16"]
    assert colo["failed"] == disagg["failed"] == 0
    assert disagg["identical_outputs"] == 1.0 and disagg["teacher_forced_top1"] == 1.0
    assert disagg["kv_bytes_moved"] > 0 and colo["kv_bytes_moved"] == 0
    assert disagg["link_rate_bps"] == 50_000_000 and "50 Mbit/s" in disagg["link"]
    assert all(t.startswith("tcp/") for t in disagg["transports"])  # over the veth, not shm
    assert disagg["ttft_p50_s"] > 0 and disagg["tpot_p50_s"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
    (["--link-rate", "garbage"], "argument --link-rate: invalid rate 'garbage'"),
    (["--link-rate", "0mbit"], "argument --link-rate: invalid rate '0mbit'"),
])
def test_bad_flags_are_a_usage_error_not_a_traceback(argv, message, capsys):
    """They used to fail with a ValueError traceback (exit 1), after starting work."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "e2e", "--model", "tiny", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.strip().splitlines()[-1].startswith(f"thunderkv bench e2e: error: {message}")
    assert "Traceback" not in err
