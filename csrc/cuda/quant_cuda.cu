// CUDA kernels of format v1: one thread per group (straightforward and exact; issue 3 tunes
// them). Every float operation uses an explicit round-to-nearest intrinsic, so neither nvcc's
// FMA contraction nor fast-math can change a bit (the build also passes --fmad=false).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

template <class T>
__global__ void quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                T* __restrict__ scale, T* __restrict__ minimum, int64_t n_groups,
                                int G, int bits) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n_groups) return;
  const T* xg = x + g * G;
  const int nb = G * bits / 8;
  uint8_t* pg = packed + g * nb;
  float mn = __int_as_float(0x7F800000);
  float mx = -mn;
  bool nonfinite = false;
  for (int i = 0; i < G; ++i) {
    const float v = Conv<T>::to(xg[i]);
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
    scale[g] = Conv<T>::nan();
    minimum[g] = Conv<T>::from(0.0f);
    for (int b = 0; b < nb; ++b) pg[b] = 0;
    return;
  }
  scale[g] = sc;
  minimum[g] = Conv<T>::from(mn);
  const float r = s != 0.0f ? __frcp_rn(s) : 0.0f;
  const int per_byte = 8 / bits;
  for (int b = 0; b < nb; ++b) {
    unsigned byte = 0;
    for (int k = 0; k < per_byte; ++k) {
      float v = __fmul_rn(__fsub_rn(Conv<T>::to(xg[b * per_byte + k]), mn), r);
      v = fminf(fmaxf(rintf(v), 0.0f), qmax);  // fmaxf maps NaN to 0
      byte |= static_cast<unsigned>(v) << (k * bits);
    }
    pg[b] = static_cast<uint8_t>(byte);
  }
}

template <class T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, const T* __restrict__ scale,
                                  const T* __restrict__ minimum, T* __restrict__ y,
                                  int64_t n_groups, int G, int bits) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n_groups) return;
  const float s = Conv<T>::to(scale[g]);
  const float m = Conv<T>::to(minimum[g]);
  const uint8_t* pg = packed + g * (G * bits / 8);
  T* yg = y + g * G;
  const int per_byte = 8 / bits;
  const unsigned mask = (1u << bits) - 1u;
  for (int i = 0; i < G; ++i) {
    const unsigned code = (pg[i / per_byte] >> ((i % per_byte) * bits)) & mask;
    yg[i] = Conv<T>::from(__fmaf_rn(static_cast<float>(code), s, m));
  }
}

constexpr int kThreads = 128;

std::string finish(cudaError_t e) {
  if (e == cudaSuccess) e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <class T>
std::string launch_quantize(const void* x, void* packed, void* scale, void* minimum,
                            int64_t n_groups, int G, int bits, cudaStream_t st) {
  const unsigned blocks = static_cast<unsigned>((n_groups + kThreads - 1) / kThreads);
  quantize_kernel<T><<<blocks, kThreads, 0, st>>>(
      static_cast<const T*>(x), static_cast<uint8_t*>(packed), static_cast<T*>(scale),
      static_cast<T*>(minimum), n_groups, G, bits);
  return finish(cudaSuccess);
}

template <class T>
std::string launch_dequantize(const void* packed, const void* scale, const void* minimum, void* y,
                              int64_t n_groups, int G, int bits, cudaStream_t st) {
  const unsigned blocks = static_cast<unsigned>((n_groups + kThreads - 1) / kThreads);
  dequantize_kernel<T><<<blocks, kThreads, 0, st>>>(
      static_cast<const uint8_t*>(packed), static_cast<const T*>(scale),
      static_cast<const T*>(minimum), static_cast<T*>(y), n_groups, G, bits);
  return finish(cudaSuccess);
}

}  // namespace

std::string quantize(int dtype, const void* x, void* packed, void* scale, void* minimum,
                     int64_t n_groups, int group_size, int bits, int device, uintptr_t stream) {
  if (n_groups == 0) return {};
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_quantize<__half>(x, packed, scale, minimum, n_groups, group_size, bits, st);
    case 1:
      return launch_quantize<__nv_bfloat16>(x, packed, scale, minimum, n_groups, group_size, bits,
                                            st);
    case 2: return launch_quantize<float>(x, packed, scale, minimum, n_groups, group_size, bits, st);
  }
  return "unsupported dtype code";
}

std::string dequantize(int dtype, const void* packed, const void* scale, const void* minimum,
                       void* y, int64_t n_groups, int group_size, int bits, int device,
                       uintptr_t stream) {
  if (n_groups == 0) return {};
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return launch_dequantize<__half>(packed, scale, minimum, y, n_groups, group_size, bits, st);
    case 1:
      return launch_dequantize<__nv_bfloat16>(packed, scale, minimum, y, n_groups, group_size,
                                              bits, st);
    case 2:
      return launch_dequantize<float>(packed, scale, minimum, y, n_groups, group_size, bits, st);
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
