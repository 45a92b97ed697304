// CUDA kernels of format v1. Every float operation uses an explicit round-to-nearest intrinsic,
// so neither nvcc's FMA contraction nor fast-math can change a bit (the build also passes
// --fmad=false).
//
// Vectorized kernels (the default): a group is handled by a warp fraction of L lanes (L = the
// largest power of two <= 32 dividing the group's 16-byte vectors), each lane loading whole
// 16-byte vectors of the input (8 fp16/bf16 or 4 fp32 values) and storing its codes as one
// aligned word; min/max meet across the L lanes by xor shuffles, and every lane then derives
// the same scale with the same operations. Dequantize: one thread per 16-byte output vector.
// Inputs whose groups are not whole 16-byte vectors, or whose pointers are not aligned to
// them, take the one-thread-per-group kernels below (the same arithmetic, scalar).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "device_guard.h"
#include "quant_cuda.h"

namespace tkv::cuda {
namespace {

template <class T>
struct Conv;

template <>
struct Conv<__half> {
  static __device__ float to(__half v) { return __half2float(v); }
  static __device__ __half from(float f) { return __float2half_rn(f); }
  static __device__ __half nan() { return __ushort_as_half(0x7E00u); }
};

template <>
struct Conv<__nv_bfloat16> {
  static __device__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from(float f) { return __float2bfloat16_rn(f); }
  static __device__ __nv_bfloat16 nan() { return __ushort_as_bfloat16(0x7FC0u); }
};

template <>
struct Conv<float> {
  static __device__ float to(float v) { return v; }
  static __device__ float from(float f) { return f; }
  static __device__ float nan() { return __int_as_float(0x7FC00000); }
};

// Paged rows (thunderkv/paged.py): with `index`, group g belongs to row g / row_groups of the
// contiguous side and to row index[that] of the slotted side (-1: skip the row); without, the
// identity. Quantize slots its outputs, dequantize slots its inputs.
struct Rows {
  const int64_t* index = nullptr;
  int64_t row_groups = 1;
};

__device__ inline int64_t slotted_group(int64_t g, const Rows& r) {
  if (r.index == nullptr) return g;
  const int64_t row = r.index[g / r.row_groups];
  return row < 0 ? -1 : row * r.row_groups + g % r.row_groups;
}

// One group of G values read with `stride` (1: per-token, D: per-channel), in one thread: the
// body of the scalar and per-channel kernels. Outputs at pg / *scale / *minimum.
template <class T>
__device__ inline void quantize_group(const T* xg, int64_t stride, int G, int bits, uint8_t* pg,
                                      T* scale, T* minimum) {
  const int nb = G * bits / 8;
  float mn = __int_as_float(0x7F800000);
  float mx = -mn;
  bool nonfinite = false;
  for (int i = 0; i < G; ++i) {
    const float v = Conv<T>::to(xg[i * stride]);
    nonfinite |= !isfinite(v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  if (mn == 0.0f) mn = 0.0f;
  if (mx == 0.0f) mx = 0.0f;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const T sc = Conv<T>::from(__fdiv_rn(__fsub_rn(mx, mn), qmax));
  const float s = Conv<T>::to(sc);
  if (nonfinite || !isfinite(s)) {
    *scale = Conv<T>::nan();
    *minimum = Conv<T>::from(0.0f);
    for (int b = 0; b < nb; ++b) pg[b] = 0;
    return;
  }
  *scale = sc;
  *minimum = Conv<T>::from(mn);
  const float r = s != 0.0f ? __frcp_rn(s) : 0.0f;
  const int per_byte = 8 / bits;
  for (int b = 0; b < nb; ++b) {
    unsigned byte = 0;
    for (int k = 0; k < per_byte; ++k) {
      float v = __fmul_rn(__fsub_rn(Conv<T>::to(xg[(b * per_byte + k) * stride]), mn), r);
      v = fminf(fmaxf(rintf(v), 0.0f), qmax);  // fmaxf maps NaN to 0
      byte |= static_cast<unsigned>(v) << (k * bits);
    }
    pg[b] = static_cast<uint8_t>(byte);
  }
}

template <class T>
__device__ inline void dequantize_group(const uint8_t* pg, T scale, T minimum, int G, int bits,
                                        T* yg, int64_t stride) {
  const float s = Conv<T>::to(scale);
  const float m = Conv<T>::to(minimum);
  const int per_byte = 8 / bits;
  const unsigned mask = (1u << bits) - 1u;
  for (int i = 0; i < G; ++i) {
    const unsigned code = (pg[i / per_byte] >> ((i % per_byte) * bits)) & mask;
    yg[i * stride] = Conv<T>::from(__fmaf_rn(static_cast<float>(code), s, m));
  }
}

template <class T>
__global__ void quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                T* __restrict__ scale, T* __restrict__ minimum, int64_t n_groups,
                                int G, int bits, Rows rows) {
  const int64_t gi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gi >= n_groups) return;
  const int64_t g = slotted_group(gi, rows);  // where the group's outputs go
  if (g < 0) return;
  quantize_group(x + gi * G, 1, G, bits, packed + g * (G * bits / 8), scale + g, minimum + g);
}

template <class T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, const T* __restrict__ scale,
                                  const T* __restrict__ minimum, T* __restrict__ y,
                                  int64_t n_groups, int G, int bits, Rows rows) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n_groups) return;
  const int64_t gi = slotted_group(g, rows);  // where the group's inputs come from
  if (gi < 0) return;
  dequantize_group(packed + gi * (G * bits / 8), scale[gi], minimum[gi], G, bits, y + g * G, 1);
}

