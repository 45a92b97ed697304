"""`thunderkv bench transfer --plot`: the figure from rows alone (no UCX needed)."""

from __future__ import annotations

import sys

import pytest


def rows(perftest: bool) -> list[dict]:
    out = []
    for model, tokens, mb in (("smollm2-135m", 2048, 47.2), ("llama-7b", 256, 134.2)):
        raw = {"model": model, "tokens": tokens, "bits": 16, "payload_bytes": mb * 1e6,
               "effective_kv_bytes_per_s": 5e9, "wire_bytes_per_s": 5e9,
               "put_bytes_per_s": 6e9, "speedup_vs_raw": 1.0, "link": "loopback",
               "transport": "cma/memory", "device": "cpu"}
        if perftest:
            raw |= {"perftest_put_bytes_per_s": 6.5e9, "perftest_runs_bytes_per_s":
                    [6.4e9, 6.5e9, 7.1e9], "e2e_vs_perftest": 5 / 6.5}
        q4 = dict(raw, bits=4, payload_bytes=mb * 1e6 / 3.56, effective_kv_bytes_per_s=17e9,
                  speedup_vs_raw=3.4)
        for k in [k for k in q4 if k.startswith(("perftest", "e2e"))]:
            del q4[k]
        out += [raw, q4]
    return out


@pytest.mark.parametrize("perftest", [True, False])  # loopback / a shaped link (no perftest)
def test_plot_writes_a_png(tmp_path, perftest):
    # matplotlib is in the [test] extra: a missing one fails here instead of skipping
    from thunderkv.bench import transfer

    png = tmp_path / "t.png"
    transfer.plot(rows(perftest), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_raises_import_error(tmp_path, monkeypatch):
    """The CLI turns this into a one-line hint; the table and JSON are written regardless."""
    from thunderkv.bench import transfer

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="--plot needs matplotlib: pip install matplotlib"):
        transfer.plot(rows(True), tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
