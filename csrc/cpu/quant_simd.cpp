// SIMD variants of the format v1 CPU kernels, 16 elements per step.
//
// This file is compiled twice: with TKV_SIMD_AVX512 (-mavx512f -mavx512bw -mavx512vl ...) and
// with TKV_SIMD_AVX2 (-mavx2 -mfma -mf16c). Both share the SSE code that turns 16 codes into
// packed bytes and back. Groups whose size is not a multiple of 16 take the scalar path.
//
// Exactness notes (format v1 is bit-exact across backends):
// - min/max run on finite data only (a group with NaN/Inf is detected separately and written
//   as a bad group), so the NaN rules of vminps/vmaxps never matter; signed zeros are
//   canonicalised in finish_group().
// - codes use vsubps, vmulps (never contracted: no FMA there), round-to-nearest-even, then
//   vmaxps(t, 0), which returns 0 when t is NaN, like fmaxf in the scalar code.
// - dequantize uses a true fused multiply-add, then RNE narrowing.
#include <immintrin.h>

#include "cpu_kernels.h"
#include "scalar_ranges.h"

namespace tkv::cpu {
namespace {

// ---- 16 code bytes <-> packed bytes (SSSE3/SSE4.1, shared by both variants) ----

inline void pack16(__m128i codes, int bits, uint8_t* out) {
  if (bits == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), codes);
  } else if (bits == 4) {
    __m128i t = _mm_maddubs_epi16(codes, _mm_set1_epi16(0x1001));  // c0 + 16*c1
    t = _mm_packus_epi16(t, t);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), t);
  } else {  // bits == 2
    __m128i t = _mm_maddubs_epi16(codes, _mm_set1_epi16(0x0401));  // c0 + 4*c1
    t = _mm_madd_epi16(t, _mm_set1_epi32(0x00100001));             // + 16*(c2 + 4*c3)
    t = _mm_packus_epi32(t, t);
    t = _mm_packus_epi16(t, t);
    const int32_t v = _mm_cvtsi128_si32(t);
    std::memcpy(out, &v, 4);
  }
}

inline __m128i unpack16(const uint8_t* p, int bits) {
  if (bits == 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (bits == 4) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, m);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm_unpacklo_epi8(lo, hi);  // c0 c1 c2 ... c15
  }
  int32_t w;
  std::memcpy(&w, p, 4);
  const __m128i b = _mm_cvtsi32_si128(w);
  const __m128i m = _mm_set1_epi8(0x03);
  const __m128i b0 = _mm_and_si128(b, m);
  const __m128i b1 = _mm_and_si128(_mm_srli_epi16(b, 2), m);
  const __m128i b2 = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i b3 = _mm_and_si128(_mm_srli_epi16(b, 6), m);
  return _mm_unpacklo_epi16(_mm_unpacklo_epi8(b0, b1), _mm_unpacklo_epi8(b2, b3));
}

// 16x16 byte transpose in four unpack rounds (8-, 16-, 32-, 64-bit). Afterwards x[kBitRev4[c]]
// holds what was column c (the rounds leave the rows in bit-reversed order).
inline void transpose16x16(__m128i* x) {
  __m128i t[16];
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm_unpacklo_epi8(x[2 * i], x[2 * i + 1]);
    t[i + 8] = _mm_unpackhi_epi8(x[2 * i], x[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    x[i] = _mm_unpacklo_epi16(t[2 * i], t[2 * i + 1]);
    x[i + 8] = _mm_unpackhi_epi16(t[2 * i], t[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
    t[i + 8] = _mm_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    x[i] = _mm_unpacklo_epi64(t[2 * i], t[2 * i + 1]);
    x[i + 8] = _mm_unpackhi_epi64(t[2 * i], t[2 * i + 1]);
  }
}
constexpr int kBitRev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

#if defined(TKV_SIMD_AVX512)

// ---- AVX-512: one zmm holds 16 floats ----
struct V16 {
  __m512 v;
};

template <DType D>
inline V16 load16(const void* p) {
  if constexpr (D == DType::F16) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)))};
  } else if constexpr (D == DType::BF16) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  } else {
    return {_mm512_loadu_ps(static_cast<const float*>(p))};
  }
}

