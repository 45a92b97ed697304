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
// Per-channel (axis=-2): one thread per 8 fp16/bf16 (4 fp32) adjacent channels of a token
// block, 16-byte row loads, codes stored as 16- or 4-byte words; the scalar per-channel
// kernel where the shapes or alignment do not allow that; THUNDERKV_CUDA_COLS=regs picks a
// register-resident quantize (G of 32 or 64) to time against it. The thread and lane bodies of
// every kernel live in quant_threads.cuh, which tests/cuda_emulation also runs on the CPU; this
// file keeps thread indexing, the shuffles and the launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "device_guard.h"
#include "quant_cuda.h"
#include "quant_threads.cuh"

namespace tkv::cuda {
namespace {

template <class T>
__global__ void quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                T* __restrict__ scale, T* __restrict__ minimum, int64_t n_groups,
                                int G, int bits, Rows rows) {
  const int64_t gi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gi < n_groups) quantize_thread(x, packed, scale, minimum, gi, G, bits, rows);
}

template <class T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, const T* __restrict__ scale,
                                  const T* __restrict__ minimum, T* __restrict__ y,
                                  int64_t n_groups, int G, int bits, Rows rows) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < n_groups) dequantize_thread(packed, scale, minimum, y, g, G, bits, rows);
}

// ---------------------------------------------------------------- vectorized kernels
// L lanes per group; lane bodies in quant_threads.cuh. Every lane of the (full) warp takes
// part in the shuffles, inactive ones too; xor offsets < L stay inside the group's lanes.
template <class T, int BITS>
__global__ void quantize_vec_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                    T* __restrict__ scale, T* __restrict__ minimum,
                                    int64_t n_groups, int G, int lanes_log2, Rows rows) {
  const int L = 1 << lanes_log2;
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> lanes_log2;
  const int lane = threadIdx.x & (L - 1);
  const int64_t go = g < n_groups ? slotted_group(g, rows) : -1;  // where the outputs go
  const bool active = go >= 0;  // the same for all L lanes of a group
  const int vecs = G / kVecValues<T>;
  const T* xg = x + (active ? g : 0) * G;
  MinMax m = active ? quantize_vec_lane_minmax(xg, lane, L, vecs) : MinMax{};
  for (int off = L >> 1; off > 0; off >>= 1) {
    const MinMax other{__shfl_xor_sync(0xffffffffu, m.mn, off),
                       __shfl_xor_sync(0xffffffffu, m.mx, off),
                       __shfl_xor_sync(0xffffffffu, static_cast<int>(m.nonfinite), off) != 0};
    m = merge(m, other);
  }
  if (!active) return;
  const GroupFinish<T> f = finish_group<T>(m.mn, m.mx, m.nonfinite, BITS);  // same in each lane
  if (lane == 0) {
    scale[go] = f.scale;
    minimum[go] = f.minimum;
  }
  quantize_vec_lane_codes<T, BITS>(xg, f, packed + go * (static_cast<int64_t>(G) * BITS / 8),
                                   lane, L, vecs);
}

template <class T, int BITS>
__global__ void dequantize_vec_kernel(const uint8_t* __restrict__ packed,
                                      const T* __restrict__ scale, const T* __restrict__ minimum,
                                      T* __restrict__ y, int64_t n_vectors, int vecs,
                                      Rows rows) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < n_vectors) dequantize_vec_thread<T, BITS>(packed, scale, minimum, y, t, vecs, rows);
}

// ---------------------------------------------------------------- per-channel kernels
// x [R, T, D], groups of G tokens of one channel: the thread bodies in quant_threads.cuh.
template <class T>
__global__ void quantize_cols_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                     T* __restrict__ scale, T* __restrict__ minimum,
                                     int64_t n_groups, int G, int bits, Cols c) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id < n_groups) quantize_cols_thread(x, packed, scale, minimum, id, G, bits, c);
}

