"""Decode attention over a packed KIVI cache (compiled CPU kernel) against its float64 definition."""

from __future__ import annotations

import pytest
import torch

from thunderkv.api import quantize
from thunderkv.attention import (
    fused_attention_available,
    kivi_decode_attention,
    kivi_decode_attention_reference,
)

pytestmark = pytest.mark.skipif(not fused_attention_available()[0],
                                reason=fused_attention_available()[1])

# Output tolerance: the kernel sums in float32 in another order and narrows once to the dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(gen, *, B, H, R, D, S, Tr, G, bits, dtype, spread=1.0):
    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * spread).to(dtype)

    qk = qv = None
    if S:
        qk = quantize(rnd(B, H, S, D), bits=bits, group_size=G, axis=-2, backend="cpu")
        qv = quantize(rnd(B, H, S, D), bits=bits, group_size=G, axis=-1, backend="cpu")
    return rnd(B, H * R, D), qk, qv, rnd(B, H, Tr, D), rnd(B, H, Tr, D)


CASES = [  # B, H, R, D, S, Tr, G, bits
    (1, 3, 3, 64, 4096, 100, 64, 4),   # SmolLM2-like decode at 4k context
    (2, 2, 4, 32, 96, 5, 32, 4),
    (3, 1, 1, 16, 48, 0, 16, 2),       # no residual
    (1, 2, 2, 24, 0, 7, 6, 8),         # no history; G not a multiple of 16
    (2, 1, 8, 48, 144, 3, 48, 8),      # 8 query heads per KV head (generic loop)
    (1, 2, 3, 20, 40, 1, 10, 4),       # odd head_dim, G=10
    (2, 3, 5, 32, 32 * 9, 33, 32, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}R{}D{}S{}Tr{}G{}b{}".format(*c))
def test_matches_reference(cpu_variant, case, dtype, gen):
    B, H, R, D, S, Tr, G, bits = case
    args = make_case(gen, B=B, H=H, R=R, D=D, S=S, Tr=Tr, G=G, bits=bits, dtype=dtype)
    mask = torch.rand(B, S + Tr, generator=gen) > 0.25
    for key_mask in (None, mask):
        got = kivi_decode_attention(*args, key_mask=key_mask)
        want = kivi_decode_attention_reference(*args, key_mask=key_mask)
        assert got.dtype == dtype and got.shape == (B, H * R, D)
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_prefix_of_history_and_scaling(cpu_variant, bits, gen):
    """tq_attend skips the newest quantized groups (they are still exact in the residual)."""
    args = make_case(gen, B=2, H=2, R=3, D=32, S=128, Tr=9, G=16, bits=bits,
                     dtype=torch.float32, spread=3.0)
    for tq in (0, 16, 112):
        got = kivi_decode_attention(*args, tq_attend=tq, scaling=0.3)
        want = kivi_decode_attention_reference(*args, tq_attend=tq, scaling=0.3)
        # values ~3x larger than elsewhere: float32 cancellation in sum(q*s*code) + sum(q*min)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fully_masked_rows_give_zeros_and_others_unaffected(cpu_variant, gen):
    args = make_case(gen, B=2, H=1, R=2, D=16, S=32, Tr=4, G=16, bits=4, dtype=torch.float32)
    mask = torch.ones(2, 36, dtype=torch.bool)
    mask[0] = False
    got = kivi_decode_attention(*args, key_mask=mask)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got[1], kivi_decode_attention(*args)[1], rtol=1e-6, atol=1e-6)
    # and the unmasked row is right, not only unchanged (against the float64 definition)
    torch.testing.assert_close(got[1], kivi_decode_attention_reference(*args, key_mask=mask)[1],
                               rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_large_logits_stay_finite(cpu_variant, gen):
    """Scores in the thousands: the running-max merge across chunks must not overflow."""
    args = make_case(gen, B=1, H=2, R=2, D=64, S=2048, Tr=3, G=64, bits=4,
                     dtype=torch.float32, spread=30.0)
    got = kivi_decode_attention(*args)
    assert torch.isfinite(got).all()
    # Logits reach ~4,000 where a float32 ulp is 5e-4: summation order alone moves a logit by
    # ~1e-3, i.e. a softmax weight by ~1e-3 relative, and the output by ~1e-3 * |v_i - v_j|
    # (values ~ N(0, 30^2)). Measured over 300 seeds: at most 0.024. A broken max/merge is off by
    # O(spread), far above this bound (rtol/atol 1e-4 failed ~15 % of seeds).
    torch.testing.assert_close(got, kivi_decode_attention_reference(*args), rtol=0,
                               atol=3e-3 * 30.0)


def test_threads_do_not_change_the_result_much(gen):
    args = make_case(gen, B=1, H=3, R=3, D=64, S=2048, Tr=10, G=64, bits=4, dtype=torch.float32)
    one = kivi_decode_attention(*args, threads=1)
    two = kivi_decode_attention(*args, threads=2)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)  # chunking follows threads


