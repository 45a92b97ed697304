// Decode attention over a KIVI-layout format v1 cache; see kivi_attention.h for the math.
//
// Compiled twice: portable (kivi_attention_generic) and, with TKV_ATTN_AVX2 and
// -mavx2 -mfma -mf16c, as kivi_attention_avx2. The loops are written so the compiler
// vectorizes them; only code unpacking uses intrinsics. This file is not part of format v1's
// bit-exact path, so it is compiled with floating-point contraction allowed.
#include "kivi_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef TKV_ATTN_AVX2
#include <immintrin.h>
#define TKV_ATTN_FN kivi_attention_avx2
#else
#define TKV_ATTN_FN kivi_attention_generic
#endif

namespace tkv::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (softmax after subtracting the maximum), branch-free so that loops over it
// vectorize. Cephes' expf polynomial; relative error ~2e-7. Inputs below -87 give ~1e-38.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float fx = x * 1.44269504088896341f + 0.5f;
  int n = static_cast<int>(fx);
  n -= static_cast<float>(n) > fx;  // floor for negative values
  const float nf = static_cast<float>(n);
  x = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

#ifdef TKV_ATTN_AVX2
// exp_nonpositive for 8 lanes.
inline __m256 exp_nonpositive_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i n = _mm256_cvtps_epi32(fx);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}
#endif

// n codes of BITS bits (format v1 order: code i in byte i*BITS/8, low bits first) -> floats.
template <int BITS>
inline void unpack_codes(const uint8_t* p, int n, float* out) {
  int i = 0;
#ifdef TKV_ATTN_AVX2
  if constexpr (BITS == 4) {
    const __m128i m = _mm_set1_epi8(0x0F);
    for (; i + 16 <= n; i += 16) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i / 2));
      const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, m),
                                          _mm_and_si128(_mm_srli_epi16(b, 4), m));
      _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)));
      _mm256_storeu_ps(out + i + 8,
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))));
    }
  } else if constexpr (BITS == 8) {
    for (; i + 8 <= n; i += 8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i));
      _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)));
    }
  }
#endif
  constexpr int per_byte = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  for (; i < n; ++i) {
    out[i] = static_cast<float>((p[i / per_byte] >> ((i % per_byte) * BITS)) & mask);
  }
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

inline float dot(const float* x, const float* y, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// p[i] <- exp(p[i] - mx), 0 where p[i] is -inf (masked); returns the sum.
inline float softmax_numerators(float* p, int64_t n, float mx) {
  int64_t i = 0;
  float l = 0.0f;
#ifdef TKV_ATTN_AVX2
  const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(kNegInf);
  __m256 sum = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(p + i);
    __m256 e = exp_nonpositive_ps(_mm256_sub_ps(x, vmx));
    e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), e);
    _mm256_storeu_ps(p + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  for (float v : lanes) l += v;
#endif
  for (; i < n; ++i) {
    const float e = exp_nonpositive(p[i] - mx);
    p[i] = p[i] == kNegInf ? 0.0f : e;
    l += p[i];
  }
  return l;
}

#ifdef TKV_ATTN_AVX2
// 16 codes starting at byte p -> two vectors of 8 floats.
template <int BITS>
inline void unpack16_ps(const uint8_t* p, __m256& lo, __m256& hi) {
  __m128i c;
  if constexpr (BITS == 8) {
    c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else if constexpr (BITS == 4) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    c = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  } else {
    int32_t w;
    std::memcpy(&w, p, 4);
    const __m128i b = _mm_cvtsi32_si128(w);
    const __m128i m = _mm_set1_epi8(0x03);
    const __m128i b0 = _mm_and_si128(b, m), b1 = _mm_and_si128(_mm_srli_epi16(b, 2), m);
    const __m128i b2 = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    const __m128i b3 = _mm_and_si128(_mm_srli_epi16(b, 6), m);
    c = _mm_unpacklo_epi16(_mm_unpacklo_epi8(b0, b1), _mm_unpacklo_epi8(b2, b3));
  }
  lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
}

// acc[r] = sum_k w[k*R + r] * (16 codes at p + k*stride), k < K: R rows of 16 lanes in registers.
template <int BITS, int R>
inline void weighted_codes16(const uint8_t* p, int64_t stride, int64_t K, const float* w,
                             __m256 (&acc)[R][2]) {
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k, p += stride) {
    __m256 c0, c1;
    unpack16_ps<BITS>(p, c0, c1);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_set1_ps(w[k * R + r]);
      acc[r][0] = _mm256_fmadd_ps(wv, c0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(wv, c1, acc[r][1]);
    }
  }
}