template <class T>
__global__ void dequantize_cols_kernel(const uint8_t* __restrict__ packed,
                                       const T* __restrict__ scale, const T* __restrict__ minimum,
                                       T* __restrict__ y, int64_t n_groups, int G, int bits,
                                       Cols c) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id < n_groups) dequantize_cols_thread(packed, scale, minimum, y, id, G, bits, c);
}

template <class T, int BITS, int WORDS>
__global__ void quantize_cols_vec_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                         T* __restrict__ scale, T* __restrict__ minimum,
                                         int64_t n_threads, int G, Cols c) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id < n_threads) quantize_cols_vec_thread<T, BITS, WORDS>(x, packed, scale, minimum, id, G, c);
}

template <class T, int BITS, int WORDS>
__global__ void dequantize_cols_vec_kernel(const uint8_t* __restrict__ packed,
                                           const T* __restrict__ scale,
                                           const T* __restrict__ minimum, T* __restrict__ y,
                                           int64_t n_threads, int G, Cols c) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id < n_threads)
    dequantize_cols_vec_thread<T, BITS, WORDS>(packed, scale, minimum, y, id, G, c);
}

constexpr int kThreads = 128;
constexpr int kVecThreads = 256;

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

// The vectorized per-channel kernels for `words` (cols_vec_words) and `bits`: one thread per
// V = 16 / sizeof(T) channels of a token block, so n_groups / V threads.
template <class T, bool QUANTIZE, int WORDS>
void launch_cols_vec_words(const void* in, void* out, const void* scale_in, void* scale,
                           const void* min_in, void* minimum, int64_t n_groups, int G, int bits,
                           Cols cols, cudaStream_t st) {
  const int64_t n = n_groups / kVecValues<T>;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
#define TKV_COLS_VEC(B)                                                                           \
  if constexpr (QUANTIZE)                                                                         \
    quantize_cols_vec_kernel<T, B, WORDS><<<blocks, kThreads, 0, st>>>(                           \
        static_cast<const T*>(in), static_cast<uint8_t*>(out), static_cast<T*>(scale),             \
        static_cast<T*>(minimum), n, G, cols);                                                    \
  else                                                                                            \
    dequantize_cols_vec_kernel<T, B, WORDS><<<blocks, kThreads, 0, st>>>(                         \
        static_cast<const uint8_t*>(in), static_cast<const T*>(scale_in),                         \
        static_cast<const T*>(min_in), static_cast<T*>(out), n, G, cols);
  switch (bits) {
    case 2: TKV_COLS_VEC(2) break;
    case 4: TKV_COLS_VEC(4) break;
    default: TKV_COLS_VEC(8) break;
  }
#undef TKV_COLS_VEC
}

template <class T, int BITS, int G, int WORDS>
__global__ void quantize_cols_reg_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                         T* __restrict__ scale, T* __restrict__ minimum,
                                         int64_t n_threads, Cols c) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id < n_threads)
    quantize_cols_reg_thread<T, BITS, G, WORDS>(x, packed, scale, minimum, id, c);
}

// The register-resident per-channel quantize for `words` (cols_reg_words); false when no
// kernel fits the combination (then the caller launches another).
template <class T>
bool launch_quantize_cols_reg(const void* x, void* packed, void* scale, void* minimum,
                              int64_t n_groups, int G, int bits, int words, Cols cols,
                              cudaStream_t st) {
  const int64_t n = n_groups / kRegValues<T>;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  return with_cols_reg_variant(bits, G, words, [&](auto b, auto g, auto w) {
    quantize_cols_reg_kernel<T, decltype(b)::value, decltype(g)::value, decltype(w)::value>
        <<<blocks, kThreads, 0, st>>>(static_cast<const T*>(x), static_cast<uint8_t*>(packed),
                                      static_cast<T*>(scale), static_cast<T*>(minimum), n, cols);
  });
}

