// Scalar range loops over groups, dispatching on dtype. Included by every variant so that
// group sizes the SIMD paths do not cover fall back to the same format_v1.h code.
#pragma once

#include "cpu_kernels.h"

namespace tkv::cpu {

template <DType D>
inline void quantize_groups_scalar(const QuantArgs& a, int64_t begin, int64_t end) {
  using T = typename Elem<D>::T;
  const T* x = static_cast<const T*>(a.x);
  T* scale = static_cast<T*>(a.scale);
  T* minimum = static_cast<T*>(a.minimum);
  const int64_t G = a.group_size;
  const int64_t nb = G * a.bits / 8;
  for (int64_t g = begin; g < end; ++g) {
    quantize_group_scalar<D>(x + g * G, a.group_size, a.bits, a.packed + g * nb, scale + g,
                             minimum + g);
  }
}

template <DType D>
inline void dequantize_groups_scalar(const DequantArgs& a, int64_t begin, int64_t end) {
  using T = typename Elem<D>::T;
  const T* scale = static_cast<const T*>(a.scale);
  const T* minimum = static_cast<const T*>(a.minimum);
  T* y = static_cast<T*>(a.y);
  const int64_t G = a.group_size;
  const int64_t nb = G * a.bits / 8;
  for (int64_t g = begin; g < end; ++g) {
    dequantize_group_scalar<D>(a.packed + g * nb, a.group_size, a.bits, scale[g], minimum[g],
                               y + g * G);
  }
}

inline void quantize_range_scalar(const QuantArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::F16: return quantize_groups_scalar<DType::F16>(a, begin, end);
    case DType::BF16: return quantize_groups_scalar<DType::BF16>(a, begin, end);
    case DType::F32: return quantize_groups_scalar<DType::F32>(a, begin, end);
  }
}

inline void dequantize_range_scalar(const DequantArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::F16: return dequantize_groups_scalar<DType::F16>(a, begin, end);
    case DType::BF16: return dequantize_groups_scalar<DType::BF16>(a, begin, end);
    case DType::F32: return dequantize_groups_scalar<DType::F32>(a, begin, end);
  }
}

}  // namespace tkv::cpu
