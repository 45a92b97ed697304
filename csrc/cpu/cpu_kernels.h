// CPU kernels of format v1: one set of range functions per instruction-set variant.
// Each variant is a separate translation unit compiled with its own -m flags; dispatch.cpp
// picks one at load time from the CPU's features.
#pragma once

#include <cstdint>

#include "../format_v1.h"

namespace tkv::cpu {

// Quantize n_groups consecutive groups of group_size elements of a contiguous input.
struct QuantArgs {
  const void* x;       // [n_groups * G] elements of dtype
  uint8_t* packed;     // [n_groups * G * bits / 8]
  void* scale;         // [n_groups] of dtype
  void* minimum;       // [n_groups] of dtype
  int64_t n_groups;
  int group_size;
  int bits;
  DType dtype;
};

struct DequantArgs {
  const uint8_t* packed;
  const void* scale;
  const void* minimum;
  void* y;             // [n_groups * G] of dtype
  int64_t n_groups;
  int group_size;
  int bits;
  DType dtype;
};

using QuantRangeFn = void (*)(const QuantArgs&, int64_t begin, int64_t end);
using DequantRangeFn = void (*)(const DequantArgs&, int64_t begin, int64_t end);

struct Variant {
  const char* name;
  QuantRangeFn quantize;
  DequantRangeFn dequantize;
};

// Always present.
Variant generic_variant();
// Present when compiled (THUNDERKV_HAVE_AVX2 / THUNDERKV_HAVE_AVX512).
Variant avx2_variant();
Variant avx512_variant();

}  // namespace tkv::cpu