// ---------------------------------------------------------------- vectorized kernels
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

template <class T>
__device__ inline void load_vec(const T* p, T (&v)[16 / sizeof(T)]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  memcpy(v, &raw, 16);
}

template <class T, int BITS>
__global__ void quantize_vec_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                    T* __restrict__ scale, T* __restrict__ minimum,
                                    int64_t n_groups, int G, int lanes_log2, Rows rows) {
  constexpr int N = 16 / sizeof(T);  // values per 16-byte vector
  constexpr int WB = N * BITS / 8;   // code bytes per vector
  using Word = typename WordOf<WB>::type;
  const int L = 1 << lanes_log2;
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> lanes_log2;
  const int lane = threadIdx.x & (L - 1);
  const int64_t go = g < n_groups ? slotted_group(g, rows) : -1;  // where the outputs go
  const bool active = go >= 0;  // the same for all L lanes of a group
  const int vecs = G / N;
  const T* xg = x + (active ? g : 0) * G;
  float mn = __int_as_float(0x7F800000);
  float mx = -mn;
  bool nonfinite = false;
  if (active) {
    for (int j = lane; j < vecs; j += L) {
      T v[N];
      load_vec(xg + j * N, v);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float f = Conv<T>::to(v[k]);
        nonfinite |= !isfinite(f);
        mn = f < mn ? f : mn;
        mx = f > mx ? f : mx;
      }
    }
  }
  // every lane of the (full) warp takes part; xor offsets < L stay inside the group's lanes
  for (int off = L >> 1; off > 0; off >>= 1) {
    const float omn = __shfl_xor_sync(0xffffffffu, mn, off);
    const float omx = __shfl_xor_sync(0xffffffffu, mx, off);
    const int onf = __shfl_xor_sync(0xffffffffu, static_cast<int>(nonfinite), off);
    mn = omn < mn ? omn : mn;
    mx = omx > mx ? omx : mx;
    nonfinite |= onf != 0;
  }
  if (!active) return;
  if (mn == 0.0f) mn = 0.0f;
  if (mx == 0.0f) mx = 0.0f;
  const float qmax = static_cast<float>((1 << BITS) - 1);
  const T sc = Conv<T>::from(__fdiv_rn(__fsub_rn(mx, mn), qmax));
  const float s = Conv<T>::to(sc);
  Word* pg = reinterpret_cast<Word*>(packed + go * (static_cast<int64_t>(G) * BITS / 8));
  if (nonfinite || !isfinite(s)) {
    if (lane == 0) {
      scale[go] = Conv<T>::nan();
      minimum[go] = Conv<T>::from(0.0f);
    }
    for (int j = lane; j < vecs; j += L) pg[j] = 0;
    return;
  }
  if (lane == 0) {
    scale[go] = sc;
    minimum[go] = Conv<T>::from(mn);
  }
  const float r = s != 0.0f ? __frcp_rn(s) : 0.0f;
  for (int j = lane; j < vecs; j += L) {
    T v[N];
    load_vec(xg + j * N, v);
    Word word = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float q = __fmul_rn(__fsub_rn(Conv<T>::to(v[k]), mn), r);
      q = fminf(fmaxf(rintf(q), 0.0f), qmax);  // fmaxf maps NaN to 0
      word |= static_cast<Word>(static_cast<unsigned>(q)) << (k * BITS);
    }
    pg[j] = word;
  }
}

