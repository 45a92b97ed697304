// Scalar range loops over groups, dispatching on dtype. Included by every variant so that
// group sizes the SIMD paths do not cover fall back to the same format_v1.h code.
#pragma once

#include <vector>

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

// Per-channel: gather each channel's G tokens (stride D) into a buffer, quantize as a group.
// Channels [c_from, D) of tiles [begin, end) (the SIMD variants pass their channel tail).
template <DType D>
inline void quantize_cols_scalar(const QuantArgs& a, int64_t begin, int64_t end,
                                 int64_t c_from = 0) {
  using T = typename Elem<D>::T;
  const T* x = static_cast<const T*>(a.x);
  T* scale = static_cast<T*>(a.scale);
  T* minimum = static_cast<T*>(a.minimum);
  const int64_t G = a.group_size, C = a.channels, n_tg = a.tokens / G;
  const int64_t nb = G * a.bits / 8, row_bytes = a.tokens * a.bits / 8;
  std::vector<T> tmp(static_cast<size_t>(G));
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t r = tile / n_tg, tg = tile % n_tg;
    const T* xt = x + (r * a.tokens + tg * G) * C;
    for (int64_t c = c_from; c < C; ++c) {
      for (int64_t i = 0; i < G; ++i) tmp[i] = xt[i * C + c];
      const int64_t ch = r * C + c;
      quantize_group_scalar<D>(tmp.data(), a.group_size, a.bits, a.packed + ch * row_bytes + tg * nb,
                               scale + ch * n_tg + tg, minimum + ch * n_tg + tg);
    }
  }
}

template <DType D>
inline void dequantize_cols_scalar(const DequantArgs& a, int64_t begin, int64_t end,
                                   int64_t c_from = 0) {
  using T = typename Elem<D>::T;
  const T* scale = static_cast<const T*>(a.scale);
  const T* minimum = static_cast<const T*>(a.minimum);
  T* y = static_cast<T*>(a.y);
  const int64_t G = a.group_size, C = a.channels, n_tg = a.tokens / G;
  const int64_t nb = G * a.bits / 8, row_bytes = a.tokens * a.bits / 8;
  std::vector<T> tmp(static_cast<size_t>(G));
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t r = tile / n_tg, tg = tile % n_tg;
    T* yt = y + (r * a.tokens + tg * G) * C;
    for (int64_t c = c_from; c < C; ++c) {
      const int64_t ch = r * C + c;
      dequantize_group_scalar<D>(a.packed + ch * row_bytes + tg * nb, a.group_size, a.bits,
                                 scale[ch * n_tg + tg], minimum[ch * n_tg + tg], tmp.data());
      for (int64_t i = 0; i < G; ++i) yt[i * C + c] = tmp[i];
    }
  }
}

inline void quantize_range_scalar(const QuantArgs& a, int64_t begin, int64_t end) {
  if (a.channels > 0) {
    switch (a.dtype) {
      case DType::F16: return quantize_cols_scalar<DType::F16>(a, begin, end);
      case DType::BF16: return quantize_cols_scalar<DType::BF16>(a, begin, end);
      case DType::F32: return quantize_cols_scalar<DType::F32>(a, begin, end);
    }
  }
  switch (a.dtype) {
    case DType::F16: return quantize_groups_scalar<DType::F16>(a, begin, end);
    case DType::BF16: return quantize_groups_scalar<DType::BF16>(a, begin, end);
    case DType::F32: return quantize_groups_scalar<DType::F32>(a, begin, end);
  }
}

inline void dequantize_range_scalar(const DequantArgs& a, int64_t begin, int64_t end) {
  if (a.channels > 0) {
    switch (a.dtype) {
      case DType::F16: return dequantize_cols_scalar<DType::F16>(a, begin, end);
      case DType::BF16: return dequantize_cols_scalar<DType::BF16>(a, begin, end);
      case DType::F32: return dequantize_cols_scalar<DType::F32>(a, begin, end);
    }
  }
  switch (a.dtype) {
    case DType::F16: return dequantize_groups_scalar<DType::F16>(a, begin, end);
    case DType::BF16: return dequantize_groups_scalar<DType::BF16>(a, begin, end);
    case DType::F32: return dequantize_groups_scalar<DType::F32>(a, begin, end);
  }
}

}  // namespace tkv::cpu
