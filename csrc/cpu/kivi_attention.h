// Decode attention straight over a KIVI-layout format v1 cache (no dequantized copy).
//
// One new query token per sequence attends to T = Tq + Tr cached tokens of its KV head:
// - keys 0..Tq-1 quantized per channel (groups of G along tokens): packed [B, H, D, S*bits/8],
//   scale/minimum [B, H, D, S/G] in the cache dtype, of which the first Tq <= S tokens attend;
// - values 0..Tq-1 quantized per token (groups of G along head_dim): packed [B, H, S, D*bits/8],
//   scale/minimum [B, H, S, D/G];
// - keys/values Tq..T-1 in full precision (float32 here), [B, H, Tr, D].
// Queries [B, H*R, D] float32 (R query heads share a KV head, HF's repeat_kv order); output the
// same shape. An optional key mask [B, T] (nonzero = attend) handles left padding.
//
// Because dequantization is affine per group, the quantized history never needs to exist in
// full precision: for a key group g, q.k_t = sum_d (q_d * scale_dg) * code_dt + sum_d q_d * min_dg,
// and for values sum_t p_t v_td = sum_t (p_t scale_tj) code_td + sum_t p_t min_tj (j = d / G).
// Work is split into (sequence, KV head, token chunk) units combined with the usual running-max
// softmax merge (flash-decoding). Not bit-exact with dequantize + attention (float sums run in a
// different order); tests bound the difference.
#pragma once

#include <cstdint>

#include "../format_v1.h"

namespace tkv::cpu {

struct KiviAttentionArgs {
  const float* query;          // [B, H*R, D]
  float* out;                  // [B, H*R, D]
  const uint8_t* key_packed;   // [B, H, D, S*bits/8]
  const void* key_scale;       // [B, H, D, S/G]
  const void* key_min;         // [B, H, D, S/G]
  const uint8_t* value_packed; // [B, H, S, D*bits/8]
  const void* value_scale;     // [B, H, S, D/G]
  const void* value_min;       // [B, H, S, D/G]
  const float* key_residual;   // [B, H, Tr, D]
  const float* value_residual; // [B, H, Tr, D]
  const uint8_t* key_mask;     // [B, Tq + Tr] or nullptr
  int64_t batch, kv_heads, rep, head_dim, tq, tr;
  int64_t tq_stride;           // S: quantized tokens stored per row (>= tq)
  int group_size, bits;
  DType dtype;                 // of the scales/minima
  float scaling;               // applied to q.k before the softmax
};

using KiviAttentionFn = void (*)(const KiviAttentionArgs&, int threads);

// Always present (portable C++).
void kivi_attention_generic(const KiviAttentionArgs& a, int threads);
// Present when compiled with THUNDERKV_HAVE_AVX2 (AVX2 + FMA + F16C).
void kivi_attention_avx2(const KiviAttentionArgs& a, int threads);

}  // namespace tkv::cpu
