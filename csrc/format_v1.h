// KV quantization format v1 (DESIGN.md), scalar C++ form shared by the CPU kernels.
//
// Host-only, no torch. Every function here must stay bit-identical to thunderkv/reference.py:
// compile with -ffp-contract=off (CMakeLists.txt does) so that no multiply-add is contracted.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace tkv {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2 };

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE binary16 -> binary32 (exact, subnormals included).
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  if (em >= 0x7C00u) return bits_to_f32(sign | 0x7F800000u | ((em & 0x3FFu) << 13));
  if (em >= 0x0400u) return bits_to_f32(sign | ((em << 13) + 0x38000000u));
  const float f = static_cast<float>(em) * 5.9604644775390625e-08f;  // em * 2^-24, exact
  return sign ? -f : f;
}

// binary32 -> binary16, round to nearest even; overflow to infinity; NaN stays NaN.
inline uint16_t f32_to_f16_rne(float f) {
  const uint32_t x = f32_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 -> inf
  if (ax >= 0x38800000u) {                                              // normal half
    const uint32_t odd = (ax >> 13) & 1u;
    ax += 0xC8000FFFu + odd;  // rebias exponent by -112 and add the rounding bias
    return static_cast<uint16_t>(sign | (ax >> 13));
  }
  // Subnormal half or zero: adding 0.5f aligns the value to units of 2^-24 with RNE.
  const float t = bits_to_f32(ax) + 0.5f;
  return static_cast<uint16_t>(sign | (f32_to_bits(t) - 0x3F000000u));
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN -> canonical 0x7FC0 (as torch does).
inline uint16_t f32_to_bf16_rne(float f) {
  const uint32_t x = f32_to_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// Element traits: storage type, exact widening to float, RNE narrowing, canonical NaN.
template <DType D>
struct Elem;

template <>
struct Elem<DType::F16> {
  using T = uint16_t;
  static float load(T v) { return f16_to_f32(v); }
  static T from_f32(float f) { return f32_to_f16_rne(f); }
  static constexpr T kNaN = 0x7E00u;
  static constexpr T kZero = 0;
};

template <>
struct Elem<DType::BF16> {
  using T = uint16_t;
  static float load(T v) { return bf16_to_f32(v); }
  static T from_f32(float f) { return f32_to_bf16_rne(f); }
  static constexpr T kNaN = 0x7FC0u;
  static constexpr T kZero = 0;
};

template <>
struct Elem<DType::F32> {
  using T = float;
  static float load(T v) { return v; }
  static T from_f32(float f) { return f; }
  static T nan_value() { return bits_to_f32(0x7FC00000u); }
  static constexpr T kZero = 0.0f;
};

template <DType D>
inline typename Elem<D>::T canonical_nan() {
  if constexpr (D == DType::F32) {
    return Elem<D>::nan_value();
  } else {
    return Elem<D>::kNaN;
  }
}

// Per-group parameters after steps 1-4 of the format.
struct GroupParams {
  float mn;      // f32(minimum), +0.0 for a zero minimum
  float r;       // correctly rounded 1 / f32(scale), or 0
  bool bad;      // NaN/Inf in the group or a non-finite scale
};

// Steps 2-4 from the exact group minimum/maximum; writes scale/minimum (canonical for bad).
template <DType D>
inline GroupParams finish_group(float mn, float mx, bool nonfinite, int bits,
                                typename Elem<D>::T* scale_out, typename Elem<D>::T* min_out) {
  using E = Elem<D>;
  if (mn == 0.0f) mn = 0.0f;  // -0.0 -> +0.0
  if (mx == 0.0f) mx = 0.0f;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const float diff = mx - mn;
  const typename E::T scale = E::from_f32(diff / qmax);
  const float s = E::load(scale);
  GroupParams p;
  p.bad = nonfinite || !std::isfinite(s);
  if (p.bad) {
    *scale_out = canonical_nan<D>();
    *min_out = E::kZero;
    p.mn = 0.0f;
    p.r = 0.0f;
    return p;
  }
  *scale_out = scale;
  *min_out = E::from_f32(mn);  // exact: mn came from the dtype
  p.mn = mn;
  p.r = (s != 0.0f) ? 1.0f / s : 0.0f;
  return p;
}

// Step 5 for one element. fmaxf maps NaN (0 * inf) to 0, as the format says.
inline uint32_t code_of(float x, const GroupParams& p, float qmax) {
  float v = (x - p.mn) * p.r;
  v = std::rint(v);
  v = std::fmax(v, 0.0f);
  v = std::fmin(v, qmax);
  return static_cast<uint32_t>(v);
}

// Scalar quantize of one group of G elements (any valid G); writes G*bits/8 packed bytes.
template <DType D>
inline void quantize_group_scalar(const typename Elem<D>::T* x, int G, int bits, uint8_t* packed,
                                  typename Elem<D>::T* scale_out, typename Elem<D>::T* min_out) {
  using E = Elem<D>;
  float mn = std::numeric_limits<float>::infinity();
  float mx = -mn;
  bool nonfinite = false;
  for (int i = 0; i < G; ++i) {
    const float v = E::load(x[i]);
    nonfinite |= !std::isfinite(v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  const GroupParams p = finish_group<D>(mn, mx, nonfinite, bits, scale_out, min_out);
  const int nbytes = G * bits / 8;
  if (p.bad) {
    std::memset(packed, 0, static_cast<size_t>(nbytes));
    return;
  }
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int per_byte = 8 / bits;
  for (int b = 0; b < nbytes; ++b) {
    uint32_t byte = 0;
    for (int k = 0; k < per_byte; ++k) {
      byte |= code_of(E::load(x[b * per_byte + k]), p, qmax) << (k * bits);
    }
    packed[b] = static_cast<uint8_t>(byte);
  }
}

// Scalar dequantize of one group: y = rne(fma(code, scale, minimum)).
template <DType D>
inline void dequantize_group_scalar(const uint8_t* packed, int G, int bits,
                                    typename Elem<D>::T scale, typename Elem<D>::T minimum,
                                    typename Elem<D>::T* y) {
  using E = Elem<D>;
  const float s = E::load(scale);
  const float m = E::load(minimum);
  const int per_byte = 8 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  for (int i = 0; i < G; ++i) {
    const uint32_t code = (packed[i / per_byte] >> ((i % per_byte) * bits)) & mask;
    y[i] = E::from_f32(std::fma(static_cast<float>(code), s, m));
  }
}

}  // namespace tkv
