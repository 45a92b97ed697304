"""What ``thunderkv bench quant`` / ``paged`` print and record: whole numbers on an 80-column
console, no nonzero value shown as 0, the check of every backend against the reference, and
every backend asked for timed."""

from __future__ import annotations

import json

import pytest
import torch

from thunderkv.cli import main


def _row(label: str, op: str, backend: str, **extra) -> dict:
    return {"label": label, "op": op, "backend": backend, "p50_s": 0.0123456, "gbps": 1234.56,
            "ratio_to_copy": 0.87, "device": "NVIDIA H200", "threads": 2, "reps": 10, **extra}


def _printed(rows: list[dict], monkeypatch, capsys, width: int = 80) -> str:
    """What ``bench quant`` prints for ``rows`` on a console ``width`` columns wide (piped:
    rich's default is 80)."""
    from thunderkv.bench import quant

    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setattr(quant, "run", lambda *a, **kw: rows)
    assert main(["bench", "quant", "--quick", "--device", "cpu"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("graph", [False, True])
def test_an_80_column_console_never_cuts_a_number(graph, monkeypatch, capsys):
    """Piped output is 80 columns wide: rich used to squeeze the table by cutting cells, so the
    large preset's labels (or the two CUDA-graph columns) turned 12.346 ms into "12.…"."""
    extra = {"graph_gbps": 4321.1, "graph_ratio_to_copy": 0.93} if graph else {}
    rows = [_row(label, op, backend, speedup_vs_reference=123.4, **extra)
            for label in ("llama-70b-tp1 64x8192", "llama-70b-tp1 64x16384")
            for op, backend in (("copy", "torch"), ("quantize", "reference"),
                                ("dequantize", "triton"))]
    out = _printed(rows, monkeypatch, capsys)
    assert "…" not in out
    for text in ("12.346", "1234.56", "0.87", "123", "dequantize", "reference", "llama-70b-tp1"):
        assert text in out
    if graph:
        assert "4321.10" in out and "graph x copy" in out
    else:  # fits 80 columns: the label wraps instead
        assert max(len(line) for line in out.splitlines()) <= 80
        assert "64x16384" in out


def test_slow_rows_are_not_printed_as_zero_or_rounded_up_to_one(monkeypatch, capsys):
    """An interpreted Triton run moves 0.0017 GB/s: "0.00" GB/s and "0.00" x copy read as
    nothing measured, and an x ref of 0.6 printed with no decimals read "1" (as fast as the
    reference)."""
    rows = [_row("tiny 8x256", "quantize", "triton", p50_s=6.19, gbps=0.0017,
                 ratio_to_copy=7.2e-05, speedup_vs_reference=0.6)]
    line = next(x for x in _printed(rows, monkeypatch, capsys, width=120).splitlines()
                if "triton" in x)
    cells = [c.strip() for c in line.split("│") if c.strip()]
    assert cells[3:] == ["6190.000", "0.0017", "7.2e-05", "0.6"]


def test_the_title_says_how_many_calls_each_p50_is_of(monkeypatch, capsys):
    """The table gave p50s without saying of how many calls (--reps, --reference-reps) or that
    a warm-up call came first."""
    rows = [_row("tiny 8x256", "copy", "numpy"), _row("tiny 8x256", "quantize", "cpu"),
            _row("tiny 8x256", "quantize", "reference", reps=3)]
    out = " ".join(_printed(rows, monkeypatch, capsys).split())
    assert "p50 of 10 (3 for the reference) timed calls after a warm-up call" in out


def test_numbers_keep_their_usual_places():
    from thunderkv.bench.common import number

    assert [number(v, 2) for v in (45.19, 1.0, 0.51, 0.1, 0.0)] == [
        "45.19", "1.00", "0.51", "0.10", "0.00"]
    assert [number(v, 0) for v in (648.2, 86.3, 9.5, 1.0)] == ["648", "86", "9.5", "1"]


def test_check_helpers_find_a_flipped_code_and_an_error_over_one_ulp(gen):
    from thunderkv.api import dequantize, quantize
    from thunderkv.bench.quant import codes_match, within_one_ulp

    x = torch.randn(4, 256, generator=gen).half()
    want = quantize(x, backend="reference")
    y = dequantize(want, backend="reference")
    assert codes_match(quantize(x, backend="cpu"), want)
    bad = quantize(x, backend="cpu")
    i = int(torch.randint(bad.packed.numel(), (1,), generator=gen))
    bad.packed.view(-1)[i] ^= 1
    assert not codes_match(bad, want)
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    assert within_one_ulp(up, y)
    assert not within_one_ulp(torch.nextafter(up, torch.full_like(y, float("inf"))), y)
    nan = y.clone()
    nan.view(-1)[i % nan.numel()] = float("nan")
    assert not within_one_ulp(nan, y)


def test_quant_checks_each_backend_against_the_reference_before_timing(tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    assert main(["bench", "quant", "--quick", "--device", "cpu", "--reps", "1",
                 "--backend", "cpu", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cpu = [r for r in rows if r["backend"] == "cpu"]
    assert len(cpu) == 4 and all(r["matches_reference"] is True for r in cpu)
    assert all("matches_reference" not in r for r in rows if r["op"] == "copy")
    assert "checked against the reference before timing: all 4 match" in " ".join(
        capsys.readouterr().out.split())


def test_quant_fails_when_a_backend_differs_from_the_reference(tmp_path, capsys, monkeypatch,
                                                               gen):
    """A kernel that writes wrong codes used to be timed and reported like any other, exit 0."""
    from thunderkv.bench import quant

    real = quant.quantize
    flip = int(torch.randint(1 << 20, (1,), generator=gen))

    def broken(x, **kw):
        q = real(x, **kw)
        if kw.get("backend") == "cpu":
            q.packed.view(-1)[flip % q.packed.numel()] ^= 0x10
        return q

    monkeypatch.setattr(quant, "quantize", broken)
    out = tmp_path / "q.jsonl"
    assert main(["bench", "quant", "--quick", "--device", "cpu", "--reps", "1",
                 "--backend", "cpu", "--json", str(out)]) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    check = {(r["label"], r["op"]): r["matches_reference"] for r in rows if r["backend"] == "cpu"}
    assert check == {("tiny 8x256", "quantize"): False, ("tiny 8x256", "dequantize"): True,
                     ("llama-7b 32x1024", "quantize"): False,
                     ("llama-7b 32x1024", "dequantize"): True}
    text = " ".join(capsys.readouterr().out.split())
    assert "2 of 4 DIFFER" in text
    assert "quantize [cpu] on tiny 8x256: output differs from the reference" in text


def test_paged_times_a_reference_backend_that_was_asked_for(tmp_path):
    """``--backend cpu --backend reference`` silently dropped the reference."""
    out = tmp_path / "p.jsonl"
    assert main(["bench", "paged", "--quick", "--device", "cpu", "--reps", "1",
                 "--backend", "cpu", "--backend", "reference", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    timed = {(r["op"], r["backend"]) for r in rows}
    assert {("write", "cpu"), ("gather", "cpu"), ("write", "reference"),
            ("gather", "reference")} <= timed