template <DType D>
inline void store16(V16 a, void* p) {
  if constexpr (D == DType::F16) {
    _mm256_storeu_si256(static_cast<__m256i*>(p),
                        _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (D == DType::BF16) {
    const __m512i x = _mm512_castps_si512(a.v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  } else {
    _mm512_storeu_ps(static_cast<float*>(p), a.v);
  }
}

inline V16 vmin(V16 a, V16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V16 splat(float f) { return {_mm512_set1_ps(f)}; }
inline float hmin(V16 a) { return _mm512_reduce_min_ps(a.v); }
inline float hmax(V16 a) { return _mm512_reduce_max_ps(a.v); }
// True when any lane is NaN or +-Inf (x - x is NaN exactly then).
inline V16 vadd(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V16 vor(V16 a, V16 b) { return {_mm512_or_ps(a.v, b.v)}; }
inline void storef(V16 a, float* p) { _mm512_storeu_ps(p, a.v); }
inline V16 loadf(const float* p) { return {_mm512_loadu_ps(p)}; }
// Bit j set when lane j is NaN.
inline uint32_t nan_bits(V16 a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q); }
// r where s != 0, else 0.
inline V16 zero_where_zero(V16 s, V16 r) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s.v, _mm512_setzero_ps(), _CMP_NEQ_UQ), r.v)};
}

struct OpMin {
  static __m512 f(__m512 a, __m512 b) { return _mm512_min_ps(a, b); }
};
struct OpMax {
  static __m512 f(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
};
struct OpOr {
  static __m512 f(__m512 a, __m512 b) { return _mm512_or_ps(a, b); }
};

// Lane j of the result = Op-reduction of all 16 lanes of v[j] (a transposing reduction tree:
// 15 Op instead of 16 serial horizontal reductions).
template <class Op>
inline V16 reduce16(const V16* v) {
  __m512 c[8], e[4], f[2];
  for (int k = 0; k < 8; ++k) {
    const __m512 a = v[2 * k].v, b = v[2 * k + 1].v;
    c[k] = Op::f(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 a = c[2 * k], b = c[2 * k + 1];
    e[k] = Op::f(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  for (int k = 0; k < 2; ++k) {
    const __m512 a = e[2 * k], b = e[2 * k + 1];
    f[k] = Op::f(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                 _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 g = Op::f(_mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // Lane 4*b + k now holds vector b + 4*k.
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return {_mm512_permutexvar_ps(idx, g)};
}

inline __m128i codes16(V16 x, V16 mn, V16 r, V16 qmax) {
  __m512 t = _mm512_mul_ps(_mm512_sub_ps(x.v, mn.v), r.v);
  t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  t = _mm512_max_ps(t, _mm512_setzero_ps());  // NaN -> 0 (second operand)
  t = _mm512_min_ps(t, qmax.v);
  return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t));
}

// Same codes when r is finite (so v is never NaN): v + 2^23 rounds v half-to-even and leaves
// the integer in the low mantissa bits (0 <= v < 2^22 here); clamp on the bits, keep the byte.
// cap = bits of (2^23 + qmax). 6 instead of 8 port-0/5 uops per 16 elements (measured: 4-bit
// fp16 quantize 15.5 -> 19.3 GB/s on the 2-core CI machine).
inline __m128i codes16_fast(V16 x, V16 mn, V16 r, __m512i cap) {
  const __m512 w = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(x.v, mn.v), r.v),
                                 _mm512_set1_ps(8388608.0f));
  return _mm512_cvtepi32_epi8(_mm512_min_epu32(_mm512_castps_si512(w), cap));
}
using CapBits = __m512i;
inline CapBits cap_bits(int qmax) { return _mm512_set1_epi32(0x4B000000 + qmax); }

inline V16 dequant16(__m128i codes, V16 s, V16 m) {
  const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
  return {_mm512_fmadd_ps(c, s.v, m.v)};
}

#define TKV_VARIANT_NAME "avx512"
#define TKV_VARIANT_FN avx512_variant

#elif defined(TKV_SIMD_AVX2)

// ---- AVX2: two ymm hold 16 floats ----
struct V16 {
  __m256 lo, hi;
};

template <DType D>
inline V16 load16(const void* p) {
  if constexpr (D == DType::F16) {
    const __m128i* q = static_cast<const __m128i*>(p);
    return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
  } else if constexpr (D == DType::BF16) {
    const __m128i* q = static_cast<const __m128i*>(p);
    const __m256i a = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16);
    const __m256i b = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 1)), 16);
    return {_mm256_castsi256_ps(a), _mm256_castsi256_ps(b)};
  } else {
    const float* f = static_cast<const float*>(p);
    return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
  }
}