// One key group, 16 tokens at a time (k runs over channels d):
// dst[r*n + i] = (sum_d w[d*R + r] * code[d, i] + cmin[r]) * scaling, i < G.
template <int BITS, int R>
void key_group_r(const uint8_t* rows, int64_t row_bytes, int64_t D, int64_t G, const float* w,
                 const float* cmin, float scaling, float* dst, int64_t n) {
  const __m256 vs = _mm256_set1_ps(scaling);
  for (int64_t tb = 0; tb < G; tb += 16) {
    __m256 acc[R][2];
    weighted_codes16<BITS, R>(rows + tb * BITS / 8, row_bytes, D, w, acc);
    for (int r = 0; r < R; ++r) {
      const __m256 cm = _mm256_set1_ps(cmin[r]);
      _mm256_storeu_ps(dst + r * n + tb, _mm256_mul_ps(_mm256_add_ps(acc[r][0], cm), vs));
      _mm256_storeu_ps(dst + r * n + tb + 8, _mm256_mul_ps(_mm256_add_ps(acc[r][1], cm), vs));
    }
  }
}

// Values of one head_dim group j, 16 channels at a time (k runs over tokens t):
// out[r*D + i] += sum_t w[t*R + r] * code[t, i], i < G (rows start at channel j*G).
template <int BITS, int R>
void value_group_r(const uint8_t* rows, int64_t row_bytes, int64_t nt, int64_t D, int64_t G,
                   const float* w, float* out) {
  for (int64_t db = 0; db < G; db += 16) {
    __m256 acc[R][2];
    weighted_codes16<BITS, R>(rows + db * BITS / 8, row_bytes, nt, w, acc);
    for (int r = 0; r < R; ++r) {
      float* o = out + r * D + db;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[r][0]));
      _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), acc[r][1]));
    }
  }
}

template <int BITS, class F>
bool with_rep(int64_t R, F&& f) {
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    default: return false;
  }
}
#endif

// Vectorized paths for G % 16 == 0 and up to 7 query heads per KV head; false: use the loops.
template <int BITS>
bool key_group_fast(const uint8_t* rows, int64_t row_bytes, int64_t R, int64_t D, int64_t G,
                    const float* w, const float* cmin, float scaling, float* dst, int64_t n) {
#ifdef TKV_ATTN_AVX2
  if (G % 16 == 0) {
    return with_rep<BITS>(R, [&](auto rc) {
      key_group_r<BITS, decltype(rc)::value>(rows, row_bytes, D, G, w, cmin, scaling, dst, n);
    });
  }
#else
  (void)rows, (void)row_bytes, (void)R, (void)D, (void)G, (void)w, (void)cmin, (void)scaling,
      (void)dst, (void)n;
#endif
  return false;
}

template <int BITS>
bool value_group_fast(const uint8_t* rows, int64_t row_bytes, int64_t nt, int64_t R, int64_t D,
                      int64_t G, const float* w, float* out) {
#ifdef TKV_ATTN_AVX2
  if (G % 16 == 0) {
    return with_rep<BITS>(R, [&](auto rc) {
      value_group_r<BITS, decltype(rc)::value>(rows, row_bytes, nt, D, G, w, out);
    });
  }
#else
  (void)rows, (void)row_bytes, (void)nt, (void)R, (void)D, (void)G, (void)w, (void)out;
#endif
  return false;
}

// One work unit: tokens [t0, t1) of KV head (b, h), for its R query heads.
struct Unit {
  int64_t bh, t0, t1;
};

struct Scratch {
  std::vector<float> scores;  // [R, t1 - t0]
  std::vector<float> codes;   // [max(G, D)]
  std::vector<float> acc;     // [R, G]
  std::vector<float> cmin;    // [R] or [R, D/G]
  std::vector<float> w;       // [max(D, t1 - t0), R] per-group weights
};

