// CPU kernels of format v1: one set of range functions per instruction-set variant.
// Each variant is a separate translation unit compiled with its own -m flags; dispatch.cpp
// picks one at load time from the CPU's features.
#pragma once

#include <cstdint>

#include "../format_v1.h"

namespace tkv::cpu {

// Quantize n_groups groups of group_size elements of a contiguous input.
// Per-token (channels == 0): group g is elements [g*G, (g+1)*G) and packed/scale/minimum are
// in group order. Per-channel (channels = D > 0, tokens = T): x is [R, T, D] and groups run
// along T with stride D; outputs are in format v1's grouped layout [R, D, T/G] (packed
// [R, D, T*bits/8]); ranges then count tiles (one tile = G tokens x D channels of one row).
struct QuantArgs {
  const void* x;       // [n_groups * G] elements of dtype
  uint8_t* packed;     // [n_groups * G * bits / 8]
  void* scale;         // [n_groups] of dtype
  void* minimum;       // [n_groups] of dtype
  int64_t n_groups;
  int group_size;
  int bits;
  DType dtype;
  int64_t tokens = 0;
  int64_t channels = 0;
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
  int64_t tokens = 0;    // per-channel layout, as for QuantArgs
  int64_t channels = 0;
};

// Units a range function iterates over: groups (per-token) or tiles (per-channel).
template <class Args>
inline int64_t work_units(const Args& a) {
  return a.channels > 0 ? a.n_groups / a.channels : a.n_groups;
}

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