def test_bad_inputs_raise_clearly(gen):
    q, qk, qv, kr, vr = make_case(gen, B=1, H=2, R=2, D=32, S=64, Tr=2, G=32, bits=4,
                                  dtype=torch.float32)
    with pytest.raises(ValueError, match="query must be"):
        kivi_decode_attention(q[:, :, None], qk, qv, kr, vr)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kivi_decode_attention(q[:, :3], qk, qv, kr, vr)
    with pytest.raises(ValueError, match="both be given"):
        kivi_decode_attention(q, qk, None, kr, vr)
    keys_per_token = quantize(torch.randn(1, 2, 64, 32), bits=4, group_size=32, axis=-1)
    with pytest.raises(ValueError, match="KIVI layout"):
        kivi_decode_attention(q, keys_per_token, qv, kr, vr)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        kivi_decode_attention(q, qk, qv, kr, vr, key_mask=torch.ones(1, 66))
    with pytest.raises(ValueError, match="key_mask must be bool"):
        kivi_decode_attention(q, qk, qv, kr, vr, key_mask=torch.ones(1, 65, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of group_size"):
        kivi_decode_attention(q, qk, qv, kr, vr, tq_attend=10)
    with pytest.raises(ValueError, match="outside"):
        kivi_decode_attention(q, qk, qv, kr, vr, tq_attend=96)
    with pytest.raises(ValueError, match="differ"):
        kivi_decode_attention(q, qk, qv, kr, vr[:, :, :1])


def test_bench_attention_rows():
    from thunderkv.bench.attention import run

    rows = run("smollm2-135m", [200, 64], reps=2, residual=16)
    assert [(r["context"], r["method"]) for r in rows] == [
        (200, "fused"), (200, "sdpa-fp"), (200, "dequant+sdpa"),
        (64, "fused"), (64, "sdpa-fp"), (64, "dequant+sdpa")]
    first = rows[0]
    assert first["quantized_tokens"] + first["residual_tokens"] == 200
    assert first["quantized_tokens"] % 64 == 0 and first["residual_tokens"] >= 16
    assert all(r["us_p50"] > 0 for r in rows)
    with pytest.raises(ValueError, match="unknown geometry"):
        run("gpt-5", [64])


def _relabel(q, *, shape=None, dtype=None, **parts):
    """``q`` with other metadata or stored tensors: a QuantizedTensor that lies about itself."""
    from thunderkv.api import QuantizedTensor

    return QuantizedTensor(parts.get("packed", q.packed), parts.get("scale", q.scale),
                           parts.get("minimum", q.minimum), q.spec,
                           torch.Size(q.shape if shape is None else shape),
                           q.dtype if dtype is None else dtype)


@pytest.mark.parametrize("fn", [kivi_decode_attention, kivi_decode_attention_reference])
def test_stored_tensors_are_checked_against_the_metadata(gen, fn):
    """The kernel indexes packed/scale/minimum by ``shape``/``dtype``: a QuantizedTensor
    claiming more tokens than it stores read out of bounds (segfault), a wrong dtype read
    garbage (NaN). Both must raise before anything runs."""
    q, qk, qv, kr, vr = make_case(gen, B=1, H=2, R=2, D=32, S=64, Tr=2, G=32, bits=4,
                                  dtype=torch.float32)
    S = 1 << 22
    with pytest.raises(ValueError, match=r"qkeys.shape is .* hold a \(1, 2, 64, 32\)"):
        fn(q, _relabel(qk, shape=(1, 2, S, 32)), _relabel(qv, shape=(1, 2, S, 32)), kr, vr)
    with pytest.raises(ValueError, match="qvalues.shape"):
        fn(q, qk, _relabel(qv, shape=(1, 2, 64, 64)), kr, vr)
    with pytest.raises(ValueError, match="qkeys.dtype is torch.float16"):
        fn(q, _relabel(qk, dtype=torch.float16), _relabel(qv, dtype=torch.float16), kr, vr)
    with pytest.raises(ValueError, match="qvalues: scale must have shape"):
        fn(q, qk, _relabel(qv, scale=qv.scale[..., :1, :]), kr, vr)
    with pytest.raises(TypeError, match="qkeys: packed must be uint8"):
        fn(q, _relabel(qk, packed=qk.packed.to(torch.int16)), qv, kr, vr)
    with pytest.raises(TypeError, match="qkeys must be a QuantizedTensor"):
        fn(q, qk.packed, qv, kr, vr)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
@pytest.mark.parametrize("history", [False, True])
def test_query_dtype_outside_the_format_raises_typeerror(gen, dtype, history):
    q, qk, qv, kr, vr = make_case(gen, B=1, H=2, R=2, D=32, S=64 if history else 0, Tr=3,
                                  G=32, bits=4, dtype=torch.float32)
    with pytest.raises(TypeError, match="query must be float16, bfloat16 or float32"):
        kivi_decode_attention(q.to(dtype), qk, qv, kr, vr)


def test_empty_batch_returns_an_empty_output():
    """A batch of 0 sequences used to kill the process (SIGFPE: the C++ kernel divides by
    batch * kv_heads when it splits the work), so this runs in a child process."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from thunderkv.attention import kivi_decode_attention as f\n"
        "kr = torch.randn(0, 2, 3, 32)\n"
        "out = f(torch.randn(0, 4, 32), None, None, kr, kr.clone(), backend='cpu')\n"
        "assert out.shape == (0, 4, 32) and out.dtype == torch.float32, out.shape\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_empty_head_dim_raises_valueerror(gen):
    """head_dim 0 used to raise ZeroDivisionError (1 / sqrt(0)) instead of naming the rule."""
    q, _, _, kr, vr = make_case(gen, B=1, H=2, R=2, D=32, S=0, Tr=2, G=32, bits=4,
                                dtype=torch.float32)
    for fn in (kivi_decode_attention, kivi_decode_attention_reference):
        with pytest.raises(ValueError, match="head_dim"):
            fn(q[..., :0], None, None, kr[..., :0], vr[..., :0])


@pytest.mark.parametrize("which", ["key_residual", "value_residual"])
def test_integer_residual_raises_typeerror(gen, which):
    """Integer K/V residuals used to be cast to float32 silently."""
    q, qk, qv, kr, vr = make_case(gen, B=1, H=2, R=2, D=32, S=64, Tr=3, G=32, bits=4,
                                  dtype=torch.float32)
    kr, vr = (x.round().to(torch.int32) if name == which else x
              for name, x in (("key_residual", kr), ("value_residual", vr)))
    for fn in (kivi_decode_attention, kivi_decode_attention_reference):
        with pytest.raises(TypeError, match=f"{which} must be a floating-point tensor"):
            fn(q, qk, qv, kr, vr)