template <class T, int BITS>
__global__ void dequantize_vec_kernel(const uint8_t* __restrict__ packed,
                                      const T* __restrict__ scale, const T* __restrict__ minimum,
                                      T* __restrict__ y, int64_t n_vectors, int vecs,
                                      Rows rows) {
  constexpr int N = 16 / sizeof(T);
  constexpr int WB = N * BITS / 8;
  using Word = typename WordOf<WB>::type;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_vectors) return;
  const int64_t gi = slotted_group(t / vecs, rows);  // where the inputs come from
  if (gi < 0) return;
  const float s = Conv<T>::to(scale[gi]);
  const float m = Conv<T>::to(minimum[gi]);
  const Word word = reinterpret_cast<const Word*>(packed)[gi * vecs + t % vecs];
  constexpr unsigned mask = (1u << BITS) - 1u;
  T out[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const unsigned code = static_cast<unsigned>(word >> (k * BITS)) & mask;
    out[k] = Conv<T>::from(__fmaf_rn(static_cast<float>(code), s, m));
  }
  uint4 raw;
  memcpy(&raw, out, 16);
  reinterpret_cast<uint4*>(y)[t] = raw;
}

// ---------------------------------------------------------------- per-channel kernels
// x [R, T, D], groups of G tokens of one channel; packed [R, D, T*b/8], scale/min [R, D, T/G].
// One thread per group, consecutive threads on consecutive channels, so every token row is
// read (or, dequantizing, written) as one coalesced run across the warp; no transposed copy.
// Each thread's codes are contiguous bytes of packed.
struct Cols {
  int64_t tokens, channels;
};

template <class T>
__global__ void quantize_cols_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                     T* __restrict__ scale, T* __restrict__ minimum,
                                     int64_t n_groups, int G, int bits, Cols c) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= n_groups) return;
  const int64_t tb_count = c.tokens / G;
  const int64_t d = id % c.channels;           // (r, tb, d) order: d fastest
  const int64_t tb = (id / c.channels) % tb_count;
  const int64_t r = id / (c.channels * tb_count);
  const int64_t g = (r * c.channels + d) * tb_count + tb;  // the group's index in packed order
  quantize_group(x + (r * c.tokens + tb * G) * c.channels + d, c.channels, G, bits,
                 packed + g * (G * bits / 8), scale + g, minimum + g);
}

template <class T>
__global__ void dequantize_cols_kernel(const uint8_t* __restrict__ packed,
                                       const T* __restrict__ scale, const T* __restrict__ minimum,
                                       T* __restrict__ y, int64_t n_groups, int G, int bits,
                                       Cols c) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= n_groups) return;
  const int64_t tb_count = c.tokens / G;
  const int64_t d = id % c.channels;
  const int64_t tb = (id / c.channels) % tb_count;
  const int64_t r = id / (c.channels * tb_count);
  const int64_t g = (r * c.channels + d) * tb_count + tb;
  dequantize_group(packed + g * (G * bits / 8), scale[g], minimum[g], G, bits,
                   y + (r * c.tokens + tb * G) * c.channels + d, c.channels);
}

