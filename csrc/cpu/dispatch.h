// Runtime selection of the CPU variant and the threaded entry points.
#pragma once

#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace tkv::cpu {

// Variants compiled into this build that this CPU can run, slowest first.
const std::vector<Variant>& usable_variants();
// The variant in use: the fastest usable one, or THUNDERKV_CPU_ISA if set.
const Variant& active_variant();
// Force a variant by name ("generic", "avx2", "avx512"); throws std::invalid_argument.
void set_active_variant(const std::string& name);

int max_threads();
bool have_openmp();

// threads <= 0: use the OpenMP default.
void quantize(const QuantArgs& a, int threads);
void dequantize(const DequantArgs& a, int threads);

// Paged cache rows (thunderkv/paged.py), per-token groups only. A row is `a.n_groups` groups.
// quantize_rows: input row t (contiguous from a.x) goes to output row slots[t] of
// packed/scale/minimum; rows with slots[t] < 0 are skipped (padding).
void quantize_rows(const QuantArgs& a, const int64_t* slots, int64_t n_rows, int threads);
// dequantize_rows: output row t (contiguous from a.y) comes from input row rows[t]; rows with
// rows[t] == kZeroRow are zeroed (a gather past a sequence's end), other rows[t] < 0 are left
// as they are.
constexpr int64_t kZeroRow = -2;  // thunderkv.backends.ZERO_ROW (and the CUDA kernels')
void dequantize_rows(const DequantArgs& a, const int64_t* rows, int64_t n_rows, int threads);

}  // namespace tkv::cpu
