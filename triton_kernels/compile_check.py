"""Ahead-of-time compilation of the format v1 Triton kernels for a GPU target, no GPU needed.

CI runs the kernels under the interpreter, which accepts things the GPU compiler rejects and
never contracts a*b+c into an FMA. Compiling for sm_80/sm_90 and reading the PTX catches both.
Run as ``python -m thunderkv.triton_kernels.compile_check 90`` (without TRITON_INTERPRET).
"""

from __future__ import annotations

import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import QUANTIZE_OPTIONS
from . import quant as q

_DT = {"fp16": (tl.float16, tl.int16, "i16", 0x7E00), "bf16": (tl.bfloat16, tl.int16, "i16", 0x7FC0),
       "fp32": (tl.float32, tl.int32, "i32", 0x7FC00000)}


def _variants():
    for name, (dt, it, ity, nan) in _DT.items():
        xty = "*" + name
        for slots in (False, True):  # plain, and writing into paged-cache slots
            tag = "_slots" if slots else ""
            # as launched: int64 slots, or (no slots) the packed buffer in the unused slot
            slots_ty = "*i64" if slots else "*u8"
            yield (f"quantize_rows{tag}_{name}", q._quantize_rows_kernel,
                   {"x_ptr": xty, "packed_ptr": "*u8", "scale_ptr": "*" + ity,
                    "min_ptr": "*" + ity, "n_groups": "i32", "slots_ptr": slots_ty,
                    "row_groups": "i32", "n_slots": "i32"},
                   {"G": 64, "BITS": 4, "BLOCK_G": 64, "DT": dt, "IT": it, "NAN_BITS": nan,
                    "HAS_SLOTS": slots},
                   QUANTIZE_OPTIONS)
            yield (f"dequantize_rows{tag}_{name}", q._dequantize_rows_kernel,
                   {"packed_ptr": "*u8", "scale_ptr": "*" + ity, "min_ptr": "*" + ity,
                    "y_ptr": "*" + ity, "n_groups": "i32", "slots_ptr": slots_ty,
                    "row_groups": "i32", "n_slots": "i32"},
                   {"G": 64, "BITS": 4, "BLOCK_G": 64, "DT": dt, "IT": it, "HAS_SLOTS": slots},
                   {})
        yield (f"quantize_cols_{name}", q._quantize_cols_kernel,
               {"x_ptr": xty, "packed_ptr": "*u8", "scale_ptr": "*" + ity, "min_ptr": "*" + ity,
                "T": "i32", "D": "i32"},
               {"G": 32, "BITS": 2, "BLOCK_D": 128, "DT": dt, "IT": it, "NAN_BITS": nan},
               QUANTIZE_OPTIONS)
        yield (f"dequantize_cols_{name}", q._dequantize_cols_kernel,
               {"packed_ptr": "*u8", "scale_ptr": "*" + ity, "min_ptr": "*" + ity,
                "y_ptr": "*" + ity, "T": "i32", "D": "i32"},
               {"G": 128, "BITS": 8, "BLOCK_D": 32, "DT": dt, "IT": it}, {})


def _attention_variants():
    """The fused decode attention (:mod:`.kivi_attention`): every scale dtype at 4 bits, and
    2 / 8 bits at float16; head_dim 128 with 8 query heads per KV head (as launched)."""
    from .kivi_attention import _chunk_kernel

    for name, bits in (("fp16", 4), ("bf16", 4), ("fp32", 4), ("fp16", 2), ("fp16", 8)):
        dt, it, ity, _ = _DT[name]
        sig = {"q_ptr": "*fp32", "kp_ptr": "*u8", "ks_ptr": "*" + ity, "km_ptr": "*" + ity,
               "vp_ptr": "*u8", "vs_ptr": "*" + ity, "vm_ptr": "*" + ity, "kr_ptr": "*fp32",
               "vr_ptr": "*fp32", "mask_ptr": "*u8", "m_ptr": "*fp32", "l_ptr": "*fp32",
               "acc_ptr": "*fp32", "H": "i32", "R": "i32", "D": "i32", "Tq": "i32", "Tr": "i32",
               "S": "i32", "NCQ": "i32", "NC": "i32", "TPP": "i32", "scaling": "fp32"}
        yield (f"attention_{name}_{bits}bit", _chunk_kernel, sig,
               {"G": 64, "BITS": bits, "DT": dt, "HAS_MASK": True, "BLOCK_T": 32,
                "BLOCK_R": 16, "BLOCK_D": 128}, {})


def _launch_attrs(fn, sig: dict[str, str]) -> dict:
    """The specialization a real launch gets from torch tensors: pointers 16-byte aligned and
    the per-channel dims T, D multiples of 16 (head_dim, token blocks), as Triton's JIT infers
    them. Without it the PTX would show scalar accesses the GPU never runs."""
    return {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items()
            if t.startswith("*") or a in ("T", "D")}


def compile_all(capability: int) -> dict[str, dict]:
    """Compile every kernel variant for ``sm_<capability>``, specialized as launched on aligned
    tensors; return PTX facts per kernel."""
    out = {}
    for name, fn, sig, consts, options in [*_variants(), *_attention_variants()]:
        signature = {**sig, **{k: "constexpr" for k in consts}}
        k = triton.compile(ASTSource(fn, signature, consts, _launch_attrs(fn, sig)),
                           target=GPUTarget("cuda", capability, 32), options=options)
        ptx = k.asm["ptx"]
        out[name] = {
            # the bulk of the bytes: values in 16-byte vectors, codes in 4- or 16-byte words
            "v4_loads": "ld.global.v4" in ptx,
            "v4_stores": "st.global.v4" in ptx,
            "byte_stores": "st.global.b8" in ptx or "st.global.u8" in ptx,
            "cubin_bytes": len(k.asm["cubin"]),
            "fma": "fma.rn.f32" in ptx,
            "div_rn": "div.rn.f32" in ptx,
            "approx_div": "div.full.f32" in ptx or "div.approx.f32" in ptx,
            "rcp_approx": "rcp.approx" in ptx,
            "ftz": ".ftz" in ptx,  # flushing subnormals would zero tiny scales' codes
            "mma": "mma.sync" in ptx or "wgmma" in ptx,  # tensor-core products (attention)
        }
    return out


if __name__ == "__main__":
    caps = [int(a) for a in sys.argv[1:]] or [80, 90]
    print(json.dumps({cap: compile_all(cap) for cap in caps}, indent=1))