constexpr int kThreads = 128;
constexpr int kVecThreads = 256;

// Lanes per group (log2) for the vectorized kernels, or -1 when they do not apply.
int vec_lanes_log2(int G, size_t elem, uintptr_t values, uintptr_t packed, int bits) {
  const int n = static_cast<int>(16 / elem);
  if (G % n != 0 || values % 16 != 0 || packed % static_cast<uintptr_t>(n * bits / 8) != 0)
    return -1;
  const int vecs = G / n;
  int lg = 0;
  while (lg < 5 && vecs % (2 << lg) == 0) ++lg;
  return lg;
}

template <class T, int BITS>
void launch_quantize_vec(const void* x, void* packed, void* scale, void* minimum,
                         int64_t n_groups, int G, int lanes_log2, Rows rows, cudaStream_t st) {
  const int64_t threads = n_groups << lanes_log2;
  const unsigned blocks = static_cast<unsigned>((threads + kVecThreads - 1) / kVecThreads);
  quantize_vec_kernel<T, BITS><<<blocks, kVecThreads, 0, st>>>(
      static_cast<const T*>(x), static_cast<uint8_t*>(packed), static_cast<T*>(scale),
      static_cast<T*>(minimum), n_groups, G, lanes_log2, rows);
}

template <class T, int BITS>
void launch_dequantize_vec(const void* packed, const void* scale, const void* minimum, void* y,
                           int64_t n_groups, int G, Rows rows, cudaStream_t st) {
  const int vecs = G / static_cast<int>(16 / sizeof(T));
  const int64_t n_vectors = n_groups * vecs;
  const unsigned blocks = static_cast<unsigned>((n_vectors + kVecThreads - 1) / kVecThreads);
  dequantize_vec_kernel<T, BITS><<<blocks, kVecThreads, 0, st>>>(
      static_cast<const uint8_t*>(packed), static_cast<const T*>(scale),
      static_cast<const T*>(minimum), static_cast<T*>(y), n_vectors, vecs, rows);
}