// Writes the unit's running max m[R], sum l[R] and unnormalized output o[R, D].
template <DType DT, int BITS>
void attend_unit(const KiviAttentionArgs& a, const Unit& u, float* m_out, float* l_out,
                 float* o_out, Scratch& s) {
  using E = Elem<DT>;
  using T = typename E::T;
  const int64_t D = a.head_dim, R = a.rep, G = a.group_size, T_all = a.tq + a.tr;
  const int64_t n = u.t1 - u.t0, b = u.bh / a.kv_heads;
  const float* q = a.query + u.bh * R * D;  // the R query heads of this KV head are adjacent
  s.scores.assign(static_cast<size_t>(R * n), 0.0f);
  s.codes.resize(static_cast<size_t>(std::max(G, D)));
  s.acc.resize(static_cast<size_t>(R * G));
  s.cmin.resize(static_cast<size_t>(R * std::max<int64_t>(1, D / G)));
  s.w.resize(static_cast<size_t>(std::max(D, n) * R));
  float* codes = s.codes.data();

  // ---- scores
  const int64_t q_end = std::min(u.t1, a.tq);
  const int64_t kgroups = a.tq_stride / G, gbytes = G * BITS / 8;
  const int64_t row_bytes = a.tq_stride * BITS / 8;
  for (int64_t t = u.t0; t < q_end; t += G) {
    const int64_t g = t / G;
    // w[d, r] = q_rd * scale_dg; cmin[r] = sum_d q_rd * min_dg
    std::fill(s.cmin.begin(), s.cmin.begin() + R, 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t row = u.bh * D + d;
      const float sc = E::load(static_cast<const T*>(a.key_scale)[row * kgroups + g]);
      const float mn = E::load(static_cast<const T*>(a.key_min)[row * kgroups + g]);
      for (int64_t r = 0; r < R; ++r) {
        s.w[d * R + r] = q[r * D + d] * sc;
        s.cmin[r] += q[r * D + d] * mn;
      }
    }
    const uint8_t* rows = a.key_packed + u.bh * D * row_bytes + g * gbytes;
    float* dst = s.scores.data() + (t - u.t0);
    if (!key_group_fast<BITS>(rows, row_bytes, R, D, G, s.w.data(), s.cmin.data(), a.scaling,
                              dst, n)) {
      std::fill(s.acc.begin(), s.acc.end(), 0.0f);
      for (int64_t d = 0; d < D; ++d) {
        unpack_codes<BITS>(rows + d * row_bytes, static_cast<int>(G), codes);
        for (int64_t r = 0; r < R; ++r) axpy(s.w[d * R + r], codes, s.acc.data() + r * G, G);
      }
      for (int64_t r = 0; r < R; ++r) {
        const float* src = s.acc.data() + r * G;
        for (int64_t i = 0; i < G; ++i) dst[r * n + i] = (src[i] + s.cmin[r]) * a.scaling;
      }
    }
  }
  for (int64_t t = std::max(u.t0, a.tq); t < u.t1; ++t) {
    const float* k = a.key_residual + (u.bh * a.tr + (t - a.tq)) * D;
    for (int64_t r = 0; r < R; ++r) s.scores[r * n + (t - u.t0)] = dot(q + r * D, k, D) * a.scaling;
  }
  if (a.key_mask != nullptr) {
    const uint8_t* mask = a.key_mask + b * T_all;
    for (int64_t t = u.t0; t < u.t1; ++t) {
      if (mask[t] == 0) {
        for (int64_t r = 0; r < R; ++r) s.scores[r * n + (t - u.t0)] = kNegInf;
      }
    }
  }

  // ---- softmax numerators
  for (int64_t r = 0; r < R; ++r) {
    float* p = s.scores.data() + r * n;
    float mx = kNegInf;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, p[i]);
    m_out[r] = mx;
    if (mx == kNegInf) {  // every token of the unit masked
      std::fill(p, p + n, 0.0f);
      l_out[r] = 0.0f;
      continue;
    }
    l_out[r] = softmax_numerators(p, n, mx);
  }

  // ---- weighted values
  std::fill(o_out, o_out + R * D, 0.0f);
  const int64_t vgroups = D / G;
  std::fill(s.cmin.begin(), s.cmin.end(), 0.0f);
  if (q_end > u.t0) {
    const int64_t nq = q_end - u.t0, vrow_bytes = D * BITS / 8;
    const int64_t row0 = u.bh * a.tq_stride + u.t0;
    const uint8_t* vrows = a.value_packed + row0 * vrow_bytes;
    for (int64_t j = 0; j < vgroups; ++j) {
      // w[t, r] = p_rt * scale_tj; cmin[r, j] = sum_t p_rt * min_tj
      for (int64_t t = 0; t < nq; ++t) {
        const float sc = E::load(static_cast<const T*>(a.value_scale)[(row0 + t) * vgroups + j]);
        const float mn = E::load(static_cast<const T*>(a.value_min)[(row0 + t) * vgroups + j]);
        for (int64_t r = 0; r < R; ++r) {
          const float pt = s.scores[r * n + t];
          s.w[t * R + r] = pt * sc;
          s.cmin[r * vgroups + j] += pt * mn;
        }
      }
      if (value_group_fast<BITS>(vrows + j * G * BITS / 8, vrow_bytes, nq, R, D, G, s.w.data(),
                                 o_out + j * G)) {
        continue;
      }
      for (int64_t t = 0; t < nq; ++t) {
        unpack_codes<BITS>(vrows + t * vrow_bytes + j * G * BITS / 8, static_cast<int>(G), codes);
        for (int64_t r = 0; r < R; ++r) axpy(s.w[t * R + r], codes, o_out + r * D + j * G, G);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t d = 0; d < D; ++d) o_out[r * D + d] += s.cmin[r * vgroups + d / G];
    }
  }
  for (int64_t t = std::max(u.t0, a.tq); t < u.t1; ++t) {
    const float* v = a.value_residual + (u.bh * a.tr + (t - a.tq)) * D;
    for (int64_t r = 0; r < R; ++r) axpy(s.scores[r * n + (t - u.t0)], v, o_out + r * D, D);
  }
}