// Per-channel launch: the vectorized kernels where cols_vec_words allows (and
// THUNDERKV_CUDA_SCALAR is unset; with THUNDERKV_CUDA_COLS=regs, quantize takes the
// register-resident kernel where cols_reg_words allows), else one thread per group.
template <class T, bool QUANTIZE>
void launch_cols(const void* in, void* out, const void* scale_in, void* scale, const void* min_in,
                 void* minimum, int64_t n_groups, int G, int bits, Cols cols, cudaStream_t st) {
  const void* values = QUANTIZE ? in : out;
  const void* packed = QUANTIZE ? out : in;
  const bool scalar = std::getenv("THUNDERKV_CUDA_SCALAR") != nullptr;
  if constexpr (QUANTIZE) {
    const char* pick = std::getenv("THUNDERKV_CUDA_COLS");
    if (!scalar && pick && std::strcmp(pick, "regs") == 0) {
      const int reg_words = cols_reg_words(G, bits, sizeof(T), cols.channels,
                                           reinterpret_cast<uintptr_t>(values),
                                           reinterpret_cast<uintptr_t>(packed));
      if (reg_words && launch_quantize_cols_reg<T>(in, out, scale, minimum, n_groups, G, bits,
                                                   reg_words, cols, st))
        return;
    }
  }
  const int words = scalar ? 0 : cols_vec_words(
      G, bits, sizeof(T), cols.channels, reinterpret_cast<uintptr_t>(values),
      reinterpret_cast<uintptr_t>(packed));
  if (words == 4) {
    launch_cols_vec_words<T, QUANTIZE, 4>(in, out, scale_in, scale, min_in, minimum, n_groups, G,
                                          bits, cols, st);
  } else if (words == 1) {
    launch_cols_vec_words<T, QUANTIZE, 1>(in, out, scale_in, scale, min_in, minimum, n_groups, G,
                                          bits, cols, st);
  } else {
    const unsigned blocks = static_cast<unsigned>((n_groups + kThreads - 1) / kThreads);
    if constexpr (QUANTIZE)
      quantize_cols_kernel<T><<<blocks, kThreads, 0, st>>>(
          static_cast<const T*>(in), static_cast<uint8_t*>(out), static_cast<T*>(scale),
          static_cast<T*>(minimum), n_groups, G, bits, cols);
    else
      dequantize_cols_kernel<T><<<blocks, kThreads, 0, st>>>(
          static_cast<const uint8_t*>(in), static_cast<const T*>(scale_in),
          static_cast<const T*>(min_in), static_cast<T*>(out), n_groups, G, bits, cols);
  }
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
    launch_cols<T, true>(x, packed, nullptr, scale, nullptr, minimum, n_groups, G, bits, cols, st);
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
    launch_cols<T, false>(packed, y, scale, nullptr, minimum, nullptr, n_groups, G, bits, cols,
                          st);
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

// Every launch uses at most one thread per element and blocks of >= 128 threads, so these
// many elements keep every grid within gridDim.x's 2^31 - 1 blocks (~512 GiB of fp16).
bool grid_fits(int64_t n_groups, int group_size) {
  constexpr int64_t kMaxElements = int64_t{0x7FFFFFFF} * kThreads;
  return n_groups <= kMaxElements / group_size;
}
constexpr const char* kTooLarge = "tensor too large for one kernel launch (over 2^31 blocks)";

}  // namespace

std::string quantize(int dtype, const void* x, void* packed, void* scale, void* minimum,
                     int64_t n_groups, int group_size, int bits, int device, uintptr_t stream,
                     int64_t tokens, int64_t channels, const int64_t* row_index,
                     int64_t row_groups, int64_t slot_rows) {
  if (n_groups == 0) return {};
  if (!grid_fits(n_groups, group_size)) return kTooLarge;
  DeviceGuard guard;
  cudaError_t e = guard.set(device);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const Cols cols{tokens, channels};
  const Rows rows{row_index, row_index ? row_groups : 1, slot_rows};
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
                       const int64_t* row_index, int64_t row_groups, int64_t slot_rows) {
  if (n_groups == 0) return {};
  if (!grid_fits(n_groups, group_size)) return kTooLarge;
  DeviceGuard guard;
  cudaError_t e = guard.set(device);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const Cols cols{tokens, channels};
  const Rows rows{row_index, row_index ? row_groups : 1, slot_rows};
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