std::string finish(cudaError_t e) {
  if (e == cudaSuccess) e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <class T>
std::string launch_quantize(const void* x, void* packed, void* scale, void* minimum,
                            int64_t n_groups, int G, int bits, Cols cols, Rows rows,
                            cudaStream_t st) {
  if (cols.channels > 0) {
    const unsigned blocks = static_cast<unsigned>((n_groups + kThreads - 1) / kThreads);
    quantize_cols_kernel<T><<<blocks, kThreads, 0, st>>>(
        static_cast<const T*>(x), static_cast<uint8_t*>(packed), static_cast<T*>(scale),
        static_cast<T*>(minimum), n_groups, G, bits, cols);
    return finish(cudaSuccess);
  }
  const int lg = vec_lanes_log2(G, sizeof(T), reinterpret_cast<uintptr_t>(x),
                                reinterpret_cast<uintptr_t>(packed), bits);
  if (lg >= 0 && !std::getenv("THUNDERKV_CUDA_SCALAR")) {
    switch (bits) {
      case 2: launch_quantize_vec<T, 2>(x, packed, scale, minimum, n_groups, G, lg, rows, st); break;
      case 4: launch_quantize_vec<T, 4>(x, packed, scale, minimum, n_groups, G, lg, rows, st); break;
      default: launch_quantize_vec<T, 8>(x, packed, scale, minimum, n_groups, G, lg, rows, st); break;
    }
    return finish(cudaSuccess);
  }
  const unsigned blocks = static_cast<unsigned>((n_groups + kThreads - 1) / kThreads);
  quantize_kernel<T><<<blocks, kThreads, 0, st>>>(
      static_cast<const T*>(x), static_cast<uint8_t*>(packed), static_cast<T*>(scale),
      static_cast<T*>(minimum), n_groups, G, bits, rows);
  return finish(cudaSuccess);
}

template <class T>
std::string launch_dequantize(const void* packed, const void* scale, const void* minimum, void* y,
                              int64_t n_groups, int G, int bits, Cols cols, Rows rows,
                              cudaStream_t st) {
  if (cols.channels > 0) {
    const unsigned blocks = static_cast<unsigned>((n_groups + kThreads - 1) / kThreads);
    dequantize_cols_kernel<T><<<blocks, kThreads, 0, st>>>(
        static_cast<const uint8_t*>(packed), static_cast<const T*>(scale),
        static_cast<const T*>(minimum), static_cast<T*>(y), n_groups, G, bits, cols);
    return finish(cudaSuccess);
  }
  if (vec_lanes_log2(G, sizeof(T), reinterpret_cast<uintptr_t>(y),
                     reinterpret_cast<uintptr_t>(packed), bits) >= 0 &&
      !std::getenv("THUNDERKV_CUDA_SCALAR")) {
    switch (bits) {
      case 2: launch_dequantize_vec<T, 2>(packed, scale, minimum, y, n_groups, G, rows, st); break;
      case 4: launch_dequantize_vec<T, 4>(packed, scale, minimum, y, n_groups, G, rows, st); break;
      default: launch_dequantize_vec<T, 8>(packed, scale, minimum, y, n_groups, G, rows, st); break;
    }
    return finish(cudaSuccess);
  }
  const unsigned blocks = static_cast<unsigned>((n_groups + kThreads - 1) / kThreads);
  dequantize_kernel<T><<<blocks, kThreads, 0, st>>>(
      static_cast<const uint8_t*>(packed), static_cast<const T*>(scale),
      static_cast<const T*>(minimum), static_cast<T*>(y), n_groups, G, bits, rows);
  return finish(cudaSuccess);
}

}  // namespace

std::string quantize(int dtype, const void* x, void* packed, void* scale, void* minimum,
                     int64_t n_groups, int group_size, int bits, int device, uintptr_t stream,
                     int64_t tokens, int64_t channels, const int64_t* row_index,
                     int64_t row_groups) {
  if (n_groups == 0) return {};
  DeviceGuard guard;
  cudaError_t e = guard.set(device);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const Cols cols{tokens, channels};
  const Rows rows{row_index, row_index ? row_groups : 1};
  switch (dtype) {
    case 0:
      return launch_quantize<__half>(x, packed, scale, minimum, n_groups, group_size, bits, cols,
                                     rows, st);
    case 1:
      return launch_quantize<__nv_bfloat16>(x, packed, scale, minimum, n_groups, group_size, bits,
                                            cols, rows, st);
    case 2:
      return launch_quantize<float>(x, packed, scale, minimum, n_groups, group_size, bits, cols,
                                    rows, st);
  }
  return "unsupported dtype code";
}

std::string dequantize(int dtype, const void* packed, const void* scale, const void* minimum,
                       void* y, int64_t n_groups, int group_size, int bits, int device,
                       uintptr_t stream, int64_t tokens, int64_t channels,
                       const int64_t* row_index, int64_t row_groups) {
  if (n_groups == 0) return {};
  DeviceGuard guard;
  cudaError_t e = guard.set(device);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const Cols cols{tokens, channels};
  const Rows rows{row_index, row_index ? row_groups : 1};
  switch (dtype) {
    case 0:
      return launch_dequantize<__half>(packed, scale, minimum, y, n_groups, group_size, bits,
                                       cols, rows, st);
    case 1:
      return launch_dequantize<__nv_bfloat16>(packed, scale, minimum, y, n_groups, group_size,
                                              bits, cols, rows, st);
    case 2:
      return launch_dequantize<float>(packed, scale, minimum, y, n_groups, group_size, bits, cols,
                                      rows, st);
  }
  return "unsupported dtype code";
}

int device_count(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = cudaGetErrorString(e);
    return -1;
  }
  return n;
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace tkv::cuda