using UnitFn = void (*)(const KiviAttentionArgs&, const Unit&, float*, float*, float*, Scratch&);

template <DType DT>
UnitFn pick_bits(int bits) {
  if (bits == 2) return &attend_unit<DT, 2>;
  if (bits == 4) return &attend_unit<DT, 4>;
  return &attend_unit<DT, 8>;
}

UnitFn pick(DType dt, int bits) {
  if (dt == DType::F16) return pick_bits<DType::F16>(bits);
  if (dt == DType::BF16) return pick_bits<DType::BF16>(bits);
  return pick_bits<DType::F32>(bits);
}

}  // namespace

void TKV_ATTN_FN(const KiviAttentionArgs& a, int threads) {
  const int64_t BH = a.batch * a.kv_heads, R = a.rep, D = a.head_dim, G = a.group_size;
  const UnitFn fn = pick(a.dtype, a.bits);
#ifdef _OPENMP
  const int max_t = threads > 0 ? threads : omp_get_max_threads();
#else
  const int max_t = 1;
  (void)threads;
#endif
  // Quantized history in chunks of whole key groups (about 4 units per thread, >= 256 tokens
  // each), then the full-precision residual as one unit per KV head.
  const int64_t ngroups = a.tq / G;
  int64_t per_head = std::max<int64_t>(1, (4 * max_t + BH - 1) / BH);
  int64_t chunk_groups = std::max<int64_t>((ngroups + per_head - 1) / per_head,
                                           std::max<int64_t>(1, 256 / G));
  std::vector<Unit> units;
  std::vector<int64_t> first(static_cast<size_t>(BH + 1), 0);
  for (int64_t bh = 0; bh < BH; ++bh) {
    first[bh] = static_cast<int64_t>(units.size());
    for (int64_t g = 0; g < ngroups; g += chunk_groups) {
      units.push_back({bh, g * G, std::min(ngroups, g + chunk_groups) * G});
    }
    if (a.tr > 0) units.push_back({bh, a.tq, a.tq + a.tr});
  }
  first[BH] = static_cast<int64_t>(units.size());
  const int64_t U = static_cast<int64_t>(units.size());
  std::vector<float> m(static_cast<size_t>(U * R)), l(static_cast<size_t>(U * R)),
      o(static_cast<size_t>(U * R * D));

  const int64_t work = BH * (a.tq + a.tr) * D * R;
  const int nt = static_cast<int>(std::min<int64_t>({max_t, U, std::max<int64_t>(1, work >> 16)}));
  if (nt <= 1) {
    Scratch s;
    for (int64_t i = 0; i < U; ++i) fn(a, units[i], &m[i * R], &l[i * R], &o[i * R * D], s);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
      Scratch s;
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < U; ++i) fn(a, units[i], &m[i * R], &l[i * R], &o[i * R * D], s);
    }
#endif
  }

  // ---- merge the units of each KV head (running-max softmax)
  for (int64_t bh = 0; bh < BH; ++bh) {
    for (int64_t r = 0; r < R; ++r) {
      float* out = a.out + (bh * R + r) * D;
      float mx = kNegInf;
      for (int64_t i = first[bh]; i < first[bh + 1]; ++i) mx = std::max(mx, m[i * R + r]);
      std::fill(out, out + D, 0.0f);
      if (mx == kNegInf) continue;  // nothing to attend to: zeros
      float total = 0.0f;
      for (int64_t i = first[bh]; i < first[bh + 1]; ++i) {
        if (m[i * R + r] == kNegInf) continue;
        const float w = std::exp(m[i * R + r] - mx);
        total += w * l[i * R + r];
        axpy(w, &o[(i * R + r) * D], out, D);
      }
      const float inv = 1.0f / total;
      for (int64_t d = 0; d < D; ++d) out[d] *= inv;
    }
  }
}

}  // namespace tkv::cpu
