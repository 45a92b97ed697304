// What one thread of each CUDA kernel of format v1 does, for the kernels whose threads never
// talk to each other (the scalar fallbacks and both per-channel kernels). Every body here is
// __host__ __device__: quant_cuda.cu launches it on the GPU, and tests/cuda_emulation runs
// every thread of a launch, one after the other, on the CPU and compares the outputs with the
// reference bit for bit -- so these kernels are checked on every CI run, GPU or not.
//
// Every float operation goes through an explicitly rounded helper: the device intrinsics on
// the GPU, IEEE operations on the host (a host build must pass -ffp-contract=off).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace tkv::cuda {

// ---------------------------------------------------------------- rounding and conversions
__host__ __device__ inline float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
__host__ __device__ inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
__host__ __device__ inline float rcp_rn(float a) {
#ifdef __CUDA_ARCH__
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}
__host__ __device__ inline float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
__host__ __device__ inline bool finite(float v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}
// Step 5 of the format: clamp(rint(q), 0, qmax); fmaxf maps NaN to 0.
__host__ __device__ inline unsigned code_of(float q, float qmax) {
  return static_cast<unsigned>(fminf(fmaxf(rintf(q), 0.0f), qmax));
}
__host__ __device__ inline float float_of_bits(uint32_t bits) {
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
__host__ __device__ inline float positive_infinity() { return float_of_bits(0x7F800000u); }

template <class T>
struct Conv;

template <>
struct Conv<__half> {
  static __host__ __device__ float to(__half v) { return __half2float(v); }
  static __host__ __device__ __half from(float f) { return __float2half_rn(f); }
  static __host__ __device__ __half nan() { return __ushort_as_half(0x7E00u); }
};

template <>
struct Conv<__nv_bfloat16> {
  static __host__ __device__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __host__ __device__ __nv_bfloat16 from(float f) { return __float2bfloat16_rn(f); }
  static __host__ __device__ __nv_bfloat16 nan() { return __ushort_as_bfloat16(0x7FC0u); }
};

template <>
struct Conv<float> {
  static __host__ __device__ float to(float v) { return v; }
  static __host__ __device__ float from(float f) { return f; }
  static __host__ __device__ float nan() { return float_of_bits(0x7FC00000u); }
};

// Steps 1-4 and 6 of the format from a group's running min/max: the scale and minimum to
// store, and the group's (minimum, reciprocal) for step 5. A `bad` group's r is 0.
template <class T>
struct GroupFinish {
  T scale, minimum;
  float mn, r;
  bool bad;
};

template <class T>
__host__ __device__ inline GroupFinish<T> finish_group(float mn, float mx, bool nonfinite,
                                                       int bits) {
  if (mn == 0.0f) mn = 0.0f;  // -0.0 -> +0.0
  if (mx == 0.0f) mx = 0.0f;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const T sc = Conv<T>::from(div_rn(sub_rn(mx, mn), qmax));
  const float s = Conv<T>::to(sc);
  if (nonfinite || !finite(s)) return {Conv<T>::nan(), Conv<T>::from(0.0f), mn, 0.0f, true};
  return {sc, Conv<T>::from(mn), mn, s != 0.0f ? rcp_rn(s) : 0.0f, false};
}

// Paged rows (thunderkv/paged.py): with `index`, group g belongs to row g / row_groups of the
// contiguous side and to row index[that] of the slotted side, which has `slot_rows` rows; an
// index outside [0, slot_rows) skips the row (-1 marks padding; anything else out of range can
// only arrive unchecked, under CUDA-graph capture, and must not touch memory), except
// kZeroRow: dequantize writes zeros into that row (a gather past a sequence's end), quantize
// skips it. Without `index`, the identity. Quantize slots its outputs, dequantize its inputs.
constexpr int64_t kZeroRow = -2;  // thunderkv.backends.ZERO_ROW

struct Rows {
  const int64_t* index = nullptr;
  int64_t row_groups = 1;
  int64_t slot_rows = 0;
};

// The slotted side's group for group g of the contiguous side; -1 to skip, kZeroRow for zeros.
__host__ __device__ inline int64_t slotted_group(int64_t g, const Rows& r) {
  if (r.index == nullptr) return g;
  const int64_t row = r.index[g / r.row_groups];
  if (row == kZeroRow) return kZeroRow;
  return row < 0 || row >= r.slot_rows ? -1 : row * r.row_groups + g % r.row_groups;
}

// ---------------------------------------------------------------- one group per thread
// A group's running min/max and whether it holds a NaN or an infinity (steps 1-2), as every
// quantize kernel folds its values (the vector kernel's lanes then merge theirs).
struct MinMax {
  float mn = positive_infinity(), mx = -positive_infinity();
  bool nonfinite = false;
  __host__ __device__ void add(float v) {
    nonfinite |= !finite(v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
};

// One group of G values read with `stride` (1: per-token, D: per-channel). Outputs at
// pg / *scale / *minimum.
template <class T>
__host__ __device__ inline void quantize_group(const T* xg, int64_t stride, int G, int bits,
                                               uint8_t* pg, T* scale, T* minimum) {
  const int nb = G * bits / 8;
  MinMax m;
  for (int i = 0; i < G; ++i) m.add(Conv<T>::to(xg[i * stride]));
  const GroupFinish<T> f = finish_group<T>(m.mn, m.mx, m.nonfinite, bits);
  *scale = f.scale;
  *minimum = f.minimum;
  if (f.bad) {
    for (int b = 0; b < nb; ++b) pg[b] = 0;
    return;
  }
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int per_byte = 8 / bits;
  for (int b = 0; b < nb; ++b) {
    unsigned byte = 0;
    for (int k = 0; k < per_byte; ++k) {
      const float v = Conv<T>::to(xg[(b * per_byte + k) * stride]);
      byte |= code_of(mul_rn(sub_rn(v, f.mn), f.r), qmax) << (k * bits);
    }
    pg[b] = static_cast<uint8_t>(byte);
  }
}

template <class T>
__host__ __device__ inline void dequantize_group(const uint8_t* pg, T scale, T minimum, int G,
                                                 int bits, T* yg, int64_t stride) {
  const float s = Conv<T>::to(scale);
  const float m = Conv<T>::to(minimum);
  const int per_byte = 8 / bits;
  const unsigned mask = (1u << bits) - 1u;
  for (int i = 0; i < G; ++i) {
    const unsigned code = (pg[i / per_byte] >> ((i % per_byte) * bits)) & mask;
    yg[i * stride] = Conv<T>::from(fma_rn(static_cast<float>(code), s, m));
  }
}

// Per-token scalar fallback, thread `gi` of n_groups.
template <class T>
__host__ __device__ inline void quantize_thread(const T* x, uint8_t* packed, T* scale,
                                                T* minimum, int64_t gi, int G, int bits,
                                                Rows rows) {
  const int64_t g = slotted_group(gi, rows);  // where the group's outputs go
  if (g < 0) return;
  quantize_group(x + gi * G, 1, G, bits, packed + g * (G * bits / 8), scale + g, minimum + g);
}

template <class T>
__host__ __device__ inline void dequantize_thread(const uint8_t* packed, const T* scale,
                                                  const T* minimum, T* y, int64_t g, int G,
                                                  int bits, Rows rows) {
  const int64_t gi = slotted_group(g, rows);  // where the group's inputs come from
  if (gi == kZeroRow) {
    for (int i = 0; i < G; ++i) y[g * G + i] = Conv<T>::from(0.0f);
    return;
  }
  if (gi < 0) return;
  dequantize_group(packed + gi * (G * bits / 8), scale[gi], minimum[gi], G, bits, y + g * G, 1);
}

// ---------------------------------------------------------------- 16-byte vectors
template <class T>
inline constexpr int kVecValues = static_cast<int>(16 / sizeof(T));

template <class T>
__host__ __device__ inline void load16(const T* p, T (&v)[16 / sizeof(T)]) {
#ifdef __CUDA_ARCH__
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  memcpy(v, &raw, 16);
#else
  memcpy(v, p, 16);
#endif
}

template <class T>
__host__ __device__ inline void store16(T* p, const T (&v)[16 / sizeof(T)]) {
#ifdef __CUDA_ARCH__
  uint4 raw;
  memcpy(&raw, v, 16);
  *reinterpret_cast<uint4*>(p) = raw;
#else
  memcpy(p, v, 16);
#endif
}

// ---------------------------------------------------------------- per-token, vectorized
// A group of G values is G / N 16-byte vectors (N = 8 fp16/bf16, 4 fp32) shared by L lanes
// (a warp fraction): each lane folds its vectors into a MinMax, the lanes merge theirs (xor
// shuffles on the GPU; min, max and or are exact and order-free, so any order gives the same
// bits), every lane finishes the group identically, then each stores the codes of its vectors
// as one aligned word per vector. Dequantize: one thread per 16-byte output vector.
template <int BYTES>
struct WordOf;
template <>
struct WordOf<1> { using type = uint8_t; };
template <>
struct WordOf<2> { using type = uint16_t; };
template <>
struct WordOf<4> { using type = uint32_t; };
template <>
struct WordOf<8> { using type = unsigned long long; };

__host__ __device__ inline MinMax merge(MinMax a, const MinMax& b) {
  a.mn = b.mn < a.mn ? b.mn : a.mn;
  a.mx = b.mx > a.mx ? b.mx : a.mx;
  a.nonfinite |= b.nonfinite;
  return a;
}

template <class T>
__host__ __device__ inline MinMax quantize_vec_lane_minmax(const T* xg, int lane, int L,
                                                           int vecs) {
  constexpr int N = kVecValues<T>;
  MinMax m;
  for (int j = lane; j < vecs; j += L) {
    T v[N];
    load16(xg + j * N, v);
#pragma unroll
    for (int k = 0; k < N; ++k) m.add(Conv<T>::to(v[k]));
  }
  return m;
}

template <class T, int BITS>
__host__ __device__ inline void quantize_vec_lane_codes(const T* xg, const GroupFinish<T>& f,
                                                        uint8_t* pg_bytes, int lane, int L,
                                                        int vecs) {
  constexpr int N = kVecValues<T>;
  using Word = typename WordOf<N * BITS / 8>::type;  // one vector's codes
  Word* pg = reinterpret_cast<Word*>(pg_bytes);
  constexpr float qmax = static_cast<float>((1 << BITS) - 1);
  for (int j = lane; j < vecs; j += L) {
    T v[N];
    load16(xg + j * N, v);
    Word word = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {  // a bad group's r is 0: every code 0
      const unsigned q = code_of(mul_rn(sub_rn(Conv<T>::to(v[k]), f.mn), f.r), qmax);
      word |= static_cast<Word>(q) << (k * BITS);
    }
    pg[j] = word;
  }
}

template <class T, int BITS>
__host__ __device__ inline void dequantize_vec_thread(const uint8_t* __restrict__ packed,
                                                      const T* __restrict__ scale,
                                                      const T* __restrict__ minimum,
                                                      T* __restrict__ y, int64_t t, int vecs,
                                                      Rows rows) {
  constexpr int N = kVecValues<T>;
  using Word = typename WordOf<N * BITS / 8>::type;
  const int64_t gi = slotted_group(t / vecs, rows);  // where the inputs come from
  if (gi == kZeroRow) {
    T zeros[N];
#pragma unroll
    for (int k = 0; k < N; ++k) zeros[k] = Conv<T>::from(0.0f);
    store16(y + t * N, zeros);
    return;
  }
  if (gi < 0) return;
  const float s = Conv<T>::to(scale[gi]);
  const float m = Conv<T>::to(minimum[gi]);
  const Word word = reinterpret_cast<const Word*>(packed)[gi * vecs + t % vecs];
  constexpr unsigned mask = (1u << BITS) - 1u;
  T out[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const unsigned code = static_cast<unsigned>(word >> (k * BITS)) & mask;
    out[k] = Conv<T>::from(fma_rn(static_cast<float>(code), s, m));
  }
  store16(y + t * N, out);
}

// Lanes per group (log2) for the vectorized per-token kernels, or -1 when they do not apply.
inline int vec_lanes_log2(int G, size_t elem, uintptr_t values, uintptr_t packed, int bits) {
  const int n = static_cast<int>(16 / elem);
  if (G % n != 0 || values % 16 != 0 || packed % static_cast<uintptr_t>(n * bits / 8) != 0)
    return -1;
  const int vecs = G / n;
  int lg = 0;
  while (lg < 5 && vecs % (2 << lg) == 0) ++lg;
  return lg;
}

// ---------------------------------------------------------------- per-channel
// x [R, T, D], groups of G tokens of one channel; packed [R, D, T*b/8], scale/min [R, D, T/G].
struct Cols {
  int64_t tokens, channels;
};

// Scalar per-channel kernel (the fallback): one thread per group, consecutive threads on
// consecutive channels, so every token row is read (or written) as one coalesced run across
// the warp; each thread's codes are contiguous bytes of packed, stored one byte at a time.
template <class T>
__host__ __device__ inline void quantize_cols_thread(const T* x, uint8_t* packed, T* scale,
                                                     T* minimum, int64_t id, int G, int bits,
                                                     Cols c) {
  const int64_t tb_count = c.tokens / G;
  const int64_t d = id % c.channels;  // (r, tb, d) order: d fastest
  const int64_t tb = (id / c.channels) % tb_count;
  const int64_t r = id / (c.channels * tb_count);
  const int64_t g = (r * c.channels + d) * tb_count + tb;  // the group's index in packed order
  quantize_group(x + (r * c.tokens + tb * G) * c.channels + d, c.channels, G, bits,
                 packed + g * (G * bits / 8), scale + g, minimum + g);
}

template <class T>
__host__ __device__ inline void dequantize_cols_thread(const uint8_t* packed, const T* scale,
                                                       const T* minimum, T* y, int64_t id, int G,
                                                       int bits, Cols c) {
  const int64_t tb_count = c.tokens / G;
  const int64_t d = id % c.channels;
  const int64_t tb = (id / c.channels) % tb_count;
  const int64_t r = id / (c.channels * tb_count);
  const int64_t g = (r * c.channels + d) * tb_count + tb;
  dequantize_group(packed + g * (G * bits / 8), scale[g], minimum[g], G, bits,
                   y + (r * c.tokens + tb * G) * c.channels + d, c.channels);
}

// Vectorized per-channel kernels: one thread per V = 16 / sizeof(T) adjacent channels of one
// block of G tokens. Each token row is one 16-byte load (or store) per thread, so a warp moves
// 512 contiguous bytes per access; codes are built in registers, WORDS 32-bit words (one
// 16-byte or one 4-byte store) per channel at a time, instead of byte by byte. Thread ids run
// (r, tb, dv) with dv fastest. Needs D % V == 0, 16-byte aligned x/y and a group's code bytes
// (G * BITS / 8) a multiple of 4 * WORDS, with packed aligned to that: cols_vec_words says.
template <int WORDS>
__host__ __device__ inline void store_words(uint8_t* p, const uint32_t (&w)[WORDS]) {
#ifdef __CUDA_ARCH__
  if constexpr (WORDS == 4) {
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    static_assert(WORDS == 1, "WORDS is 1 or 4");
    *reinterpret_cast<uint32_t*>(p) = w[0];
  }
#else
  memcpy(p, w, 4 * WORDS);
#endif
}

template <int WORDS>
__host__ __device__ inline void load_words(const uint8_t* p, uint32_t (&w)[WORDS]) {
#ifdef __CUDA_ARCH__
  if constexpr (WORDS == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else {
    static_assert(WORDS == 1, "WORDS is 1 or 4");
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  }
#else
  memcpy(w, p, 4 * WORDS);
#endif
}

// 32-bit words per code store (4 or 1) when a group's code bytes and `packed` allow it, else 0.
inline int code_words(int G, int bits, uintptr_t packed) {
  const int group_bytes = G * bits / 8;
  if (group_bytes % 16 == 0 && packed % 16 == 0) return 4;
  if (group_bytes % 4 == 0 && packed % 4 == 0) return 1;
  return 0;
}

// 32-bit words per code store of the vectorized per-channel kernels (4 or 1), or 0 when they
// do not apply (then the scalar per-channel kernel runs).
inline int cols_vec_words(int G, int bits, size_t elem, int64_t channels, uintptr_t values,
                          uintptr_t packed) {
  const int64_t v = static_cast<int64_t>(16 / elem);
  if (channels % v != 0 || values % 16 != 0) return 0;
  return code_words(G, bits, packed);
}

template <class T, int BITS, int WORDS>
__host__ __device__ inline void quantize_cols_vec_thread(const T* __restrict__ x,
                                                         uint8_t* __restrict__ packed,
                                                         T* __restrict__ scale,
                                                         T* __restrict__ minimum, int64_t id,
                                                         int G, Cols c) {
  constexpr int V = kVecValues<T>;
  constexpr int PER_WORD = 32 / BITS;         // codes per 32-bit word
  constexpr int CHUNK = PER_WORD * WORDS;     // tokens per code store
  const int64_t dv_count = c.channels / V, tb_count = c.tokens / G;
  const int64_t dv = id % dv_count;
  const int64_t tb = (id / dv_count) % tb_count;
  const int64_t r = id / (dv_count * tb_count);
  const T* xs = x + (r * c.tokens + tb * G) * c.channels + dv * V;  // token 0, channel 0 of V
  MinMax m[V];
#pragma unroll 4
  for (int t = 0; t < G; ++t) {
    T v[V];
    load16(xs + t * c.channels, v);
#pragma unroll
    for (int k = 0; k < V; ++k) m[k].add(Conv<T>::to(v[k]));
  }
  // channel dv*V + k's group: (r, d, tb) in packed order, tb_count apart per channel
  const int64_t g0 = (r * c.channels + dv * V) * tb_count + tb;
  // A bad group's r is 0, so each of its codes is clamp(rint(finite * 0 or NaN)) = 0 (step 6).
  float gmn[V], gr[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t g = g0 + k * tb_count;
    const GroupFinish<T> f = finish_group<T>(m[k].mn, m[k].mx, m[k].nonfinite, BITS);
    scale[g] = f.scale;
    minimum[g] = f.minimum;
    gmn[k] = f.mn, gr[k] = f.r;
  }
  constexpr float qmax = static_cast<float>((1 << BITS) - 1);
  const int64_t group_bytes = static_cast<int64_t>(G) * BITS / 8;
  for (int t0 = 0; t0 < G; t0 += CHUNK) {
    uint32_t w[V][WORDS];
#pragma unroll
    for (int k = 0; k < V; ++k)
#pragma unroll
      for (int i = 0; i < WORDS; ++i) w[k][i] = 0;
#pragma unroll
    for (int j = 0; j < CHUNK; ++j) {
      T v[V];
      load16(xs + (t0 + j) * c.channels, v);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const unsigned q = code_of(mul_rn(sub_rn(Conv<T>::to(v[k]), gmn[k]), gr[k]), qmax);
        w[k][j / PER_WORD] |= q << ((j % PER_WORD) * BITS);
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k)
      store_words<WORDS>(packed + (g0 + k * tb_count) * group_bytes + t0 * BITS / 8, w[k]);
  }
}

template <class T, int BITS, int WORDS>
__host__ __device__ inline void dequantize_cols_vec_thread(const uint8_t* __restrict__ packed,
                                                           const T* __restrict__ scale,
                                                           const T* __restrict__ minimum,
                                                           T* __restrict__ y, int64_t id, int G,
                                                           Cols c) {
  constexpr int V = kVecValues<T>;
  constexpr int PER_WORD = 32 / BITS;
  constexpr int CHUNK = PER_WORD * WORDS;
  constexpr unsigned mask = (1u << BITS) - 1u;
  const int64_t dv_count = c.channels / V, tb_count = c.tokens / G;
  const int64_t dv = id % dv_count;
  const int64_t tb = (id / dv_count) % tb_count;
  const int64_t r = id / (dv_count * tb_count);
  T* ys = y + (r * c.tokens + tb * G) * c.channels + dv * V;
  const int64_t g0 = (r * c.channels + dv * V) * tb_count + tb;
  float s[V], m[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s[k] = Conv<T>::to(scale[g0 + k * tb_count]);
    m[k] = Conv<T>::to(minimum[g0 + k * tb_count]);
  }
  const int64_t group_bytes = static_cast<int64_t>(G) * BITS / 8;
  for (int t0 = 0; t0 < G; t0 += CHUNK) {
    uint32_t w[V][WORDS];
#pragma unroll
    for (int k = 0; k < V; ++k)
      load_words<WORDS>(packed + (g0 + k * tb_count) * group_bytes + t0 * BITS / 8, w[k]);
#pragma unroll
    for (int j = 0; j < CHUNK; ++j) {
      T out[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const unsigned code = (w[k][j / PER_WORD] >> ((j % PER_WORD) * BITS)) & mask;
        out[k] = Conv<T>::from(fma_rn(static_cast<float>(code), s[k], m[k]));
      }
      store16(ys + (t0 + j) * c.channels, out);
    }
  }
}

// Register-resident per-channel quantize, an alternative to the two-pass kernel above while
// neither has been timed on a GPU (THUNDERKV_CUDA_COLS=regs picks it; gpu_check.sh times both).
// The two-pass kernel reads each token block twice, and with ~1 KiB per thread in flight the
// second read may miss L2; this one reads it once: one thread per 4 bytes of channels (2
// fp16/bf16 or 1 fp32) of a block of G <= 64 tokens, each row one 4-byte load (a warp reads 128
// contiguous bytes), the G words held in registers for both the min/max and the codes.
// Needs D % (4 / itemsize) == 0, 4-byte aligned x and G in {32, 64}: cols_reg_words says.
template <class T>
inline constexpr int kRegValues = static_cast<int>(4 / sizeof(T));

// 32-bit words per code store of the register-resident kernel (4 or 1), or 0 if it does not
// apply.
inline int cols_reg_words(int G, int bits, size_t elem, int64_t channels, uintptr_t values,
                          uintptr_t packed) {
  const int64_t v = static_cast<int64_t>(4 / elem);
  if ((G != 32 && G != 64) || channels % v != 0 || values % 4 != 0) return 0;
  return code_words(G, bits, packed);
}

// Calls f(bits, G, words) -- each a std::integral_constant -- for the register kernel's
// instantiation matching the runtime (bits, G, words); false when none exists (a group that
// is not whole store words). The launch and the CPU emulation dispatch through this one table.
template <class F>
bool with_cols_reg_variant(int bits, int G, int words, F&& f) {
  bool found = false;
  auto try_one = [&](auto b, auto g, auto w) {
    constexpr int B = decltype(b)::value, GG = decltype(g)::value, W = decltype(w)::value;
    if constexpr (GG % (32 / B * W) == 0) {
      if (!found && bits == B && G == GG && words == W) {
        f(b, g, w);
        found = true;
      }
    }
  };
  auto each = [&](auto b) {
    try_one(b, std::integral_constant<int, 32>{}, std::integral_constant<int, 4>{});
    try_one(b, std::integral_constant<int, 32>{}, std::integral_constant<int, 1>{});
    try_one(b, std::integral_constant<int, 64>{}, std::integral_constant<int, 4>{});
    try_one(b, std::integral_constant<int, 64>{}, std::integral_constant<int, 1>{});
  };
  each(std::integral_constant<int, 2>{});
  each(std::integral_constant<int, 4>{});
  each(std::integral_constant<int, 8>{});
  return found;
}

template <class T, int BITS, int G, int WORDS>
__host__ __device__ inline void quantize_cols_reg_thread(const T* __restrict__ x,
                                                         uint8_t* __restrict__ packed,
                                                         T* __restrict__ scale,
                                                         T* __restrict__ minimum, int64_t id,
                                                         Cols c) {
  constexpr int V = kRegValues<T>;
  constexpr int PER_WORD = 32 / BITS;
  constexpr int CHUNK = PER_WORD * WORDS;
  static_assert(G % CHUNK == 0, "a group's codes are whole store words");
  const int64_t dv_count = c.channels / V, tb_count = c.tokens / G;
  const int64_t dv = id % dv_count;
  const int64_t tb = (id / dv_count) % tb_count;
  const int64_t r = id / (dv_count * tb_count);
  const T* xs = x + (r * c.tokens + tb * G) * c.channels + dv * V;
  uint32_t raw[G];  // row t's V values, as loaded
#pragma unroll
  for (int t = 0; t < G; ++t) {
#ifdef __CUDA_ARCH__
    raw[t] = *reinterpret_cast<const uint32_t*>(xs + t * c.channels);
#else
    memcpy(&raw[t], xs + t * c.channels, 4);
#endif
  }
  auto value = [&](int t, int k) {
    T v[V];
    memcpy(v, &raw[t], 4);
    return Conv<T>::to(v[k]);
  };
  const int64_t g0 = (r * c.channels + dv * V) * tb_count + tb;
  constexpr float qmax = static_cast<float>((1 << BITS) - 1);
  const int64_t group_bytes = static_cast<int64_t>(G) * BITS / 8;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    MinMax m;
#pragma unroll
    for (int t = 0; t < G; ++t) m.add(value(t, k));
    const int64_t g = g0 + k * tb_count;
    const GroupFinish<T> f = finish_group<T>(m.mn, m.mx, m.nonfinite, BITS);
    scale[g] = f.scale;
    minimum[g] = f.minimum;
#pragma unroll
    for (int t0 = 0; t0 < G; t0 += CHUNK) {
      uint32_t w[WORDS] = {};
#pragma unroll
      for (int j = 0; j < CHUNK; ++j)  // a bad group's r is 0: every code 0
        w[j / PER_WORD] |= code_of(mul_rn(sub_rn(value(t0 + j, k), f.mn), f.r), qmax)
                           << ((j % PER_WORD) * BITS);
      store_words<WORDS>(packed + g * group_bytes + t0 * BITS / 8, w);
    }
  }
}

}  // namespace tkv::cuda
