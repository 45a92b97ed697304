"""thunderkv.transfer with pools in GPU memory (two real processes over loopback, UCX's CUDA
transports). Skipped, not failed, without a CUDA device; benchmarks/gpu_check.sh runs them."""

from __future__ import annotations

import pytest
import torch
import transfer_peers as peers
from test_transfer import CTX, collect, start

from thunderkv.transfer import KVReceiver, unavailable_reason

pytestmark = [
    pytest.mark.skipif(unavailable_reason() is not None,
                       reason=f"UCX transfer unavailable: {unavailable_reason()}"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("src, dst", [("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")])
@pytest.mark.parametrize("tokens", [1, 1023, 65_537])
def test_gpu_pools_arrive_bit_exact(src, dst, tokens):
    with KVReceiver(1 << 27, token=peers.TOKEN, timeout=5.0, device=dst) as rx:
        assert rx.pool.memory_type == ("cuda" if dst == "cuda" else "host")
        results = CTX.Queue()
        p = start(peers.sender, rx.host, rx.port, [(3, tokens, tokens)], results, device=src)
        (r,) = collect(results, 1)
        got = rx.wait(3, timeout=60)
        assert got.buffer.device.type == dst
        assert got.header.payload_length == r["bytes"] == 1024 * tokens
        assert torch.equal(got.buffer.cpu(), peers.payload_for(tokens, r["bytes"]))
        assert r["transports"], "every result names the transports used"
        got.release()
        p.join(10)


def test_gpu_dequantize_reads_straight_from_a_gpu_receive_pool():
    """4-bit KV quantized on the sender's GPU into its registered pool, dequantized on the
    receiver's GPU from views into its pool: equal to the CPU reference of the same KV."""
    from thunderkv import FormatSpec, QuantizedTensor, dequantize, quantize
    from thunderkv.bench.transfer import geometry, make_header

    with KVReceiver(1 << 26, token=peers.TOKEN, timeout=5.0, device="cuda") as rx:
        results = CTX.Queue()
        p = start(peers.quantized_sender, rx.host, rx.port, 21, 192, 7, results, device="cuda")
        collect(results, 1)
        got = rx.wait(21, timeout=30)
        header = make_header(geometry("smollm2"), 192, 4, 64, 21)
        assert got.header == header
        kv = torch.randn(header.shape(192), generator=torch.Generator().manual_seed(7),
                         dtype=torch.float32).to(torch.float16)  # the key fill_payload drew
        want = quantize(kv, bits=4, group_size=64, backend="reference")
        lo = rx.pool.address
        for layer in (0, header.layers - 1):
            parts = got.layer(layer)
            assert parts["key_packed"].is_cuda
            assert lo <= parts["key_packed"].data_ptr() < lo + rx.pool.nbytes
            assert torch.equal(parts["key_packed"].cpu(), want.packed)
            k_hat = dequantize(QuantizedTensor(parts["key_packed"], parts["key_scale"],
                                               parts["key_min"], FormatSpec(4, 64, -1),
                                               kv.shape, kv.dtype))
            assert k_hat.is_cuda and torch.equal(k_hat.cpu(), want.dequantize())
        got.release()
        p.join(10)