inline __m128i bf16_round8(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // 8 x u32 (< 2^16) -> 8 x u16
  const __m256i p = _mm256_packus_epi32(r, r);  // lanes: r0..3 r0..3 | r4..7 r4..7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08));
}

template <DType D>
inline void store16(V16 a, void* p) {
  if constexpr (D == DType::F16) {
    __m128i* q = static_cast<__m128i*>(p);
    _mm_storeu_si128(q, _mm256_cvtps_ph(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(q + 1,
                     _mm256_cvtps_ph(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (D == DType::BF16) {
    __m128i* q = static_cast<__m128i*>(p);
    _mm_storeu_si128(q, bf16_round8(a.lo));
    _mm_storeu_si128(q + 1, bf16_round8(a.hi));
  } else {
    float* f = static_cast<float*>(p);
    _mm256_storeu_ps(f, a.lo);
    _mm256_storeu_ps(f + 8, a.hi);
  }
}

inline V16 vmin(V16 a, V16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V16 splat(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }

inline float hreduce(__m256 v, bool is_min) {
  __m128 a = is_min ? _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))
                    : _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 b = _mm_movehl_ps(a, a);
  a = is_min ? _mm_min_ps(a, b) : _mm_max_ps(a, b);
  b = _mm_shuffle_ps(a, a, 1);
  a = is_min ? _mm_min_ss(a, b) : _mm_max_ss(a, b);
  return _mm_cvtss_f32(a);
}
inline float hmin(V16 a) { return hreduce(_mm256_min_ps(a.lo, a.hi), true); }
inline float hmax(V16 a) { return hreduce(_mm256_max_ps(a.lo, a.hi), false); }
inline V16 vadd(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V16 vor(V16 a, V16 b) { return {_mm256_or_ps(a.lo, b.lo), _mm256_or_ps(a.hi, b.hi)}; }
inline void storef(V16 a, float* p) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline V16 loadf(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline uint32_t nan_bits(V16 a) {
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, a.lo, _CMP_UNORD_Q));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(a.hi, a.hi, _CMP_UNORD_Q));
  return static_cast<uint32_t>(lo | (hi << 8));
}
inline V16 zero_where_zero(V16 s, V16 r) {
  const __m256 z = _mm256_setzero_ps();
  return {_mm256_and_ps(_mm256_cmp_ps(s.lo, z, _CMP_NEQ_UQ), r.lo),
          _mm256_and_ps(_mm256_cmp_ps(s.hi, z, _CMP_NEQ_UQ), r.hi)};
}

struct OpMin {
  static __m256 f(__m256 a, __m256 b) { return _mm256_min_ps(a, b); }
};
struct OpMax {
  static __m256 f(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
};
struct OpOr {
  static __m256 f(__m256 a, __m256 b) { return _mm256_or_ps(a, b); }
};

// 8 vectors of 8 lanes -> lane j = Op-reduction of a[j].
template <class Op>
inline __m256 reduce8(const __m256* a) {
  __m256 c[4], e[2];
  for (int k = 0; k < 4; ++k) {
    const __m256 x = a[2 * k], y = a[2 * k + 1];
    c[k] = Op::f(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
  }
  for (int k = 0; k < 2; ++k) {
    const __m256 x = c[2 * k], y = c[2 * k + 1];
    e[k] = Op::f(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                 _mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m256 f = Op::f(_mm256_shuffle_ps(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm256_shuffle_ps(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // Lanes now hold vectors 0 2 4 6 1 3 5 7.
  return _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

template <class Op>
inline V16 reduce16(const V16* v) {
  __m256 a[16];
  for (int j = 0; j < 16; ++j) a[j] = Op::f(v[j].lo, v[j].hi);
  return {reduce8<Op>(a), reduce8<Op>(a + 8)};
}

inline __m256i codes8(__m256 x, __m256 mn, __m256 r, __m256 qmax) {
  __m256 t = _mm256_mul_ps(_mm256_sub_ps(x, mn), r);
  t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  t = _mm256_max_ps(t, _mm256_setzero_ps());  // NaN -> 0 (second operand)
  t = _mm256_min_ps(t, qmax);
  return _mm256_cvtps_epi32(t);
}

inline __m128i codes16(V16 x, V16 mn, V16 r, V16 qmax) {
  const __m256i a = codes8(x.lo, mn.lo, r.lo, qmax.lo);
  const __m256i b = codes8(x.hi, mn.hi, r.hi, qmax.hi);
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
  return _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

// See the AVX-512 codes16_fast: rint by adding 2^23, clamp and extract on the bits.
inline __m256i codes8_fast(__m256 x, __m256 mn, __m256 r, __m256i cap) {
  const __m256 w = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x, mn), r),
                                 _mm256_set1_ps(8388608.0f));
  return _mm256_and_si256(_mm256_min_epu32(_mm256_castps_si256(w), cap),
                          _mm256_set1_epi32(0xFF));
}
using CapBits = __m256i;
inline CapBits cap_bits(int qmax) { return _mm256_set1_epi32(0x4B000000 + qmax); }

inline __m128i codes16_fast(V16 x, V16 mn, V16 r, CapBits cap) {
  const __m256i a = codes8_fast(x.lo, mn.lo, r.lo, cap);
  const __m256i b = codes8_fast(x.hi, mn.hi, r.hi, cap);
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
  return _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

inline V16 dequant16(__m128i codes, V16 s, V16 m) {
  const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
  const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
  return {_mm256_fmadd_ps(a, s.lo, m.lo), _mm256_fmadd_ps(b, s.hi, m.hi)};
}

#define TKV_VARIANT_NAME "avx2"
#define TKV_VARIANT_FN avx2_variant

#else
#error "quant_simd.cpp needs TKV_SIMD_AVX512 or TKV_SIMD_AVX2"
#endif

// ---- the kernels, written once over V16 ----

// Pass 1 over one group: running min, max, and a NaN probe (x - x is NaN exactly for NaN/Inf).
template <DType D>
inline void scan_group(const typename Elem<D>::T* xg, int G, V16& lo, V16& hi, V16& probe) {
  V16 v = load16<D>(xg);
  lo = v;
  hi = v;
  probe = vsub(v, v);
  for (int i = 16; i < G; i += 16) {
    v = load16<D>(xg + i);
    probe = vor(probe, vsub(v, v));
    lo = vmin(lo, v);
    hi = vmax(hi, v);
  }
}

// Pass 2 over one good group: codes, packed 16 at a time.
template <DType D>
inline void encode_group(const typename Elem<D>::T* xg, int G, int bits, float mn, float r,
                         V16 qmax, uint8_t* pg) {
  const V16 vmn = splat(mn);
  const V16 vr = splat(r);
  const int out16 = 2 * bits;  // bytes per 16 codes
  if (std::isfinite(r)) {  // the usual case; r = inf only for a tiny subnormal float32 scale
    const CapBits cap = cap_bits((1 << bits) - 1);
    for (int i = 0; i < G; i += 16) {
      pack16(codes16_fast(load16<D>(xg + i), vmn, vr, cap), bits, pg + (i / 16) * out16);
    }
    return;
  }
  for (int i = 0; i < G; i += 16) {  // NaN-safe path (0 * inf -> code 0)
    pack16(codes16(load16<D>(xg + i), vmn, vr, qmax), bits, pg + (i / 16) * out16);
  }
}

template <DType D>
void quantize_groups_simd(const QuantArgs& a, int64_t begin, int64_t end) {
  using T = typename Elem<D>::T;
  const T* x = static_cast<const T*>(a.x);
  T* scale = static_cast<T*>(a.scale);
  T* minimum = static_cast<T*>(a.minimum);
  const int G = a.group_size;
  const int bits = a.bits;
  const int64_t nb = static_cast<int64_t>(G) * bits / 8;
  const V16 qmax = splat(static_cast<float>((1 << bits) - 1));
  const V16 zero = splat(0.0f);
  int64_t g = begin;
  // 16 groups at a time: steps 1-4 of the format run once, vectorised across the groups,
  // which removes the serial reduce -> divide -> round -> divide chain of each group
  // (measured: 13 ns per group of fixed cost before, on the 2-core CI machine).
  for (; g + 16 <= end; g += 16) {
    V16 lo[16], hi[16], probe[16];
    for (int j = 0; j < 16; ++j) scan_group<D>(x + (g + j) * G, G, lo[j], hi[j], probe[j]);
    const V16 mn = vadd(reduce16<OpMin>(lo), zero);  // -0.0 + +0.0 = +0.0
    const V16 mx = vadd(reduce16<OpMax>(hi), zero);
    uint32_t bad = nan_bits(reduce16<OpOr>(probe));
    store16<D>(vdiv(vsub(mx, mn), qmax), scale + g);  // RNE into the dtype
    const V16 s = load16<D>(scale + g);
    bad |= nan_bits(vsub(s, s));  // non-finite scale
    store16<D>(mn, minimum + g);  // exact: each minimum came from the dtype
    alignas(64) float mnv[16];
    alignas(64) float rv[16];
    storef(mn, mnv);
    storef(zero_where_zero(s, vdiv(splat(1.0f), s)), rv);
    for (int j = 0; j < 16; ++j) {
      uint8_t* pg = a.packed + (g + j) * nb;
      if ((bad >> j) & 1u) {
        scale[g + j] = canonical_nan<D>();
        minimum[g + j] = Elem<D>::kZero;
        std::memset(pg, 0, static_cast<size_t>(nb));
      } else {
        encode_group<D>(x + (g + j) * G, G, bits, mnv[j], rv[j], qmax, pg);
      }
    }
  }
  for (; g < end; ++g) {  // the last < 16 groups of this range, one at a time
    V16 lo, hi, probe;
    scan_group<D>(x + g * G, G, lo, hi, probe);
    const bool nonfinite = nan_bits(probe) != 0;
    const GroupParams p = finish_group<D>(hmin(lo), hmax(hi), nonfinite, bits, scale + g,
                                          minimum + g);
    uint8_t* pg = a.packed + g * nb;
    if (p.bad) {
      std::memset(pg, 0, static_cast<size_t>(nb));
    } else {
      encode_group<D>(x + g * G, G, bits, p.mn, p.r, qmax, pg);
    }
  }
}

template <DType D>
void dequantize_groups_simd(const DequantArgs& a, int64_t begin, int64_t end) {
  using E = Elem<D>;
  using T = typename E::T;
  const T* scale = static_cast<const T*>(a.scale);
  const T* minimum = static_cast<const T*>(a.minimum);
  T* y = static_cast<T*>(a.y);
  const int G = a.group_size;
  const int bits = a.bits;
  const int64_t nb = static_cast<int64_t>(G) * bits / 8;
  const int in16 = 2 * bits;
  for (int64_t g = begin; g < end; ++g) {
    const uint8_t* pg = a.packed + g * nb;
    T* yg = y + g * G;
    const V16 s = splat(E::load(scale[g]));
    const V16 m = splat(E::load(minimum[g]));
    for (int i = 0; i < G; i += 16) {
      store16<D>(dequant16(unpack16(pg + (i / 16) * in16, bits), s, m), yg + i);
    }
  }
}

// ---- per-channel (axis=-2): 16 channels side by side, groups run down the tokens ----
// Loads are contiguous along channels, so min/max/scale need no horizontal reduction: lane c
// of the running vectors is channel c's group. Codes of 16 tokens x 16 channels are transposed
// in registers and packed per channel with the same pack16 as the per-token path.

template <DType D>
void quantize_cols_simd(const QuantArgs& a, int64_t begin, int64_t end) {
  using T = typename Elem<D>::T;
  const T* x = static_cast<const T*>(a.x);
  T* scale = static_cast<T*>(a.scale);
  T* minimum = static_cast<T*>(a.minimum);
  const int G = a.group_size, bits = a.bits;
  const int64_t C = a.channels, n_tg = a.tokens / G;
  const int64_t nb = static_cast<int64_t>(G) * bits / 8, row_bytes = a.tokens * bits / 8;
  const V16 qmax = splat(static_cast<float>((1 << bits) - 1));
  const CapBits cap = cap_bits((1 << bits) - 1);
  const V16 zero = splat(0.0f);
  const int64_t c16 = C - C % 16;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t r = tile / n_tg, tg = tile % n_tg;
    const T* xt = x + (r * a.tokens + tg * G) * C;
    for (int64_t d = 0; d < c16; d += 16) {
      V16 lo = load16<D>(xt + d), hi = lo, probe = vsub(lo, lo);
      for (int i = 1; i < G; ++i) {
        const V16 v = load16<D>(xt + i * C + d);
        probe = vor(probe, vsub(v, v));
        lo = vmin(lo, v);
        hi = vmax(hi, v);
      }
      const V16 mn = vadd(lo, zero), mx = vadd(hi, zero);  // -0.0 -> +0.0
      alignas(64) T sc[16];
      alignas(64) T mb[16];
      store16<D>(vdiv(vsub(mx, mn), qmax), sc);
      const V16 s = load16<D>(sc);
      const uint32_t bad = nan_bits(probe) | nan_bits(vsub(s, s));
      store16<D>(mn, mb);
      const V16 rcp = zero_where_zero(s, vdiv(splat(1.0f), s));
      alignas(64) float rv[16];
      storef(rcp, rv);
      bool fast = true;
      for (int c = 0; c < 16; ++c) fast &= std::isfinite(rv[c]);
      uint8_t* pg[16];
      for (int c = 0; c < 16; ++c) {
        const int64_t ch = r * C + d + c;
        pg[c] = a.packed + ch * row_bytes + tg * nb;
        scale[ch * n_tg + tg] = sc[c];
        minimum[ch * n_tg + tg] = mb[c];
      }
      for (int i0 = 0; i0 < G; i0 += 16) {  // 16 tokens x 16 channels of codes, transposed
        __m128i rows[16];
        for (int j = 0; j < 16; ++j) {
          const V16 v = load16<D>(xt + (i0 + j) * C + d);
          rows[j] = fast ? codes16_fast(v, mn, rcp, cap) : codes16(v, mn, rcp, qmax);
        }
        transpose16x16(rows);
        for (int c = 0; c < 16; ++c) pack16(rows[kBitRev4[c]], bits, pg[c] + (i0 / 16) * 2 * bits);
      }
      for (int c = 0; c < 16; ++c) {
        if ((bad >> c) & 1u) {
          const int64_t ch = r * C + d + c;
          scale[ch * n_tg + tg] = canonical_nan<D>();
          minimum[ch * n_tg + tg] = Elem<D>::kZero;
          std::memset(pg[c], 0, static_cast<size_t>(nb));
        }
      }
    }
  }
  if (c16 < C) quantize_cols_scalar<D>(a, begin, end, c16);  // channel tail
}

template <DType D>
void dequantize_cols_simd(const DequantArgs& a, int64_t begin, int64_t end) {
  using E = Elem<D>;
  using T = typename E::T;
  const T* scale = static_cast<const T*>(a.scale);
  const T* minimum = static_cast<const T*>(a.minimum);
  T* y = static_cast<T*>(a.y);
  const int G = a.group_size, bits = a.bits;
  const int64_t C = a.channels, n_tg = a.tokens / G;
  const int64_t nb = static_cast<int64_t>(G) * bits / 8, row_bytes = a.tokens * bits / 8;
  const int64_t c16 = C - C % 16;
  if (c16 < C) dequantize_cols_scalar<D>(a, begin, end, c16);  // channel tail
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t r = tile / n_tg, tg = tile % n_tg;
    T* yt = y + (r * a.tokens + tg * G) * C;
    for (int64_t d = 0; d < c16; d += 16) {
      alignas(64) float sv[16];
      alignas(64) float mv[16];
      const uint8_t* pg[16];
      for (int c = 0; c < 16; ++c) {
        const int64_t ch = r * C + d + c;
        sv[c] = E::load(scale[ch * n_tg + tg]);
        mv[c] = E::load(minimum[ch * n_tg + tg]);
        pg[c] = a.packed + ch * row_bytes + tg * nb;
      }
      const V16 s = loadf(sv), m = loadf(mv);
      for (int i0 = 0; i0 < G; i0 += 16) {  // 16 channels x 16 tokens of codes, transposed
        __m128i rows[16];
        for (int c = 0; c < 16; ++c) rows[c] = unpack16(pg[c] + (i0 / 16) * 2 * bits, bits);
        transpose16x16(rows);
        for (int i = 0; i < 16; ++i) {
          store16<D>(dequant16(rows[kBitRev4[i]], s, m), yt + (i0 + i) * C + d);
        }
      }
    }
  }
}

void quantize_range(const QuantArgs& a, int64_t begin, int64_t end) {
  if (a.group_size % 16 != 0) return quantize_range_scalar(a, begin, end);
  if (a.channels > 0) {
    switch (a.dtype) {
      case DType::F16: return quantize_cols_simd<DType::F16>(a, begin, end);
      case DType::BF16: return quantize_cols_simd<DType::BF16>(a, begin, end);
      case DType::F32: return quantize_cols_simd<DType::F32>(a, begin, end);
    }
  }
  switch (a.dtype) {
    case DType::F16: return quantize_groups_simd<DType::F16>(a, begin, end);
    case DType::BF16: return quantize_groups_simd<DType::BF16>(a, begin, end);
    case DType::F32: return quantize_groups_simd<DType::F32>(a, begin, end);
  }
}

void dequantize_range(const DequantArgs& a, int64_t begin, int64_t end) {
  if (a.group_size % 16 != 0) return dequantize_range_scalar(a, begin, end);
  if (a.channels > 0) {
    switch (a.dtype) {
      case DType::F16: return dequantize_cols_simd<DType::F16>(a, begin, end);
      case DType::BF16: return dequantize_cols_simd<DType::BF16>(a, begin, end);
      case DType::F32: return dequantize_cols_simd<DType::F32>(a, begin, end);
    }
  }
  switch (a.dtype) {
    case DType::F16: return dequantize_groups_simd<DType::F16>(a, begin, end);
    case DType::BF16: return dequantize_groups_simd<DType::BF16>(a, begin, end);
    case DType::F32: return dequantize_groups_simd<DType::F32>(a, begin, end);
  }
}

}  // namespace

Variant TKV_VARIANT_FN() { return {TKV_VARIANT_NAME, &quantize_range, &dequantize_range}; }

}  // namespace tkv::cpu
