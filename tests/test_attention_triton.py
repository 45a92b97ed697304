"""The fused decode attention's Triton kernel (the CUDA path) against its float64 definition:
under TRITON_INTERPRET=1 on CPU tensors (CI), natively on a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_attention import CASES, TOL, make_case

from thunderkv.attention import (
    backend_ready,
    kivi_decode_attention,
    kivi_decode_attention_reference,
)

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OK, WHY = backend_ready("triton", DEVICE) if HAVE_TRITON else (False, "")
pytestmark = pytest.mark.skipif(not (HAVE_TRITON and OK), reason=WHY or "triton is not installed")


def on_device(args):
    return [None if a is None else a.to(DEVICE) if isinstance(a, torch.Tensor) else
            type(a)(a.packed.to(DEVICE), a.scale.to(DEVICE), a.minimum.to(DEVICE), a.spec,
                    a.shape, a.dtype) for a in args]


# The interpreter runs one program at a time: keep the 4k-token case to one KV head.
SMALL_CASES = [c if c[4] < 4096 else (1, 1, 3, 64, 1024, 100, 64, 4) for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "B{}H{}R{}D{}S{}Tr{}G{}b{}".format(*c))
def test_triton_matches_reference(case, dtype, gen):
    B, H, R, D, S, Tr, G, bits = case
    args = make_case(gen, B=B, H=H, R=R, D=D, S=S, Tr=Tr, G=G, bits=bits, dtype=dtype)
    mask = torch.rand(B, S + Tr, generator=gen) > 0.25
    for key_mask in (None, mask):
        want = kivi_decode_attention_reference(*args, key_mask=key_mask)
        dev_mask = None if key_mask is None else key_mask.to(DEVICE)
        got = kivi_decode_attention(*on_device(args), key_mask=dev_mask, backend="triton")
        assert got.dtype == dtype and got.shape == (B, H * R, D) and got.device == DEVICE
        torch.testing.assert_close(got.float().cpu(), want.float(), rtol=TOL[dtype],
                                   atol=TOL[dtype])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_prefix_of_history_scaling_and_masked_rows(bits, gen):
    args = make_case(gen, B=2, H=2, R=3, D=32, S=128, Tr=9, G=16, bits=bits,
                     dtype=torch.float32, spread=3.0)
    dev = on_device(args)
    for tq in (0, 16, 112):
        got = kivi_decode_attention(*dev, tq_attend=tq, scaling=0.3, backend="triton")
        want = kivi_decode_attention_reference(*args, tq_attend=tq, scaling=0.3)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    mask = torch.ones(2, 137, dtype=torch.bool)
    mask[0] = False  # nothing to attend: zeros, and the other sequence unaffected
    got = kivi_decode_attention(*dev, key_mask=mask.to(DEVICE), backend="triton").cpu()
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got[1], kivi_decode_attention_reference(*args)[1],
                               rtol=1e-4, atol=1e-4)


def test_triton_large_logits_stay_finite(gen):
    """Scores in the thousands: the merge across chunks must not overflow."""
    args = make_case(gen, B=1, H=1, R=2, D=64, S=256, Tr=3, G=64, bits=4,
                     dtype=torch.float32, spread=8.0)
    got = kivi_decode_attention(*on_device(args), scaling=1.0, backend="triton").cpu()
    want = kivi_decode_attention_reference(*args, scaling=1.0)
    assert torch.isfinite(got).all()
    # As for the C++ kernel (test_attention.py): logits of ~500 carry float32 rounding of
    # ~1e-4, so two near-tied tokens' weights move by that much relative and the output by
    # that times |v_i - v_j| (values ~ N(0, 8^2)); 60 seeds measured at most 3.2e-4, one run in
    # ~70 failed rtol = atol = 1e-3. A broken max or merge is off by O(spread).
    torch.testing.assert_close(got, want, rtol=0, atol=3e-3 * 8.0)


def test_backend_choice_is_checked(gen):
    args = make_case(gen, B=1, H=1, R=1, D=16, S=16, Tr=1, G=16, bits=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        kivi_decode_attention(*args, backend="cuda")
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors"):
            kivi_decode_attention(*on_device(args), backend="cpu")
    q, qk, qv, kr, vr = args
    with pytest.raises(ValueError, match="every tensor must be on"):
        kivi_decode_attention(q, qk, qv, kr.to("meta"), vr, backend="triton")


@pytest.mark.parametrize("programs", [4, 8, 12])  # 4 sequence x head pairs: 1-3 chunks
def test_triton_chunks_of_many_tiles_merge_online(programs, monkeypatch, gen):
    """Long contexts give each program a run of tiles (an online softmax inside the kernel);
    forcing few programs makes every chunk several tiles long here, with masked tiles and a
    history prefix (tq_attend) cutting through them."""
    import thunderkv.triton_kernels as kernels

    monkeypatch.setattr(kernels, "ATTENTION_PROGRAMS", programs)
    args = make_case(gen, B=2, H=2, R=3, D=40, S=320, Tr=5, G=40, bits=4,
                     dtype=torch.float16, spread=2.0)
    mask = torch.rand(2, 325, generator=gen) > 0.3
    mask[0, 64:200] = False  # whole tiles with nothing to attend inside one chunk
    for tq in (320, 280, 40):
        m = torch.cat([mask[:, :tq], mask[:, 320:]], dim=1)
        got = kivi_decode_attention(*on_device(args), key_mask=m.to(DEVICE), tq_attend=tq,
                                    backend="triton")
        want = kivi_decode_attention_reference(*args, key_mask=m, tq_attend=tq)
        torch.testing.assert_close(got.float().cpu(), want.float(), rtol=TOL[torch.float16],
                                   atol=TOL[torch.float16])
